"""The metadata of a run container: what started it, with which software, and its status."""
from __future__ import annotations

import importlib.metadata

from ...jsonsafe import jsonable

EXIT_STATUS_TO_STATUS = {"success": "complete", "abort": "interrupted", "fail": "interrupted"}
RESTART_REASON = "service restarted before the run ended; results up to then are kept"


def software_versions() -> dict[str, str]:
    """Versions of scatterflow and the numerics stack, read without importing them."""
    out = {}
    for dist in ("scatterflow", "torch", "pyFAI", "tiled", "bluesky", "event-model"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def start_metadata(start_doc: dict, config: dict, writer: str, extra: dict | None) -> dict:
    """A new run's metadata: status "running", written by ``writer`` (host:spool directory);
    ``extra`` (JSON-able) adds keys (source_run, detector, ...)."""
    return {"start": jsonable(start_doc), "configuration": jsonable(config),
            "software": software_versions(), "status": "running",
            "exit_status": None, "reason": "", "writer": writer, **jsonable(extra or {})}


def stop_metadata(exit_status: str, reason: str, status: str | None = None) -> dict:
    """A stopped run's status: ``status`` as the service decided it (complete, incomplete,
    failed, refused, quarantined, ...), or from ``exit_status``: "complete" on success, else
    "interrupted"."""
    if exit_status not in EXIT_STATUS_TO_STATUS:
        raise ValueError(f"exit_status must be one of {sorted(EXIT_STATUS_TO_STATUS)}, "
                         f"got {exit_status!r}")
    return {"status": status or EXIT_STATUS_TO_STATUS[exit_status], "exit_status": exit_status,
            "reason": str(reason)}


def interrupted_metadata() -> dict:
    """The status of a run an earlier process left running."""
    return {"status": "interrupted", "exit_status": "abort", "reason": RESTART_REASON}
