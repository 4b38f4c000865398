"""Logging of the CLI and the worker processes: one format, and the libraries' chatter kept out
of the way of what the operator must see (their warnings and errors still show)."""
from __future__ import annotations

import logging

#: logger -> lowest level shown unless --verbose. pyFAI and numexpr log set-up details at INFO on
#: every command; silx warns on every import that pyOpenCL is missing (torch does the GPU work here);
#: bluesky's RunEngine (demo, bench) logs each plan's start and state changes, with object addresses.
QUIET = {"httpx": logging.WARNING, "httpcore": logging.WARNING, "tiled": logging.WARNING,
         "uvicorn.access": logging.WARNING, "alembic": logging.WARNING, "numexpr": logging.WARNING,
         "pyFAI": logging.WARNING, "fabio": logging.WARNING, "silx": logging.ERROR, "bluesky": logging.WARNING}


def configure(verbose: bool = False, fmt: str = "%(asctime)s %(name)s %(levelname)s %(message)s") -> None:
    """Root logging at INFO (DEBUG with `verbose`) in format `fmt`, the `QUIET` loggers at their level."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    if not verbose:
        for name, level in QUIET.items():
            logging.getLogger(name).setLevel(level)
