"""Analysis runs as BlueskyRuns in Tiled: the documents of the results stream
(service/publish/results.py: start with ``source_run_uid``, streams ``primary`` with the final
fits, ``provisional``, ``profiles``, ``phases``, ...) written by ``bluesky_tiled_plugins.TiledWriter``
(the writer bluesky's own RunEngines use), so that any Tiled or databroker client finds them
beside the raw runs:

    from tiled.client import from_uri
    from tiled.queries import Key
    (analysis,) = from_uri(uri, api_key=...).search(Key("start.source_run_uid") == uid).values()
    analysis["primary"].read()          # one row per frame: source_seq_num, <peak>_center, ...

Writing happens on a thread of its own, from a bounded queue, so Tiled's pace never holds the
hub; ``TiledWriter`` batches events per stream (``batch_size``) and writes the rest at the stop
document. A run whose writing fails is counted (``failed``) and logged once; its later documents
are skipped (the scatterflow/<uid> container and REST still hold the results). A full queue
drops documents, counted in ``dropped``.

Documents go through bluesky's RunNormalizer (`EventNormalizer`, which validates events without
printing their arrays), as with TiledWriter's default.
"""
from __future__ import annotations

import logging
import queue
import threading

from bluesky_tiled_plugins import TiledWriter
from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer
from event_model import DocumentNames, schema_validators

from .tiled_server import TILED_LOCK

log = logging.getLogger(__name__)

QUEUE_DOCUMENTS = 100_000
FREE_FORM = ("data", "timestamps")      # event keys whose values the event schema leaves free


class EventNormalizer(RunNormalizer):
    """bluesky's RunNormalizer, each event schema-validated with its ``data`` and ``timestamps``
    emptied: the same verdict, since the schema requires only that they be objects
    (tests/test_tiled_writer.py checks this of the installed event-model), without the cost of the
    full check. jsonschema checks the event's ``unevaluatedProperties: false`` by building an error
    message with the repr of each top-level value, so a ``profiles`` event had numpy print its
    three 800-bin arrays: about 15 ms per event on 2 cores, most of this writer's CPU (8-9 ms of
    the service's 17-18 ms per frame at 50 frames/s)."""

    def emit(self, name, doc):
        if name == DocumentNames.event:
            schema_validators[name].validate(
                {k: {} if k in FREE_FORM and isinstance(v, dict) else v for k, v in doc.items()})
        else:
            schema_validators[name].validate(doc)
        self.dispatcher.process(name, doc)


class CatalogWriter:
    """``put(name, doc)`` from any thread; `close` writes what is queued (bounded wait)."""

    def __init__(self, client, *, batch_size: int = 500):
        self._writer = TiledWriter(client, batch_size=batch_size, normalizer=EventNormalizer)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DOCUMENTS)
        self._broken: set[str] = set()         # start uids whose writing failed
        self._runs: dict[str, str] = {}        # descriptor uid -> start uid
        self.written = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="catalog-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, doc: dict) -> None:
        try:
            self._queue.put_nowait((name, doc))
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, doc = item
            run = self._run_of(name, doc)
            if run in self._broken:
                continue
            try:
                with TILED_LOCK:
                    self._writer(name, doc)
                self.written += 1
            except Exception as exc:           # Tiled refused or unreachable: this run is left out
                self.failed += 1
                self._broken.add(run)
                log.error("analysis run %s: writing it to Tiled as a BlueskyRun failed (%s: %s); its further "
                          "documents are skipped", run[:8], type(exc).__name__, str(exc)[:300])

    def _run_of(self, name: str, doc: dict) -> str:
        if name == "start":
            return doc["uid"]
        if name == "descriptor":
            self._runs[doc["uid"]] = doc["run_start"]
            return doc["run_start"]
        if name in ("event", "event_page"):
            return self._runs.get(doc["descriptor"], "")
        return doc.get("run_start", "")

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to `timeout` s), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("analysis runs: %d documents not written to Tiled at close", self._queue.qsize())
