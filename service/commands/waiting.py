"""Waiting for a run to finish in an in-process `Service` (the demos and `scatterflow bench`)."""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


def wait_finished(service, uid: str, timeout: float, progress: Callable[[int, int], None] | None = None,
                  stall_s: float | None = None):
    """The run's store entry (None if never seen) once it is no longer running, at ``timeout``
    (s), or, with ``stall_s``, when nothing was fitted or finalised for ``stall_s`` s (frames and
    the stop document lost upstream: 0MQ PUB/SUB drops at its high-water marks when the sender
    outruns the service for long). ``progress(frames_fitted, frames_final)`` is called each poll."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        run = service.store.get(uid)
        if progress is not None and run is not None:
            progress(run.frames_fitted, run.frames_final)
        if run is not None and run.status != "running":
            return run
        state = None if run is None else (run.frames_fitted, run.frames_final)
        if state != last:
            last, since = state, time.monotonic()
        elif stall_s is not None and time.monotonic() - since > stall_s:
            log.warning("run %s: no progress for %.0f s; the stop document was lost upstream", uid[:8], stall_s)
            return run
        time.sleep(0.1)
    log.warning("run %s still running after %.0f s", uid[:8], timeout)
    return service.store.get(uid)
