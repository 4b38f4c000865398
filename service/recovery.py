"""Events lost on the 0MQ link, fetched back from the beamline's catalogue.

bluesky's 0MQ proxy is PUB/SUB: a slow or congested subscriber loses messages silently. The
RunEngine's own ``TiledWriter`` (bluesky_tiled_plugins) writes every document into the catalogue
over HTTP, so what the link lost is there, once the writer has written it. Ingest sees a loss as
a ``seq_num`` gap, a stop whose ``num_events`` exceeds what arrived, or a ``stream_datum`` range
never seen (service/ingest.py); the run's lane then asks `CatalogRecovery.events` for those
``seq_num``s and routes the frames before any later frame of the run, so the regularizer's
window sees every frame in order.

The writer writes events in batches (``batch_size``, 10000 by default: then only at the stop),
so a gap is awaited for ``catalog.recover_wait_s`` while the run's later frames wait behind it;
what is not there by then is tried again at the stop (``recover_wait_at_stop_s``), and those
frames are fitted after the run's others. Reads follow service/catalog.py: the stream's
``internal`` table gives ``seq_num``, ``time`` and scalars; arrays (inline or external, which Tiled
reads from the detector's file) come from the stream's array nodes, a slice per request.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .catalog import FRAMES_PER_REQUEST, _raw, _shaped, _value, connect
from .publish.tiled_server import TILED_LOCK

log = logging.getLogger(__name__)

POLL_S = 0.25          # between looks at the catalogue while waiting for the writer


@dataclass(frozen=True)
class RecoveredEvent:
    """One event of the catalogue: seq_num, time (s since epoch) and data (arrays in the
    descriptor's shape, scalars as Python numbers)."""
    seq_num: int
    time: float
    data: dict


class CatalogRecovery:
    """Reads lost events of a run's stream from the catalogue at `uri` (a Tiled server fed by
    bluesky's TiledWriter); one client, connected on first use; every request under TILED_LOCK."""

    def __init__(self, uri: str, api_key: str | None, wait_s: float, wait_at_stop_s: float):
        self.uri, self._api_key = uri, api_key
        self.wait_s, self.wait_at_stop_s = wait_s, wait_at_stop_s
        self._client = None

    def events(self, run_uid: str, stream: str, seqs: list[int], fields: list[str], deadline: float,
               give_up: Callable[[], bool] = lambda: False) -> Iterator[RecoveredEvent]:
        """The events `seqs` of `stream` (the descriptor's name) of run `run_uid`, in seq order,
        with the data keys `fields`; waits for the writer until all are there, `deadline`
        (time.monotonic()) passes or `give_up()` is true, then yields those found (the others
        are the caller's to count). A catalogue that cannot be reached yields nothing (logged)."""
        rows = self._locate(run_uid, stream, set(seqs), fields, deadline, give_up)
        found = sorted(rows.items())
        if not found:
            return
        for lo in range(0, len(found), FRAMES_PER_REQUEST):
            chunk = found[lo:lo + FRAMES_PER_REQUEST]
            try:
                yield from self._read(run_uid, stream, chunk, fields)
            except Exception as exc:  # a failing catalogue loses these events, not the run
                log.warning("run %s: reading %d event(s) of %r from the catalogue failed: %s: %s",
                            run_uid[:8], len(chunk), stream, type(exc).__name__, exc)

    # -------------------------------------------------------------------------------------------
    def _node(self, run_uid: str, stream: str):
        """The stream's raw container, or None while the writer has not created it."""
        if self._client is None:
            self._client = connect(self.uri, self._api_key)
        try:
            return _raw(self._client[run_uid][stream])
        except KeyError:
            return None

    def _locate(self, run_uid: str, stream: str, want: set[int], fields: list[str], deadline: float,
                give_up: Callable[[], bool]) -> dict[int, tuple[int, float]]:
        """seq_num -> (row, time) of the wanted events whose rows (and arrays) are written."""
        found: dict[int, tuple[int, float]] = {}
        failure = None
        while True:
            try:
                with TILED_LOCK:
                    node = self._node(run_uid, stream)
                    if node is not None and "internal" in node:
                        table = node["internal"].read(["seq_num", "time"])
                        lengths = [node[f].shape[0] for f in fields if f in node and f != "internal"]
                        written = min(lengths, default=len(table))
                        seq = table["seq_num"].to_numpy()
                        times = table["time"].to_numpy()
                        for row in np.flatnonzero(np.isin(seq, list(want))):
                            if row < written:
                                found[int(seq[row])] = (int(row), float(times[row]))
            except Exception as exc:        # unreachable, refusing, half-written: tried again until the deadline
                if repr(exc) != failure:
                    failure = repr(exc)
                    log.warning("run %s: catalogue %s: %s: %s", run_uid[:8], self.uri, type(exc).__name__, exc)
            if len(found) == len(want) or time.monotonic() >= deadline or give_up():
                return found
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _read(self, run_uid: str, stream: str, chunk: list[tuple[int, tuple[int, float]]],
              fields: list[str]) -> Iterator[RecoveredEvent]:
        """Events of `chunk` [(seq, (row, time))]: arrays from the array nodes (the rows
        spanned, one request each), scalars from the internal table."""
        rows = np.array([r for _, (r, _) in chunk])
        lo, hi = int(rows.min()), int(rows.max()) + 1
        with TILED_LOCK:
            node = self._node(run_uid, stream)
            data_keys = dict(self._client[run_uid][stream].metadata.get("data_keys") or {})
            columns = set(node["internal"].structure().columns)
            scalars = [f for f in fields if f in columns]
            table = node["internal"].read(scalars) if scalars else None
            arrays = {f: _shaped(np.asarray(node[f][lo:hi]), data_keys.get(f, {}))
                      for f in fields if f not in columns and f in node}
        for seq, (row, t) in chunk:
            data = {f: _value(table[f].to_numpy()[row]) for f in scalars}
            data.update({f: a[row - lo] for f, a in arrays.items()})
            yield RecoveredEvent(seq, t, data)
