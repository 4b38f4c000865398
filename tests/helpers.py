"""Test helpers: polls with a deadline that raise TimeoutError naming what did not happen, and
a Tiled client that gives up at once."""
import contextlib
import time

import pytest


def wait_for(predicate, timeout: float, what: str):
    """The first truthy value of ``predicate()`` (exceptions count as not yet), polled every 0.1 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def wait_stopped(service, uid: str, timeout: float = 60):
    """The REST record of run ``uid`` of an in-process Service once it is no longer running."""
    return wait_for(lambda: (r := service.store.get(uid)) is not None and r.status != "running" and r,
                    timeout, f"run {uid[:8]} did not stop")


@contextlib.contextmanager
def one_tiled_attempt():
    """tiled's client retries a refused connection for up to 45 s before the writer sees it
    (then spools); one attempt within 2 s here, so that a few seconds of outage reach the spool."""
    import tiled.client.utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
        mp.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
        yield
