"""The caller side of the Tiled writer: checks and copies what callers hand in, queues it for
the writer thread (writer.py), and waits for it on flush, drain and close. Never does HTTP."""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ...config import TiledConfig
from ...jsonsafe import jsonable
from .buffer import FlushPolicy, PeakTable, ProfileRows, Snapshot, StackRows, TableRows
from .layout import ARRAY_KEYS, TABLE_KEYS, TiledLayout, rows_to_table
from .metadata import start_metadata, stop_metadata
from .ops import Op
from .spool import Spool
from .stats import WriterStats
from .writer import Add, Close, Flush, Message, Start, Stop, Writer

log = logging.getLogger(__name__)

FLUSH_ROWS: int = TiledConfig.model_fields["flush_rows"].default
FLUSH_SECONDS: float = TiledConfig.model_fields["flush_seconds"].default


@dataclass
class _OpenRun:
    """Caller-side checks of an open run: what later calls must agree with."""
    bins: int | None = None
    snapshot_shape: tuple | None = None
    stack_shapes: dict[str, dict] = field(default_factory=dict)   # stack name -> row shapes


def _stat(name: str) -> property:
    return property(lambda self: getattr(self.stats, name), doc=f"WriterStats.{name}")


class TiledPublisher:
    """Route results of many runs into Tiled; one buffer per run, one writer thread.

    Parameters
    ----------
    client_or_uri : a tiled client (root node), or a uri string connected lazily on the
        writer thread (so a server that is not up yet only delays writes into the spool).
    api_key : for a uri string.
    spool_dir : where writes wait while Tiled is unreachable; a fresh temporary directory
        if None (left in place, and logged, if it still holds files at `close`).
    flush_rows : flush a run when this many frames or peak rows are buffered (>= 1);
        while calls wait in the queue, batches grow up to 8x this before flushing.
        Default: ``TiledConfig.flush_rows``.
    flush_seconds : flush a run this long after its first buffered item (> 0), s.
        Default: ``TiledConfig.flush_seconds``.
    queue_size : bound of the caller -> writer queue, in calls; full means the caller blocks
        (1024: a minute of calls at 5 frames/s, while tiled's client retries a first write).
    max_retries : retries of a failed write (after tiled's own) before spooling it.
    retry_backoff : first retry delay in s, doubled per retry.
    probe_seconds : interval of health probes while spooling, s.

    Counters (read from any thread; `WriterStats`): ``frames_written``, ``rows_written``
    (peak rows), ``snapshots_written``, ``requests``, ``failures``, ``spooled``, ``blocked``,
    ``errors``, ``interrupted``; ``spool_pending`` (files waiting). ``writer``: this
    publisher's identity in run metadata, ``host:spool directory``.
    """

    frames_written = _stat("frames_written")
    rows_written = _stat("rows_written")
    snapshots_written = _stat("snapshots_written")
    requests = _stat("requests")
    failures = _stat("failures")
    spooled = _stat("spooled")
    blocked = _stat("blocked")
    errors = _stat("errors")
    interrupted = _stat("interrupted")

    def __init__(self, client_or_uri, api_key: str | None = None, *, spool_dir=None,
                 flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS,
                 queue_size: int = 1024, max_retries: int = 2, retry_backoff: float = 0.25,
                 probe_seconds: float = 1.0):
        _check_options(flush_rows, flush_seconds, queue_size, max_retries, retry_backoff, probe_seconds)
        self.flush_rows, self.flush_seconds = flush_rows, float(flush_seconds)
        self.max_retries, self.retry_backoff = max_retries, float(retry_backoff)
        self.probe_seconds = float(probe_seconds)
        self.stats = WriterStats()
        layout = TiledLayout(client_or_uri, api_key, self.stats)
        self._spool = Spool(spool_dir)              # files left by an earlier process: drained first
        self.spool_dir = self._spool.directory
        self.writer = f"{socket.gethostname()}:{self.spool_dir.resolve()}"
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=queue_size)
        self._writer = Writer(self._queue, layout, self._spool,
                              FlushPolicy(self.flush_rows, self.flush_seconds),
                              writer_id=self.writer, max_retries=self.max_retries,
                              retry_backoff=self.retry_backoff, probe_seconds=self.probe_seconds)
        self._open: dict[str, _OpenRun] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._writer.run, name="tiled-writer", daemon=True)
        self._thread.start()

    @property
    def spool_pending(self) -> int:
        """Writes waiting in the spool."""
        return self._spool.pending

    # --- caller API (any thread; never does HTTP) ------------------------------------

    def start_run(self, uid: str, start_doc: dict, config: dict, metadata: dict | None = None) -> None:
        """Begin run ``uid``: container ``scatterflow/<uid>`` with status "running";
        ``metadata`` (JSON-able) adds keys to the container's metadata (source_run, detector, ...)."""
        if not isinstance(uid, str) or not uid or "/" in uid:
            raise ValueError(f"run uid must be a non-empty string without '/', got {uid!r}")
        if uid in self._open:
            raise ValueError(f"run {uid!r} already started")
        self._open[uid] = _OpenRun()
        self._put(Start(uid, start_metadata(start_doc, config, self.writer, metadata)))

    def add_profiles(self, uid: str, seq_num, time, q, intensity, sigma, unit: str) -> None:
        """Queue B frames: seq_num (B,) int, time (B,) s, q (N,) in ``unit``,
        intensity/sigma (B, N) (stored float32). Copies, so the caller may reuse buffers."""
        run = self._run(uid)
        rows = ProfileRows.parse(seq_num, time, q, intensity, sigma, unit)
        n = len(rows.q)
        if run.bins is None:
            run.bins = n
        if run.bins != n:
            raise ValueError(f"run {uid!r} has {run.bins} bins, got profiles with {n}")
        if len(rows.seq_num):
            self._put(Add(uid, rows))

    def add_peaks(self, uid: str, rows: dict[str, np.ndarray]) -> None:
        """Queue PeakRows (dict of equal-length arrays, keys PEAK_COLUMNS)."""
        self._run(uid)
        table = rows_to_table(rows)
        if table.num_rows:
            self._put(Add(uid, PeakTable(table)))

    def add_table(self, uid: str, key: str, rows: dict[str, Any]) -> None:
        """Queue rows (dict of equal-length columns) for the table ``key`` of run ``uid``,
        created with the first rows' schema on the first append (later rows must match it)."""
        if key in TABLE_KEYS or not key.isidentifier():
            raise ValueError(f"table key must be an identifier other than the built-in tables, got {key!r}")
        self._run(uid)
        table = pa.table({c: np.asarray(v) for c, v in rows.items()})
        if table.num_rows:
            self._put(Add(uid, TableRows(key, table)))

    def add_stack(self, uid: str, name: str, seq_num, time, arrays: dict, axes: dict | None = None,
                  metadata: dict | None = None) -> None:
        """Queue B rows of arrays that grow with frames: ``arrays`` {key: (B, ...)} appended
        (float32) along axis 0 to the arrays ``key`` of run ``uid``, created with the first rows
        and ``metadata`` (JSON-able); seq_num (B,) and time (B,) s appended to the table
        ``<name>_frames``; ``axes`` {key: (n,)} (bin centres, float64) written with the first
        rows. Keys and row shapes of a ``name`` must stay the same. Copies the data."""
        taken = ARRAY_KEYS + TABLE_KEYS
        keys = [name, f"{name}_frames", *arrays, *(axes or {})]
        if not arrays or any(not str(k).isidentifier() or k in taken for k in keys):
            raise ValueError(f"stack {name!r}: keys must be identifiers other than {taken}, got {keys}")
        run = self._run(uid)
        rows = StackRows.parse(name, seq_num, time, arrays, axes, jsonable(metadata or {}))
        shapes = rows.row_shapes()
        known = run.stack_shapes.setdefault(name, shapes)
        if known != shapes:
            raise ValueError(f"stack {name!r} of run {uid!r} has rows {known}, got {shapes}")
        if len(rows.seq_num):
            self._put(Add(uid, rows))

    def add_snapshot(self, uid: str, seq_num: int, image, time: float = float("nan")) -> None:
        """Queue one 2D snapshot of frame ``seq_num`` (``time`` in s, NaN if unknown):
        ``image`` (h, w), stored float32 (NaN = masked), the same shape for every snapshot of
        a run. Appended to the array ``snapshots`` (k, h, w) and the table ``snapshot_frames``
        in call order. Copies, so the caller may reuse buffers."""
        run = self._run(uid)
        snap = Snapshot.parse(seq_num, image, time)
        if run.snapshot_shape is None:
            run.snapshot_shape = snap.image.shape
        if run.snapshot_shape != snap.image.shape:
            raise ValueError(f"run {uid!r} has snapshots of shape {run.snapshot_shape}, "
                             f"got {snap.image.shape}")
        self._put(Add(uid, snap))

    def stop_run(self, uid: str, exit_status: str, reason: str = "", status: str | None = None) -> None:
        """Flush run ``uid`` and set its status (`stop_metadata`)."""
        metadata = stop_metadata(exit_status, reason, status)
        self._run(uid)
        del self._open[uid]
        self._put(Stop(uid, metadata))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is written to Tiled or spooled."""
        done = threading.Event()
        self._put(Flush(done))
        return done.wait(timeout)

    def drain(self, timeout: float = 30.0) -> bool:
        """Flush, then wait until the spool is empty (Tiled reachable); False on timeout."""
        deadline = time.monotonic() + timeout
        if not self.flush(timeout):
            return False
        while self.spool_pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Flush all runs, try to drain the spool for up to ``timeout`` s, stop the thread.
        What is not in Tiled by then (Tiled unreachable, or slower than the results came) goes
        to the spool, which the next publisher on ``spool_dir`` drains: nothing is dropped."""
        if self._closed:
            return
        if not self.drain(timeout):
            self._writer.spool_only = True      # the writer thread spools the rest, without Tiled
        self._closed = True
        self._put(Close())
        # spooling takes ms per write
        self._thread.join(max(timeout, 5.0) if self._writer.spool_only else timeout)
        if self.spool_pending:
            log.warning("Tiled unreachable or slow: %d writes remain spooled in %s (written by the next start)",
                        self.spool_pending, self.spool_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _execute(self, op: Op, check: bool) -> None:
        """Write ``op`` now on the calling thread (tests replay ops; the writer thread must be
        idle: after `drain`)."""
        self._writer.execute(op, check)

    def _run(self, uid: str) -> _OpenRun:
        run = self._open.get(uid)
        if run is None:
            raise ValueError(f"run {uid!r} was not started (or already stopped)")
        return run

    def _put(self, msg: Message) -> None:
        if self._closed and not isinstance(msg, Close):
            raise RuntimeError("TiledPublisher is closed")
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.stats.blocked += 1
            self._queue.put(msg)


def _check_options(flush_rows, flush_seconds, queue_size, max_retries, retry_backoff, probe_seconds) -> None:
    """ValueError naming the first bad option."""
    if not isinstance(flush_rows, int) or flush_rows < 1:
        raise ValueError(f"flush_rows must be an int >= 1, got {flush_rows!r}")
    if not flush_seconds > 0:
        raise ValueError(f"flush_seconds must be > 0, got {flush_seconds!r}")
    if not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if not retry_backoff >= 0 or not probe_seconds > 0:
        raise ValueError(f"retry_backoff must be >= 0 and probe_seconds > 0, got "
                         f"{retry_backoff!r}, {probe_seconds!r}")
