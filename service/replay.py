"""Past runs analysed again: raw runs from the catalogue (service/catalog.py) routed through an
in-process service, as fast as the workers take them (the dispatcher's back-pressure).

Several runs are read at once (one reader thread each, a bounded queue of documents) and routed
in turn, so the dispatcher places them on its workers side by side: with ``workers.count`` > 1
or the Ray engine, a beamtime fans out over the pool. Each run becomes a new analysis run whose
start links its source (``REPLAY_DOC_KEY``; ``source_run`` in Tiled and REST,
``source_run_uid`` in the results stream); the configuration is the one given here.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .catalog import RawRun, connect, raw_run, replay_documents
from .config import Settings, secret

log = logging.getLogger(__name__)

QUEUE_DOCUMENTS = 64           # documents read ahead per run


@dataclass(frozen=True)
class ReplayOutcome:
    source_uid: str
    analysis_uid: str
    status: str                # the analysis run's final status (complete, failed, ...), or "error"
    frames: int                # events of the source's streams replayed
    frames_final: int
    detail: str = ""


def replay_runs(settings: Settings, uids: list[str], *, timeout_s: float = 3600.0,
                progress: Callable[[str, int, int, int], None] | None = None) -> list[ReplayOutcome]:
    """Analyse runs `uids` of the catalogue ``settings.catalog`` again with `settings`; returns
    one outcome per run, in order. ``progress(source_uid, frames, fitted, final)`` is called
    while they run. The service is started here and closed before returning."""
    from .server import Service
    if not settings.catalog.uri:
        raise ValueError("no catalogue: set catalog.uri (or SCATTERFLOW_CATALOG__URI, or --catalog)")
    client = connect(settings.catalog.uri, secret(settings.catalog.api_key))
    runs = [raw_run(client, uid) for uid in uids]
    service = Service(settings).start()
    try:
        new_uids = _route_all(service, client, runs, settings.catalog.uri)
        deadline = time.monotonic() + timeout_s
        while True:
            records = [service.store.get(new) for new in new_uids]
            for run, r in zip(runs, records):
                if progress is not None and r is not None:
                    progress(run.uid, sum(run.events.values()), r.frames_fitted, r.frames_final)
            if all(r is not None and r.status != "running" for r in records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        outcomes = []
        for run, new, r in zip(runs, new_uids, records):
            frames = sum(run.events.values())
            outcomes.append(ReplayOutcome(run.uid, new, "error", frames, 0, "the service never saw the run")
                            if r is None else ReplayOutcome(run.uid, new, r.status, frames, r.frames_final,
                                                            r.reason or ""))
        return outcomes
    finally:
        service.close()


def _route_all(service, client, runs: list[RawRun], catalog: str) -> list[str]:
    """Read every run on a thread of its own and route their documents in turn, each run's in
    its order; returns the new (analysis) start uids."""
    queues = [queue.Queue(maxsize=QUEUE_DOCUMENTS) for _ in runs]
    new_uids: list[str] = []
    readers = []
    for run, q in zip(runs, queues):
        new = str(uuid.uuid4())
        new_uids.append(new)
        t = threading.Thread(target=_read, args=(client, run, catalog, new, q), name=f"replay-{run.uid[:8]}",
                             daemon=True)
        t.start()
        readers.append(t)
    open_ = set(range(len(runs)))
    while open_:
        for i in sorted(open_):
            try:
                item = queues[i].get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                open_.discard(i)
                continue
            name, doc = item
            service.router.route(name, doc, time.monotonic())
    return new_uids


def _read(client, run: RawRun, catalog: str, new_uid: str, out: queue.Queue) -> None:
    """Reader thread: the run's documents into `out`, then None. A read that fails ends the run
    with an abort stop, so the analysis closes with the reason instead of waiting."""
    started = False
    try:
        for name, doc in replay_documents(client, run, catalog, new_uid=new_uid):
            started = started or name == "start"
            out.put((name, doc))
    except Exception as exc:
        log.error("replay of run %s: reading from the catalogue failed: %s", run.uid[:8], exc)
        if started:
            out.put(("stop", {"uid": f"{new_uid}-abort", "run_start": new_uid, "time": time.time(),
                              "exit_status": "abort", "reason": f"catalogue read failed: {exc}"[:400]}))
    finally:
        out.put(None)
