"""Waiting in tests: polls with a deadline that raise TimeoutError naming what did not happen."""
import time


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
