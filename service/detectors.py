"""Detectors of a run and the per-run settings of each: which analyses a start document opens.

A run has one analysis, keyed by its uid, unless it has several detectors: then each detector
``name`` gets its own analysis (worker pipeline, fitter, REST record, Tiled container), keyed
``f"{uid}.{name}"``. A run has several detectors when

* its start document names two or more detector entries in ``start["scatterflow"]`` (below), or
  else
* ``ingest.detector_fields`` lists two or more event fields.

A detector ``name`` takes its frames from the descriptor's 2D field ``name`` or, failing that,
the only 2D field whose name starts with ``name + "_"`` (ophyd: device ``saxs`` -> ``saxs_image``).

Start document keys read here (all optional; angles in rad)::

    start["scatterflow"] = {
        "modality": "saxs" | "waxs" | "gisaxs" | "giwaxs",     # the run's reduction
        "incident_angle": 0.0035, "tilt_angle": 0.0, "critical_angle": 0.0018,
        "sample_orientation": 1,
        "reduction": {...},          # ReductionConfig keys, replacing the configured ones
        "fit": {...},                # FitConfig keys (peaks, q_range, ...), replacing the configured ones
        "<name>": {"geometry": {...PONI mapping, pyFAI get_config()...},   # a detector entry:
                   "modality": ..., "incident_angle": ..., "reduction": {...}, "fit": {...}},
    }

A detector entry is a mapping holding any of ``geometry``, ``reduction``, ``fit`` or the run
keys; its keys win over the run-level ones, which win over the configuration. Other keys of
``start["scatterflow"]`` are not read, and logged as such once per analysis. Every size these
keys can set (bins, q-map bins, peaks, regularizer window, detector pixels, detectors) has a
ceiling in the configuration's ``limits``, checked in service/run_spec.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .config import FitConfig, LimitsConfig, ReductionConfig

log = logging.getLogger(__name__)

MAX_DETECTORS = LimitsConfig().detectors      # ingest passes the configured limits.detectors

DETECTOR_DOC_KEY = "scatterflow_detector"     # added to a detector's copy of the start document
#: added by `scatterflow reprocess` to its copy of a raw run's start document, whose uid it
#: replaces so that several analyses of one source coexist: {"source_run": uid, "catalog": uri}
REPLAY_DOC_KEY = "scatterflow_replay"
RUN_KEYS = ("modality", "incident_angle", "tilt_angle", "critical_angle", "sample_orientation")
ENTRY_KEYS = frozenset(("geometry", "reduction", "fit", "inversion", *RUN_KEYS))


def _hints(start: dict) -> dict:
    hints = start.get("scatterflow")
    return hints if isinstance(hints, dict) else {}


def detector_entries(start: dict) -> dict[str, dict]:
    """The detector entries of ``start["scatterflow"]``: {name: entry}, in document order."""
    return {str(k): v for k, v in _hints(start).items()
            if isinstance(v, dict) and ENTRY_KEYS.intersection(v)}


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and not name.isspace()


def run_detectors(start: dict, detector_fields=(), max_detectors: int = MAX_DETECTORS) -> dict[str, str]:
    """{detector name: analysis key} of a multi-detector run, or {} for a single-detector run.
    A start document naming more than ``max_detectors`` (``limits.detectors``) entries opens
    one analysis, which service/run_spec.py refuses ("limits"), not one per entry."""
    entries = list(detector_entries(start))
    if len(entries) > max_detectors:          # the refusal is logged and counted where it happens
        return {}
    names = entries if len(entries) >= 2 else list(detector_fields or ()) if len(detector_fields or ()) >= 2 else []
    bad = [n for n in names if not _valid_name(n)]
    if bad:
        log.warning("run %s: detector names %s skipped (empty or containing '/')", str(start.get("uid"))[:8], bad)
    uid = start["uid"]
    return {n: f"{uid}.{n}" for n in names if _valid_name(n)}


def detector_start(start: dict, name: str, key: str) -> dict:
    """The start document a detector's analysis gets: the run's, plus ``DETECTOR_DOC_KEY``
    {source_run, detector, key}."""
    return {**start, DETECTOR_DOC_KEY: {"source_run": start["uid"], "detector": name, "key": key}}


def match_field(name: str, fields) -> str | None:
    """The field holding detector ``name``'s frames among ``fields`` (names of 2D fields)."""
    fields = list(fields)
    if name in fields:
        return name
    prefixed = [f for f in fields if f.startswith(name + "_")]
    return prefixed[0] if len(prefixed) == 1 else None


@dataclass(frozen=True)
class RunSettings:
    """What one analysis uses: the merged reduction and fit settings, the detector's PONI
    mapping from the start document (None: the service's geometry rules), and the detector
    (``DETECTOR_DOC_KEY`` of the start document; None for a single-detector run)."""
    reduction: ReductionConfig
    fit: FitConfig
    geometry: dict | None = None
    detector: dict | None = None


def _merged(model, base, override: Any, where: str):
    if override is None:
        return base
    if not isinstance(override, dict):
        raise ValueError(f"{where} must be a mapping, got {override!r}")
    try:
        return model.model_validate({**base.model_dump(), **override})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{where}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def run_settings(start: dict, reduction: ReductionConfig, fit: FitConfig) -> RunSettings:
    """The settings of the analysis of ``start`` (a detector's copy for a multi-detector run):
    configuration < run-level keys of ``start["scatterflow"]`` < the detector's entry.
    ValueError naming the key for bad values (a grazing modality's needs are checked where the
    RunSpec is built, service/run_spec.py)."""
    hints = _hints(start)
    detector = start.get(DETECTOR_DOC_KEY)
    entries = detector_entries(start)
    unread = sorted(str(k) for k in hints if k not in ENTRY_KEYS and k not in entries)
    if unread:
        log.warning("run %s: start['scatterflow'] keys %s are not read (run keys: %s, reduction, fit, or a detector "
                    "entry; peaks go in start['scatterflow']['fit']['peaks'])", str(start.get("uid"))[:8], unread,
                    ", ".join(RUN_KEYS))
    if isinstance(detector, dict):
        entry = entries.get(detector.get("detector"), {})
    else:
        detector = None
        entry = next(iter(entries.values())) if len(entries) == 1 else {}   # one entry: the run's detector
    for layer, where in ((hints, "start.scatterflow"), (entry, "start.scatterflow detector")):
        extra = {k: layer[k] for k in RUN_KEYS if k in layer}
        if isinstance(extra.get("modality"), str):
            extra["modality"] = extra["modality"].lower()
        reduction = _merged(ReductionConfig, reduction, layer.get("reduction"), f"{where}.reduction")
        reduction = _merged(ReductionConfig, reduction, extra or None, where)
        fit = _merged(FitConfig, fit, layer.get("fit"), f"{where}.fit")
    geometry = entry.get("geometry")
    if geometry is not None and not isinstance(geometry, dict):
        raise ValueError(f"detector geometry must be a PONI mapping, got {geometry!r}")
    return RunSettings(reduction=reduction, fit=fit, geometry=geometry, detector=detector)


def analysis_info(start: dict, spec) -> dict:
    """What the REST record and the Tiled container of an analysis say of it: ``modality``
    (None without a RunSpec) and, for a detector of a multi-detector run or a replay from the
    catalogue, ``source_run`` (and ``detector``)."""
    info = {"modality": None if spec is None else spec.reduction.modality}
    det = start.get(DETECTOR_DOC_KEY)
    if isinstance(det, dict):
        info.update(source_run=det.get("source_run"), detector=det.get("detector"))
    replay = start.get(REPLAY_DOC_KEY)
    if isinstance(replay, dict):
        info.update(source_run=replay.get("source_run"), catalog=replay.get("catalog"))
    return info


def replayed_run(start: dict) -> str | None:
    """The uid of the raw run that `scatterflow reprocess` replays under this start document's
    new uid; None for a live run."""
    replay = start.get(REPLAY_DOC_KEY)
    if isinstance(replay, dict) and isinstance(replay.get("source_run"), str):
        return replay["source_run"]
    return None
