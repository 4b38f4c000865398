"""Is Tiled answering (probed while writes wait in the spool), and recovery of the runs an
earlier process on the same spool directory left "running"."""
from __future__ import annotations

import logging
import time
from collections.abc import Collection

from .layout import ROOT_KEY, TiledLayout
from .metadata import interrupted_metadata

log = logging.getLogger(__name__)


def tiled_answers(uri: str, client=None) -> bool:
    """Cheap liveness probe: GET ``/healthz`` of the server of ``uri``, 1 s timeout, no tiled
    retries; through ``client``'s transport (maybe in-process ASGI) once connected."""
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(uri)
    url = f"{parts.scheme}://{parts.netloc}/healthz"
    try:
        if client is not None:
            r = client.context.http_client.get(url, timeout=1.0)
        else:
            r = httpx.get(url, timeout=1.0, trust_env=False)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


class ProbeClock:
    """When to probe next while writes are spooled: every ``seconds`` s, backing off to up to
    10x that while Tiled does not answer (times from time.monotonic())."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.wait = seconds           # current interval, s
        self.next = 0.0               # monotonic time of the next probe

    def due(self) -> bool:
        return time.monotonic() >= self.next

    def later(self) -> None:
        """Probe again after the current interval (spooling began, or a replay failed)."""
        self.next = time.monotonic() + self.wait

    def no_answer(self) -> None:
        """Tiled did not answer: double the interval (up to 10x) and wait it."""
        self.wait = min(2 * self.wait, 10 * self.seconds)
        self.later()

    def answered(self) -> None:
        self.wait = self.seconds


def mark_interrupted(layout: TiledLayout, writer: str, keep: Collection[str]) -> None:
    """Mark "interrupted" the runs of ``writer`` still "running" (an earlier process on this
    spool directory ended without their stop; its spooled writes are already in), except the
    runs ``keep`` (open in this process); counted in ``layout.stats.interrupted``."""
    from tiled.queries import Key

    root = layout.root()
    layout.stats.requests += 1
    try:
        top = root[ROOT_KEY]
    except KeyError:
        return
    layout.stats.requests += 1
    uids = list(top.search(Key("status") == "running").search(Key("writer") == writer))
    marked = 0
    for uid in uids:          # listed first: updating changes what the search matches
        if uid in keep:
            continue
        layout.stats.requests += 2
        top[uid].update_metadata(metadata=interrupted_metadata())
        layout.stats.interrupted += 1
        marked += 1
        log.warning("Tiled: run %s was left running by an earlier process; marked interrupted", uid)
    if marked:
        log.warning("Tiled: %d run(s) left running by an earlier process on %s marked interrupted; rows "
                    "they had not flushed when it died (up to one flush interval) are not in Tiled", marked, writer)
