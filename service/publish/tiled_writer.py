"""Write analysis results into Tiled, batched, on a writer thread, with a local spool.

Layout (DESIGN.md "Tiled layout")::

    scatterflow/                      container, created if missing
      <source run uid>/               container; metadata: start (source start document),
                                      configuration, software, status, exit_status, reason
        q            (N,) float64     radial bin centres; metadata {"unit": ...}
        profiles     (frames, N) f32  mean intensity per bin, appended as frames arrive
        sigma        (frames, N) f32  its standard error
        frames       table            seq_num int64, time float64 (one row per profile row)
        peaks        table            PEAK_COLUMNS, one row per frame, peak and result
                                      (provisional final=False, then final=True)
        change_points table           the peaks rows flagged change_point=True
        snapshots    (k, h, w) f32    corrected 2D frames (raw - dark) / (flat·Ω·P), block-
                                      averaged, NaN = masked; only if the run sends any
        snapshot_frames table         seq_num int64, time float64: one row per snapshot
        phases       table            per frame: phase label, probability, crystallinity index
                                      (PHASE_COLUMNS of workers/phase.py), provisional then final
        phase_transitions table       from, to, seq_num, time, time_sigma, frame_sigma, change_point
        <other>      table            any table a feature adds with `add_table` (created on first append)
        qmap         (k, Nz, Nxy) f32 grazing-incidence (q_xy, q_z) maps, NaN = no pixel (missing
                                      wedge, off detector); axes q_xy (Nxy,), q_z (Nz,) 1/nm;
                                      frames in qmap_frames (service/modalities.py)
        <profile>    (frames, N) f32  extra profiles of a modality (in_plane, vertical_cut), with
                                      <profile>_sigma, <profile>_radial (N,), <profile>_frames
        scalars      table            seq_num, time and per-frame scalars (hermans_orientation)

    A run with several detectors has one container per detector, ``scatterflow/<uid>.<detector>``,
    with metadata ``source_run`` (the run's uid) and ``detector`` (service/detectors.py).

Writes are batched by size (``flush_rows`` frames or peak rows) and by time
(``flush_seconds`` after the first buffered item) and at stop: Tiled serves about 20 write
requests/s on 2 cores, so one flush costs 3-5 requests whatever its size. The caller only
enqueues onto a bounded queue (blocking when full, counted in ``blocked``); a dedicated
thread buffers, flushes and retries.

Idempotence, so that retries and the spool neither lose nor duplicate: every write
carries its explicit position (frame or snapshot offset for array patches, row offset
for table appends). A patch at an offset overwrites, so it can be repeated; before repeating a
table append, the writer reads the table's row count and skips the append if the rows
are already there. When Tiled stays unreachable, writes go to ``spool_dir`` as numbered
``.npz``/``.parquet`` files, and everything after them too (order is kept); a health probe
every ``probe_seconds`` drains the spool in order once Tiled answers again. Spool files
left by a previous process are drained first.

Runs a previous process left "running" (killed, or stopped before the run's stop document)
are marked "interrupted" when a publisher starts: each run's metadata names its ``writer``
(host and spool directory); once the spool a new publisher on the same directory found is
drained into Tiled, it sets status "interrupted" on that writer's running runs (except its own).

Note: the tiled client retries each request itself (env ``TILED_RETRY_ATTEMPTS``,
default 10, within ``TILED_RETRY_TIMEOUT``, default 45 s) before this module sees the
failure; lower them where a faster switch to the spool matters.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import os
import pathlib
import queue
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .state import PEAK_COLUMNS  # one definition in service; workers.fit mirrors it

log = logging.getLogger(__name__)

_FLOAT_COLUMNS = ("time", "center", "center_err", "fwhm", "fwhm_err", "amplitude",
                  "amplitude_err", "eta", "chi2")
_BOOL_COLUMNS = ("converged", "change_point", "final")
PEAK_SCHEMA = pa.schema(
    [("seq_num", pa.int64()), ("peak", pa.string())]
    + [(c, pa.float64()) for c in _FLOAT_COLUMNS]
    + [(c, pa.bool_()) for c in _BOOL_COLUMNS]
)
PEAK_SCHEMA = pa.schema([PEAK_SCHEMA.field(c) for c in PEAK_COLUMNS])  # column order
FRAME_SCHEMA = pa.schema([("seq_num", pa.int64()), ("time", pa.float64())])
SNAPSHOT_SCHEMA = FRAME_SCHEMA          # snapshot_frames: one row per snapshot
_SNAPSHOT_BATCH = 16    # flush a run holding this many snapshots (~256 KB each) whatever else
EXIT_STATUS_TO_STATUS = {"success": "complete", "abort": "interrupted", "fail": "interrupted"}
ROOT_KEY = "scatterflow"
RESTART_REASON = "service restarted before the run ended; results up to then are kept"
_BACKLOG_FACTOR = 8     # with a queue backlog, batches grow up to this many flush_rows


class TiledWriteError(RuntimeError):
    """A write Tiled refused for good (not a connection problem); logged, counted, dropped."""


class _RowCountMismatch(TiledWriteError):
    """A table holds neither the rows before an append nor those after it.

    Seen when concurrent requests hit tiled's DuckDB storage (one shared connection,
    SimpleTiledServer): a read can fail or return another query's rows. Re-checked later
    (transient) up to ``_MAX_RECHECKS`` times, then the write is dropped."""


_MAX_RECHECKS = 5


def software_versions() -> dict[str, str]:
    """Versions of scatterflow and the numerics stack, read without importing them."""
    out = {}
    for dist in ("scatterflow", "torch", "pyFAI", "tiled", "bluesky", "event-model"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays and tuples into JSON-serializable Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def rows_to_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """PeakRows (dict of equal-length arrays keyed by PEAK_COLUMNS) -> pyarrow Table."""
    missing = set(PEAK_COLUMNS) - set(rows)
    extra = set(rows) - set(PEAK_COLUMNS)
    if missing or extra:
        raise ValueError(f"peak rows need exactly PEAK_COLUMNS; missing {sorted(missing)}, "
                         f"unexpected {sorted(extra)}")
    lengths = {c: len(rows[c]) for c in PEAK_COLUMNS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"peak row columns have different lengths: {lengths}")
    arrays = [pa.array(np.asarray(rows[f.name]).astype(f.type.to_pandas_dtype())
                       if f.name != "peak" else [str(p) for p in rows["peak"]], type=f.type)
              for f in PEAK_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=PEAK_SCHEMA)


def _is_transient(exc: BaseException) -> bool:
    """Connection problems and 5xx/429 are worth retrying; anything else is permanent."""
    import httpx

    if isinstance(exc, _RowCountMismatch):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code == 429
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError, OSError))


def _is_conflict(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 409


# --- operations: one Tiled write each, carrying their own position -----------------------

@dataclass
class _Op:
    kind: str                       # "start" | "profiles" | "snapshots" | "table" | "stop"
    uid: str
    meta: dict = field(default_factory=dict)      # JSON-able; offsets, keys, metadata
    arrays: dict = field(default_factory=dict)    # numpy arrays ("profiles", "snapshots")
    table: pa.Table | None = None                 # rows ("table")


def _save_op(op: _Op, path_stem: pathlib.Path) -> pathlib.Path:
    """Write an op atomically as ``<stem>.parquet`` (tables) or ``<stem>.npz``."""
    header = json.dumps({"kind": op.kind, "uid": op.uid, "meta": op.meta})
    if op.kind == "table":
        import pyarrow.parquet as pq

        final = path_stem.with_suffix(".parquet")
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(op.table.replace_schema_metadata({"scatterflow_op": header}), tmp)
    else:
        final = path_stem.with_suffix(".npz")
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, __op__=np.array(header), **op.arrays)
    os.replace(tmp, final)
    return final


def _load_op(path: pathlib.Path) -> _Op:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        header = json.loads(table.schema.metadata[b"scatterflow_op"])
        return _Op(header["kind"], header["uid"], header["meta"],
                   table=table.replace_schema_metadata(None))
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["__op__"]))
        arrays = {k: z[k] for k in z.files if k != "__op__"}
    return _Op(header["kind"], header["uid"], header["meta"], arrays=arrays)


_MERGEABLE = ("profiles", "table")


def _merge(a: _Op, b: _Op) -> _Op | None:
    """One op writing what `a` then `b` write, when `b` continues `a` (same run, kind and
    table, `b` at the offset where `a` ends); None otherwise."""
    if a.kind != b.kind or a.uid != b.uid or a.kind not in _MERGEABLE:
        return None
    if a.kind == "table":
        if (a.meta["key"] != b.meta["key"] or b.meta["offset"] != a.meta["offset"] + a.table.num_rows
                or not a.table.schema.equals(b.table.schema)):
            return None
        return _Op("table", a.uid, dict(a.meta), table=pa.concat_tables([a.table, b.table]))
    if (set(a.arrays) != set(b.arrays) or b.meta != {**a.meta, "offset": b.meta["offset"]}
            or b.meta["offset"] != a.meta["offset"] + len(a.arrays["seq_num"])
            or not np.array_equal(a.arrays["q"], b.arrays["q"])):
        return None
    arrays = {k: v if k == "q" else np.concatenate([v, b.arrays[k]]) for k, v in a.arrays.items()}
    return _Op("profiles", a.uid, dict(a.meta), arrays=arrays)


def _coalesce(items: list[tuple[pathlib.Path, _Op]]) -> list[tuple[_Op, list[pathlib.Path]]]:
    """Spooled ops (in spool order) as fewer ops, each with the files it replaces: writes that
    continue an earlier one to the same array or table are merged into it. Order is kept per
    array or table; any other op (start, stop, snapshots, ...) is a barrier: what came before
    it is written before it. Replaying a merged op stays idempotent (positions are explicit)."""
    out: list[tuple[_Op, list[pathlib.Path]]] = []
    open_groups: dict[tuple, int] = {}          # (uid, kind, table key) -> index in out
    for path, op in items:
        if op.kind not in _MERGEABLE:
            open_groups.clear()
            out.append((op, [path]))
            continue
        target = (op.uid, op.kind, op.meta.get("key"))
        i = open_groups.get(target)
        merged = _merge(out[i][0], op) if i is not None else None
        if merged is not None:
            out[i] = (merged, out[i][1] + [path])
        else:
            open_groups[target] = len(out)
            out.append((op, [path]))
    return out


# --- per-run buffers, owned by the writer thread ---------------------------------------

@dataclass
class _RunBuffer:
    uid: str
    n_bins: int | None = None
    frames: int = 0                 # frames handed to ops so far (next profile offset)
    table_rows: dict = field(default_factory=lambda: {"peaks": 0, "change_points": 0})
    profiles: list = field(default_factory=list)   # list of (seq, time, q, I, s, unit)
    peaks: list = field(default_factory=list)      # list of pa.Table
    snapshots: list = field(default_factory=list)  # list of (seq, time, image (h, w) f32)
    tables: dict = field(default_factory=dict)     # key -> list of pa.Table (add_table)
    stacks: dict = field(default_factory=dict)     # name -> list of add_stack payloads
    stack_rows: dict = field(default_factory=dict)  # name -> rows handed to ops so far (next offset)
    n_snapshots: int = 0            # snapshots handed to ops so far (next snapshot offset)
    buffered_frames: int = 0
    buffered_rows: int = 0
    first_buffered: float | None = None


class TiledPublisher:
    """Route results of many runs into Tiled; one `_RunBuffer` per run, one writer thread.

    Parameters
    ----------
    client_or_uri : a tiled client (root node), or a uri string connected lazily on the
        writer thread (so a server that is not up yet only delays writes into the spool).
    api_key : for a uri string.
    spool_dir : where writes wait while Tiled is unreachable; a fresh temporary directory
        if None (left in place, and logged, if it still holds files at `close`).
    flush_rows : flush a run when this many frames or peak rows are buffered (>= 1);
        while calls wait in the queue, batches grow up to 8x this before flushing.
    flush_seconds : flush a run this long after its first buffered item (> 0).
    queue_size : bound of the caller -> writer queue, in calls; full means the caller blocks
        (1024: a minute of calls at 5 frames/s, while tiled's client retries a first write).
    max_retries : retries of a failed write (after tiled's own) before spooling it.
    retry_backoff : first retry delay in s, doubled per retry.
    probe_seconds : interval of health probes while spooling, s.

    Counters (read from any thread): ``frames_written``, ``rows_written`` (peak rows),
    ``snapshots_written``,
    ``requests`` (write/read calls made), ``failures`` (failed attempts), ``spooled``
    (writes that went to the spool), ``spool_pending`` (files waiting), ``blocked``
    (caller waits on a full queue), ``errors`` (writes refused for good and dropped),
    ``interrupted`` (runs of an earlier process marked "interrupted"). ``writer``: this
    publisher's identity in run metadata, ``host:spool directory``.
    """

    def __init__(self, client_or_uri, api_key: str | None = None, *, spool_dir=None,
                 flush_rows: int = 200, flush_seconds: float = 0.5, queue_size: int = 1024,
                 max_retries: int = 2, retry_backoff: float = 0.25,
                 probe_seconds: float = 1.0):
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
        if isinstance(client_or_uri, str):
            self._uri, self._client = client_or_uri, None
        else:
            self._uri, self._client = str(client_or_uri.uri), client_or_uri
        self._api_key = api_key
        self.flush_rows, self.flush_seconds = flush_rows, float(flush_seconds)
        self.max_retries, self.retry_backoff = max_retries, float(retry_backoff)
        self.probe_seconds = float(probe_seconds)
        self.spool_dir = pathlib.Path(spool_dir or tempfile.mkdtemp(prefix="scatterflow-spool-"))
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.writer = f"{socket.gethostname()}:{self.spool_dir.resolve()}"
        existing = self._spool_files()      # left by an earlier process: drained first
        start = 1 + max((int(p.name.split("-", 1)[0]) for p in existing), default=-1)
        self._spool_counter = itertools.count(start)
        self.frames_written = self.rows_written = self.requests = self.snapshots_written = 0
        self.failures = self.spooled = self.blocked = self.errors = self.interrupted = 0
        self.spool_pending = len(existing)
        self._next_probe = 0.0
        self._probe_wait = self.probe_seconds
        self._runs: dict[str, _RunBuffer] = {}        # writer thread only
        self._nodes: dict[str, dict] = {}             # writer thread only: node cache
        self._caller_bins: dict[str, int] = {}        # caller side checks
        self._caller_snap_shape: dict[str, tuple] = {}
        self._caller_stacks: dict[tuple, dict] = {}   # (uid, name) -> row shapes (add_stack)
        self._open: set[str] = set()
        self._rechecks: dict[tuple, int] = {}         # row-count mismatches per append
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._recover_due = True        # runs an earlier process left open: marked once the old spool is in
        self._last_drain = 0.0          # time.monotonic() of the last drain step
        self._spool_only = False        # closing with writes left: spool them, no more Tiled requests
        self._thread = threading.Thread(target=self._loop, name="tiled-writer", daemon=True)
        self._thread.start()

    # --- caller API (any thread; never does HTTP) ------------------------------------

    def start_run(self, uid: str, start_doc: dict, config: dict, metadata: dict | None = None) -> None:
        """Begin run ``uid``: container ``scatterflow/<uid>`` with status "running";
        ``metadata`` (JSON-able) adds keys to the container's metadata (source_run, detector, ...)."""
        if not isinstance(uid, str) or not uid or "/" in uid:
            raise ValueError(f"run uid must be a non-empty string without '/', got {uid!r}")
        if uid in self._open:
            raise ValueError(f"run {uid!r} already started")
        self._open.add(uid)
        meta = {"start": jsonable(start_doc), "configuration": jsonable(config),
                "software": software_versions(), "status": "running",
                "exit_status": None, "reason": "", "writer": self.writer, **jsonable(metadata or {})}
        self._put(("start", uid, meta))

    def add_profiles(self, uid: str, seq_num, time, q, intensity, sigma, unit: str) -> None:
        """Queue B frames: seq_num (B,) int, time (B,) s, q (N,) in ``unit``,
        intensity/sigma (B, N) (stored float32). Copies, so the caller may reuse buffers."""
        self._check_open(uid)
        seq = np.array(seq_num, dtype=np.int64).reshape(-1)
        t = np.array(time, dtype=np.float64).reshape(-1)
        q = np.array(q, dtype=np.float64).reshape(-1)
        i = np.array(intensity, dtype=np.float32, ndmin=2)
        s = np.array(sigma, dtype=np.float32, ndmin=2)
        b, n = len(seq), len(q)
        if t.shape != (b,) or i.shape != (b, n) or s.shape != (b, n):
            raise ValueError(f"add_profiles shapes disagree: seq_num {seq.shape}, time "
                             f"{t.shape}, q {q.shape}, intensity {i.shape}, sigma {s.shape}")
        known = self._caller_bins.setdefault(uid, n)
        if known != n:
            raise ValueError(f"run {uid!r} has {known} bins, got profiles with {n}")
        if b:
            self._put(("profiles", uid, (seq, t, q, i, s, str(unit))))

    def add_peaks(self, uid: str, rows: dict[str, np.ndarray]) -> None:
        """Queue PeakRows (dict of equal-length arrays, keys PEAK_COLUMNS)."""
        self._check_open(uid)
        table = rows_to_table(rows)
        if table.num_rows:
            self._put(("peaks", uid, table))

    def add_table(self, uid: str, key: str, rows: dict[str, Any]) -> None:
        """Queue rows (dict of equal-length columns) for the table ``key`` of run ``uid``,
        created with the first rows' schema on the first append (later rows must match it)."""
        if key in ("peaks", "change_points", "frames", "snapshot_frames") or not key.isidentifier():
            raise ValueError(f"table key must be an identifier other than the built-in tables, got {key!r}")
        self._check_open(uid)
        table = pa.table({c: np.asarray(v) for c, v in rows.items()})
        if table.num_rows:
            self._put(("table", uid, (key, table)))

    def add_stack(self, uid: str, name: str, seq_num, time, arrays: dict, axes: dict | None = None,
                  metadata: dict | None = None) -> None:
        """Queue B rows of arrays that grow with frames: ``arrays`` {key: (B, ...)} appended
        (float32) along axis 0 to the arrays ``key`` of run ``uid``, created with the first rows
        and ``metadata`` (JSON-able); seq_num (B,) and time (B,) s appended to the table
        ``<name>_frames``; ``axes`` {key: (n,)} (bin centres, float64) written with the first
        rows. Keys and row shapes of a ``name`` must stay the same. Copies the data."""
        taken = ("q", "profiles", "sigma", "snapshots", "peaks", "change_points", "frames", "snapshot_frames")
        keys = [name, f"{name}_frames", *arrays, *(axes or {})]
        if not arrays or any(not str(k).isidentifier() or k in taken for k in keys):
            raise ValueError(f"stack {name!r}: keys must be identifiers other than {taken}, got {keys}")
        self._check_open(uid)
        seq = np.array(seq_num, dtype=np.int64).reshape(-1)
        t = np.array(time, dtype=np.float64).reshape(-1)
        data = {k: np.array(v, dtype=np.float32, ndmin=1) for k, v in arrays.items()}
        shapes = {k: v.shape[1:] for k, v in data.items()}
        if t.shape != seq.shape or any(v.shape[0] != len(seq) for v in data.values()):
            raise ValueError(f"stack {name!r}: {len(seq)} seq_nums, time {t.shape}, arrays "
                             f"{ {k: v.shape for k, v in data.items()} }")
        known = self._caller_stacks.setdefault((uid, name), shapes)
        if known != shapes:
            raise ValueError(f"stack {name!r} of run {uid!r} has rows {known}, got {shapes}")
        ax = {k: np.array(v, dtype=np.float64).reshape(-1) for k, v in (axes or {}).items()}
        if len(seq):
            self._put(("stack", uid, (name, seq, t, data, ax, jsonable(metadata or {}))))

    def add_snapshot(self, uid: str, seq_num: int, image, time: float = float("nan")) -> None:
        """Queue one 2D snapshot of frame ``seq_num`` (``time`` in s, NaN if unknown):
        ``image`` (h, w), stored float32 (NaN = masked), the same shape for every snapshot of
        a run. Appended to the array ``snapshots`` (k, h, w) and the table ``snapshot_frames``
        in call order. Copies, so the caller may reuse buffers."""
        self._check_open(uid)
        img = np.array(image, dtype=np.float32)
        if img.ndim != 2 or img.size == 0:
            raise ValueError(f"snapshot must be a non-empty 2D array (h, w), got shape {img.shape}")
        known = self._caller_snap_shape.setdefault(uid, img.shape)
        if known != img.shape:
            raise ValueError(f"run {uid!r} has snapshots of shape {known}, got {img.shape}")
        self._put(("snapshot", uid, (int(seq_num), float(time), img)))

    def stop_run(self, uid: str, exit_status: str, reason: str = "") -> None:
        """Flush run ``uid`` and set status "complete" (success) or "interrupted"."""
        if exit_status not in EXIT_STATUS_TO_STATUS:
            raise ValueError(f"exit_status must be one of {sorted(EXIT_STATUS_TO_STATUS)}, "
                             f"got {exit_status!r}")
        self._check_open(uid)
        self._open.discard(uid)
        self._caller_bins.pop(uid, None)
        self._caller_snap_shape.pop(uid, None)
        for key in [k for k in self._caller_stacks if k[0] == uid]:
            del self._caller_stacks[key]
        self._put(("stop", uid, {"status": EXIT_STATUS_TO_STATUS[exit_status],
                                 "exit_status": exit_status, "reason": str(reason)}))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is written to Tiled or spooled."""
        done = threading.Event()
        self._put(("flush", None, done))
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
            self._spool_only = True         # the writer thread spools the rest, without Tiled
        self._closed = True
        self._put(("close", None, None))
        self._thread.join(max(timeout, 5.0) if self._spool_only else timeout)    # spooling takes ms per write
        if self.spool_pending:
            log.warning("Tiled unreachable or slow: %d writes remain spooled in %s (written by the next start)",
                        self.spool_pending, self.spool_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self, uid: str) -> None:
        if uid not in self._open:
            raise ValueError(f"run {uid!r} was not started (or already stopped)")

    def _put(self, item) -> None:
        if self._closed and item[0] != "close":
            raise RuntimeError("TiledPublisher is closed")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.blocked += 1
            self._queue.put(item)

    # --- writer thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._wait_time())
            except queue.Empty:
                item = None
            try:
                if self._recover_due and not self.spool_pending:
                    self._recover_due = False
                    self._submit(_Op("recover", "", {"writer": self.writer}))
                if item is not None and item[0] == "close":
                    self._flush_all()
                    if not self._spool_only:
                        self._try_drain(force=True)
                    return
                if item is not None:
                    self._handle(item)
                self._flush_due()
                # a drain step takes seconds: between steps, take the calls waiting (cheap) so
                # that callers never block on a full queue while the spool drains
                if self.spool_pending and not self._spool_only and (
                        self._queue.empty() or time.monotonic() - self._last_drain > 5.0):
                    self._last_drain = time.monotonic()
                    self._try_drain()
            except Exception:  # never let the writer thread die
                log.exception("Tiled writer: unexpected error")
                self.errors += 1

    def _wait_time(self) -> float:
        now = time.monotonic()
        due = [b.first_buffered + self.flush_seconds for b in self._runs.values()
               if b.first_buffered is not None]
        if self.spool_pending:
            due.append(self._next_probe)
        return max(0.0, min(due) - now) if due else 0.5

    def _handle(self, item) -> None:
        kind, uid, payload = item
        if kind == "flush":
            try:
                self._flush_all()
            finally:
                payload.set()
            return
        if kind == "start":
            self._runs[uid] = _RunBuffer(uid)
            self._submit(_Op("start", uid, {"metadata": payload}))
            return
        buf = self._runs.get(uid)
        if buf is None:
            log.error("Tiled writer: %s for unknown run %r dropped (no start_run)", kind, uid)
            self.errors += 1
            return
        if kind == "stop":
            self._flush_run(buf)
            self._submit(_Op("stop", uid, {"metadata": payload}))
            del self._runs[uid]
            return
        if kind == "profiles":
            buf.profiles.append(payload)
            buf.buffered_frames += len(payload[0])
        elif kind == "snapshot":
            buf.snapshots.append(payload)
        elif kind == "stack":
            buf.stacks.setdefault(payload[0], []).append(payload)
        elif kind == "table":
            buf.tables.setdefault(payload[0], []).append(payload[1])
            buf.buffered_rows += payload[1].num_rows
        else:
            buf.peaks.append(payload)
            buf.buffered_rows += payload.num_rows
        if buf.first_buffered is None:
            buf.first_buffered = time.monotonic()
        if (self._buffered(buf) >= _BACKLOG_FACTOR * self.flush_rows
                or len(buf.snapshots) >= _SNAPSHOT_BATCH
                or any(len(v) >= _SNAPSHOT_BATCH for v in buf.stacks.values())):
            self._flush_run(buf)

    @staticmethod
    def _buffered(buf: _RunBuffer) -> int:
        return max(buf.buffered_frames, buf.buffered_rows)

    def _flush_due(self) -> None:
        """Flush runs buffered for ``flush_seconds``, or holding ``flush_rows`` once the
        queue is empty (with a backlog, batches grow up to 8x: fewer, larger requests)."""
        now = time.monotonic()
        idle = self._queue.empty()
        for buf in list(self._runs.values()):
            if buf.first_buffered is None:
                continue
            if (now - buf.first_buffered >= self.flush_seconds
                    or (idle and self._buffered(buf) >= self.flush_rows)):
                self._flush_run(buf)

    def _flush_all(self) -> None:
        for buf in list(self._runs.values()):
            self._flush_run(buf)

    def _flush_run(self, buf: _RunBuffer) -> None:
        """Turn a run's buffers into positioned ops (profiles, snapshots, peaks, change points)."""
        if buf.profiles:
            seq = np.concatenate([p[0] for p in buf.profiles])
            arrays = {"seq_num": seq,
                      "time": np.concatenate([p[1] for p in buf.profiles]),
                      "q": buf.profiles[0][2],
                      "intensity": np.concatenate([p[3] for p in buf.profiles]),
                      "sigma": np.concatenate([p[4] for p in buf.profiles])}
            meta = {"offset": buf.frames, "unit": buf.profiles[0][5]}
            buf.frames += len(seq)
            self._submit(_Op("profiles", buf.uid, meta, arrays=arrays))
        if buf.snapshots:
            arrays = {"seq_num": np.array([p[0] for p in buf.snapshots], np.int64),
                      "time": np.array([p[1] for p in buf.snapshots], np.float64),
                      "images": np.stack([p[2] for p in buf.snapshots])}
            meta = {"offset": buf.n_snapshots}
            buf.n_snapshots += len(buf.snapshots)
            self._submit(_Op("snapshots", buf.uid, meta, arrays=arrays))
        if buf.peaks:
            table = pa.concat_tables(buf.peaks)
            cps = table.filter(table["change_point"])
            for key, rows in (("peaks", table), ("change_points", cps)):
                if rows.num_rows:
                    meta = {"key": key, "offset": buf.table_rows[key]}
                    buf.table_rows[key] += rows.num_rows
                    self._submit(_Op("table", buf.uid, meta, table=rows))
        for key, tables in buf.tables.items():
            table = pa.concat_tables(tables)
            meta = {"key": key, "offset": buf.table_rows.get(key, 0), "create": True}
            buf.table_rows[key] = meta["offset"] + table.num_rows
            self._submit(_Op("table", buf.uid, meta, table=table))
        for name, items in buf.stacks.items():
            offset = buf.stack_rows.get(name, 0)
            arrays = {"seq_num": np.concatenate([p[1] for p in items]),
                      "time": np.concatenate([p[2] for p in items]),
                      **{f"d_{k}": np.concatenate([p[3][k] for p in items]) for k in items[0][3]},
                      **{f"a_{k}": v for k, v in items[0][4].items()}}
            buf.stack_rows[name] = offset + len(arrays["seq_num"])
            self._submit(_Op("stack", buf.uid, {"name": name, "offset": offset, "metadata": items[0][5]},
                             arrays=arrays))
        buf.profiles, buf.peaks, buf.snapshots, buf.tables, buf.stacks = [], [], [], {}, {}
        buf.buffered_frames = buf.buffered_rows = 0
        buf.first_buffered = None

    # --- executing ops: retries, spool ------------------------------------------------

    def _submit(self, op: _Op) -> None:
        """Write now, or spool it if Tiled is unreachable or earlier writes wait there."""
        if self.spool_pending or self._spool_only:
            self._spool(op)
            return
        for attempt in range(self.max_retries + 1):
            try:
                self._execute(op, check=attempt > 0)
                return
            except Exception as exc:
                if not self._failed(op, exc):
                    return
                if attempt == self.max_retries or not self._healthy():
                    break
                time.sleep(self.retry_backoff * 2 ** attempt)
        self._spool(op)

    def _failed(self, op: _Op, exc: BaseException) -> bool:
        """Count a failure; True if transient (retry/spool), False if dropped for good."""
        self.failures += 1
        self._nodes.pop(op.uid, None)
        if _is_transient(exc):
            log.warning("Tiled write %s/%s failed (%r); will retry", op.kind, op.uid, exc)
            return True
        log.error("Tiled refused %s for run %s; dropped: %r", op.kind, op.uid, exc,
                  exc_info=exc)
        self.errors += 1
        return False

    def _spool(self, op: _Op) -> None:
        stem = self.spool_dir / f"{next(self._spool_counter):09d}-{op.kind}"
        _save_op(op, stem)
        self.spooled += 1
        if not self.spool_pending:
            self._next_probe = time.monotonic() + self._probe_wait
        self.spool_pending += 1

    def _spool_files(self) -> list[pathlib.Path]:
        """Spooled writes in order (``*.tmp`` leftovers of an interrupted write skipped)."""
        files = [p for p in self.spool_dir.iterdir()
                 if p.suffix in (".npz", ".parquet") and p.name.split("-", 1)[0].isdigit()]
        return sorted(files, key=lambda p: int(p.name.split("-", 1)[0]))

    def _try_drain(self, force: bool = False, max_files: int = 64, step_seconds: float = 1.0) -> None:
        """Replay spooled writes in order if Tiled answers: up to ``max_files``, stopping after
        ``step_seconds`` so that the writer thread gets back to its callers (all, ``max_files``
        at a time, if force). Consecutive writes to one array or table are merged into one
        (`_coalesce`): the spool drains faster than flushes add to it once Tiled is back."""
        if not force and time.monotonic() < self._next_probe:
            return
        if not self._healthy():
            self._probe_wait = min(2 * self._probe_wait, 10 * self.probe_seconds)
            self._next_probe = time.monotonic() + self._probe_wait
            return
        self._probe_wait = self.probe_seconds
        files = self._spool_files()
        deadline = time.monotonic() + step_seconds
        for first in range(0, len(files), max_files):
            if first and not force:
                break
            for op, paths in _coalesce([(path, _load_op(path)) for path in files[first:first + max_files]]):
                if not force and time.monotonic() > deadline:
                    return
                try:
                    self._execute(op, check=True)
                except Exception as exc:
                    if self._failed(op, exc):
                        self._next_probe = time.monotonic() + self._probe_wait
                        return
                for path in paths:
                    path.unlink()
                    self.spool_pending -= 1

    def _healthy(self) -> bool:
        """Cheap liveness probe (GET /healthz, 1 s timeout, no tiled retries)."""
        import httpx
        from urllib.parse import urlsplit

        parts = urlsplit(self._uri)
        url = f"{parts.scheme}://{parts.netloc}/healthz"
        try:
            if self._client is not None:      # its transport (maybe in-process ASGI)
                r = self._client.context.http_client.get(url, timeout=1.0)
            else:
                r = httpx.get(url, timeout=1.0, trust_env=False)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    # --- the Tiled calls themselves ---------------------------------------------------

    def _root(self):
        if self._client is None:
            from .tiled_server import connect

            self.requests += 1
            self._client = connect(self._uri, self._api_key)
        return self._client

    def _run_node(self, uid: str) -> dict:
        nodes = self._nodes.get(uid)
        if nodes is None:
            self.requests += 2
            nodes = self._nodes[uid] = {"run": self._root()[ROOT_KEY][uid]}
        return nodes

    def _child(self, uid: str, key: str):
        nodes = self._run_node(uid)
        if key not in nodes:
            self.requests += 1
            nodes[key] = nodes["run"][key]
        return nodes[key]

    def _ensure_table(self, uid: str, key: str, schema: pa.Schema) -> None:
        """The appendable table ``key`` of run ``uid``, created with ``schema`` if missing."""
        nodes = self._run_node(uid)
        if key not in nodes:
            nodes[key], _ = self._create(lambda: nodes["run"].create_appendable_table(schema, key=key),
                                         lambda: nodes["run"][key])

    def _execute(self, op: _Op, check: bool) -> None:
        """One op; ``check``: it may have been (partly) applied before, stay idempotent."""
        log.debug("execute %s %s %s check=%s", op.kind, op.uid, op.meta.get("offset"), check)
        if op.kind == "start":
            self._exec_start(op)
        elif op.kind == "profiles":
            self._exec_profiles(op, check)
        elif op.kind == "stack":
            self._exec_stack(op, check)
        elif op.kind == "snapshots":
            self._exec_snapshots(op, check)
        elif op.kind == "table":
            if op.meta.get("create"):
                self._ensure_table(op.uid, op.meta["key"], op.table.schema)
            self._exec_table(op.uid, op.meta["key"], op.meta["offset"], op.table, check)
            if op.meta["key"] == "peaks":
                self.rows_written += op.table.num_rows
        elif op.kind == "stop":
            self.requests += 1
            self._run_node(op.uid)["run"].update_metadata(metadata=op.meta["metadata"])
            self._nodes.pop(op.uid, None)
        elif op.kind == "recover":
            self._exec_recover(op.meta["writer"])
        else:
            raise TiledWriteError(f"unknown op kind {op.kind!r}")

    def _exec_recover(self, writer: str) -> None:
        """Mark "interrupted" the runs of ``writer`` still "running": an earlier process on
        this spool directory ended without their stop (its spooled writes are already in)."""
        from tiled.queries import Key

        root = self._root()
        self.requests += 1
        try:
            top = root[ROOT_KEY]
        except KeyError:
            return
        self.requests += 1
        uids = list(top.search(Key("status") == "running").search(Key("writer") == writer))
        for uid in uids:          # listed first: updating changes what the search matches
            if uid in self._runs:     # open in this process (started while the old spool drained)
                continue
            self.requests += 2
            top[uid].update_metadata(metadata={"status": "interrupted", "exit_status": "abort",
                                               "reason": RESTART_REASON})
            self.interrupted += 1
            log.warning("Tiled: run %s was left running by an earlier process; marked interrupted", uid)

    def _create(self, make, fetch):
        """``make()``; on 409 (exists, e.g. a retried request had succeeded) ``fetch()``."""
        self.requests += 1
        try:
            return make(), True
        except Exception as exc:
            if not _is_conflict(exc):
                raise
            self.requests += 1
            return fetch(), False

    def _exec_start(self, op: _Op) -> None:
        root = self._root()
        metadata = op.meta["metadata"]
        self._create(lambda: root.create_container(ROOT_KEY), lambda: None)
        # tiled 0.2.20: the client that create_container returns at the root addresses its
        # children as '//scatterflow/<uid>', which the server files where a fresh client does
        # not find them; fetch the container by key instead.
        self.requests += 1
        top = root[ROOT_KEY]
        run, new = self._create(lambda: top.create_container(op.uid, metadata=metadata),
                                lambda: top[op.uid])
        if not new:
            self.requests += 1
            run.update_metadata(metadata=metadata)
        nodes = self._nodes[op.uid] = {"run": run}
        for key, schema in (("frames", FRAME_SCHEMA), ("peaks", PEAK_SCHEMA),
                            ("change_points", PEAK_SCHEMA)):
            nodes[key], _ = self._create(
                lambda: run.create_appendable_table(schema, key=key),
                lambda: run[key])

    def _exec_profiles(self, op: _Op, check: bool) -> None:
        a, offset = op.arrays, int(op.meta["offset"])
        nodes = self._run_node(op.uid)
        for key in ("profiles", "sigma"):
            data = a["intensity" if key == "profiles" else key]
            if offset == 0:
                meta = {"unit": op.meta["unit"], "dims": ["frame", "radial"],
                        "description": "mean intensity per bin" if key == "profiles"
                        else "standard error of the mean intensity"}
                node, new = self._create(
                    lambda: nodes["run"].write_array(data, key=key, metadata=meta),
                    lambda: nodes["run"][key])
                nodes[key] = node
                if new:
                    continue
            else:
                node = self._child(op.uid, key)
            self.requests += 1
            node.patch(data, offset=offset, extend=True)
        if offset == 0:
            nodes["q"], _ = self._create(
                lambda: nodes["run"].write_array(a["q"], key="q",
                                                 metadata={"unit": op.meta["unit"]}),
                lambda: nodes["run"]["q"])
        frames = pa.table({"seq_num": a["seq_num"], "time": a["time"]}, schema=FRAME_SCHEMA)
        self._exec_table(op.uid, "frames", offset, frames, check)
        self.frames_written += len(a["seq_num"])

    def _exec_snapshots(self, op: _Op, check: bool) -> None:
        """Snapshots at their offset: array ``snapshots`` (created at offset 0, then patched
        with extend; a patch at an offset overwrites, so retries repeat it safely), then their
        rows in ``snapshot_frames`` (row-count checked on retries)."""
        a, offset = op.arrays, int(op.meta["offset"])
        nodes = self._run_node(op.uid)
        data = a["images"]
        if offset == 0:
            meta = {"dims": ["snapshot", "row", "col"],
                    "description": "corrected 2D frames (raw - dark) / (flat * solid angle * "
                                   "polarization), block-averaged; NaN = masked; frames in "
                                   "snapshot_frames"}
            node, new = self._create(
                lambda: nodes["run"].write_array(data, key="snapshots", metadata=meta),
                lambda: nodes["run"]["snapshots"])
            nodes["snapshots"] = node
            if not new:
                self.requests += 1
                node.patch(data, offset=0, extend=True)
            nodes["snapshot_frames"], _ = self._create(
                lambda: nodes["run"].create_appendable_table(SNAPSHOT_SCHEMA, key="snapshot_frames"),
                lambda: nodes["run"]["snapshot_frames"])
        else:
            self.requests += 1
            self._child(op.uid, "snapshots").patch(data, offset=offset, extend=True)
        rows = pa.table({"seq_num": a["seq_num"], "time": a["time"]}, schema=SNAPSHOT_SCHEMA)
        self._exec_table(op.uid, "snapshot_frames", offset, rows, check)
        self.snapshots_written += len(a["seq_num"])

    def _exec_stack(self, op: _Op, check: bool) -> None:
        """add_stack rows at their offset: arrays ``d_<key>`` created at offset 0 (with the axes
        ``a_<key>`` and the table ``<name>_frames``), later patched with extend (a patch at an
        offset overwrites: retries are safe); then their rows in ``<name>_frames``."""
        a, offset, name = op.arrays, int(op.meta["offset"]), op.meta["name"]
        nodes = self._run_node(op.uid)
        run = nodes["run"]
        for key, data in ((k[2:], v) for k, v in a.items() if k.startswith("d_")):
            if offset == 0:
                node, new = self._create(lambda: run.write_array(data, key=key, metadata=op.meta["metadata"]),
                                         lambda: run[key])
                nodes[key] = node
                if not new:
                    self.requests += 1
                    node.patch(data, offset=0, extend=True)
            else:
                self.requests += 1
                self._child(op.uid, key).patch(data, offset=offset, extend=True)
        frames_key = f"{name}_frames"
        if offset == 0:
            for key, axis in ((k[2:], v) for k, v in a.items() if k.startswith("a_")):
                nodes[key], _ = self._create(lambda: run.write_array(axis, key=key), lambda: run[key])
            nodes[frames_key], _ = self._create(
                lambda: run.create_appendable_table(FRAME_SCHEMA, key=frames_key), lambda: run[frames_key])
        rows = pa.table({"seq_num": a["seq_num"], "time": a["time"]}, schema=FRAME_SCHEMA)
        self._exec_table(op.uid, frames_key, offset, rows, check)

    def _exec_table(self, uid: str, key: str, offset: int, table: pa.Table,
                    check: bool) -> None:
        node = self._child(uid, key)
        where = (uid, key, offset)
        if check:
            self.requests += 1
            held = node.read(columns=["seq_num"])["seq_num"].to_numpy()
            n = len(held)
            # rows of this write already there: all (an earlier attempt got through), or the
            # first ones (a merged replay after a crash: `_coalesce`); append only the rest
            there = min(max(n - offset, 0), table.num_rows)
            if n >= offset and np.array_equal(held[offset:offset + there], table["seq_num"].to_numpy()[:there]):
                if there == table.num_rows:
                    return
                table, offset = table.slice(there), offset + there
            else:
                self._rechecks[where] = tries = self._rechecks.get(where, 0) + 1
                msg = (f"{key} of run {uid} has {n} rows, expected {offset} before "
                       f"appending {table.num_rows} (check {tries}/{_MAX_RECHECKS})")
                if tries < _MAX_RECHECKS:
                    raise _RowCountMismatch(msg)
                raise TiledWriteError(msg)
        self.requests += 1
        node.append_partition(0, table)
        self._rechecks.pop(where, None)
