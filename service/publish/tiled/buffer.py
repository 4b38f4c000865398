"""Per-run buffers on the writer thread, the policy that flushes them, and the ops a flush
makes: Tiled serves about 20 write requests/s on 2 cores and a flush costs 3-5 requests
whatever its size, so writes go in batches by size and by time, and at stop."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .ops import Op

SNAPSHOT_BATCH = 16     # flush a run holding this many snapshots (~256 KB each) or stack rows
BACKLOG_FACTOR = 8      # with a queue backlog, batches grow up to this many flush_rows


# --- what a caller hands to the writer thread (copies, checked) ---------------------------

@dataclass(frozen=True)
class ProfileRows:
    """B frames: seq_num (B,) int64, time (B,) s, q (N,) float64 in ``unit``, intensity and
    sigma (B, N) float32."""
    seq_num: np.ndarray
    time: np.ndarray
    q: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    unit: str

    @classmethod
    def parse(cls, seq_num, time, q, intensity, sigma, unit: str) -> ProfileRows:
        """Copies in the stored dtypes; ValueError if the shapes disagree."""
        rows = cls(np.array(seq_num, dtype=np.int64).reshape(-1),
                   np.array(time, dtype=np.float64).reshape(-1),
                   np.array(q, dtype=np.float64).reshape(-1),
                   np.array(intensity, dtype=np.float32, ndmin=2),
                   np.array(sigma, dtype=np.float32, ndmin=2), str(unit))
        b, n = len(rows.seq_num), len(rows.q)
        if rows.time.shape != (b,) or rows.intensity.shape != (b, n) or rows.sigma.shape != (b, n):
            raise ValueError(f"add_profiles shapes disagree: seq_num {rows.seq_num.shape}, time "
                             f"{rows.time.shape}, q {rows.q.shape}, intensity "
                             f"{rows.intensity.shape}, sigma {rows.sigma.shape}")
        return rows


@dataclass(frozen=True)
class Snapshot:
    """One 2D frame: image (h, w) float32, NaN = masked; time in s (NaN if unknown)."""
    seq_num: int
    time: float
    image: np.ndarray

    @classmethod
    def parse(cls, seq_num: int, image, time: float) -> Snapshot:
        img = np.array(image, dtype=np.float32)
        if img.ndim != 2 or img.size == 0:
            raise ValueError(f"snapshot must be a non-empty 2D array (h, w), got shape {img.shape}")
        return cls(int(seq_num), float(time), img)


@dataclass(frozen=True)
class StackRows:
    """B rows of the arrays of stack ``name``: arrays {key: (B, ...) float32}, seq_num (B,)
    int64, time (B,) s; axes {key: (n,) float64} and metadata (JSON-able) for the first rows."""
    name: str
    seq_num: np.ndarray
    time: np.ndarray
    arrays: dict[str, np.ndarray]
    axes: dict[str, np.ndarray]
    metadata: dict

    @classmethod
    def parse(cls, name: str, seq_num, time, arrays: dict, axes: dict | None,
              metadata: dict) -> StackRows:
        """Copies in the stored dtypes; ValueError if the row counts disagree."""
        seq = np.array(seq_num, dtype=np.int64).reshape(-1)
        t = np.array(time, dtype=np.float64).reshape(-1)
        data = {k: np.array(v, dtype=np.float32, ndmin=1) for k, v in arrays.items()}
        if t.shape != seq.shape or any(v.shape[0] != len(seq) for v in data.values()):
            raise ValueError(f"stack {name!r}: {len(seq)} seq_nums, time {t.shape}, arrays "
                             f"{ {k: v.shape for k, v in data.items()} }")
        ax = {k: np.array(v, dtype=np.float64).reshape(-1) for k, v in (axes or {}).items()}
        return cls(name, seq, t, data, ax, metadata)

    def row_shapes(self) -> dict[str, tuple]:
        return {k: v.shape[1:] for k, v in self.arrays.items()}


@dataclass(frozen=True)
class PeakTable:
    """Peak rows (PEAK_SCHEMA); those flagged change_point also go to ``change_points``."""
    table: pa.Table


@dataclass(frozen=True)
class TableRows:
    """Rows for the table ``key`` (add_table), created with the first rows' schema."""
    key: str
    table: pa.Table


Rows = ProfileRows | Snapshot | StackRows | PeakTable | TableRows


# --- one run's buffer ------------------------------------------------------------------

@dataclass
class RunBuffer:
    """What run ``uid`` holds until its next flush, and where the next ops write (offsets)."""
    uid: str
    frames: int = 0                 # frames handed to ops so far (next profile offset)
    n_snapshots: int = 0            # snapshots handed to ops so far (next snapshot offset)
    table_rows: dict[str, int] = field(default_factory=lambda: {"peaks": 0, "change_points": 0})
    stack_rows: dict[str, int] = field(default_factory=dict)  # stack name -> next row offset
    profiles: list[ProfileRows] = field(default_factory=list)
    peaks: list[pa.Table] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    tables: dict[str, list[pa.Table]] = field(default_factory=dict)
    stacks: dict[str, list[StackRows]] = field(default_factory=dict)
    buffered_frames: int = 0
    buffered_rows: int = 0
    first_buffered: float | None = None     # time.monotonic() of the oldest buffered item

    def add(self, rows: Rows) -> None:
        if isinstance(rows, ProfileRows):
            self.profiles.append(rows)
            self.buffered_frames += len(rows.seq_num)
        elif isinstance(rows, Snapshot):
            self.snapshots.append(rows)
        elif isinstance(rows, StackRows):
            self.stacks.setdefault(rows.name, []).append(rows)
        elif isinstance(rows, TableRows):
            self.tables.setdefault(rows.key, []).append(rows.table)
            self.buffered_rows += rows.table.num_rows
        else:
            self.peaks.append(rows.table)
            self.buffered_rows += rows.table.num_rows
        if self.first_buffered is None:
            self.first_buffered = time.monotonic()

    @property
    def buffered(self) -> int:
        """Frames or table rows buffered, whichever is more."""
        return max(self.buffered_frames, self.buffered_rows)

    def take_ops(self) -> list[Op]:
        """The buffers as positioned ops (profiles, snapshots, peaks and change points, tables,
        stacks), emptied."""
        ops = self._profile_ops() + self._snapshot_ops() + self._peak_ops()
        ops += self._table_ops() + self._stack_ops()
        self.profiles, self.peaks, self.snapshots, self.tables, self.stacks = [], [], [], {}, {}
        self.buffered_frames = self.buffered_rows = 0
        self.first_buffered = None
        return ops

    def _profile_ops(self) -> list[Op]:
        if not self.profiles:
            return []
        p = self.profiles
        arrays = {"seq_num": np.concatenate([r.seq_num for r in p]),
                  "time": np.concatenate([r.time for r in p]), "q": p[0].q,
                  "intensity": np.concatenate([r.intensity for r in p]),
                  "sigma": np.concatenate([r.sigma for r in p])}
        meta = {"offset": self.frames, "unit": p[0].unit}
        self.frames += len(arrays["seq_num"])
        return [Op("profiles", self.uid, meta, arrays=arrays)]

    def _snapshot_ops(self) -> list[Op]:
        if not self.snapshots:
            return []
        s = self.snapshots
        arrays = {"seq_num": np.array([x.seq_num for x in s], np.int64),
                  "time": np.array([x.time for x in s], np.float64),
                  "images": np.stack([x.image for x in s])}
        meta = {"offset": self.n_snapshots}
        self.n_snapshots += len(s)
        return [Op("snapshots", self.uid, meta, arrays=arrays)]

    def _peak_ops(self) -> list[Op]:
        if not self.peaks:
            return []
        table = pa.concat_tables(self.peaks)
        ops = []
        for key, rows in (("peaks", table), ("change_points", table.filter(table["change_point"]))):
            if rows.num_rows:
                ops.append(Op("table", self.uid, {"key": key, "offset": self.table_rows[key]}, table=rows))
                self.table_rows[key] += rows.num_rows
        return ops

    def _table_ops(self) -> list[Op]:
        ops = []
        for key, tables in self.tables.items():
            table = pa.concat_tables(tables)
            meta = {"key": key, "offset": self.table_rows.get(key, 0), "create": True}
            self.table_rows[key] = meta["offset"] + table.num_rows
            ops.append(Op("table", self.uid, meta, table=table))
        return ops

    def _stack_ops(self) -> list[Op]:
        ops = []
        for name, items in self.stacks.items():
            offset = self.stack_rows.get(name, 0)
            arrays = {"seq_num": np.concatenate([s.seq_num for s in items]),
                      "time": np.concatenate([s.time for s in items]),
                      **{f"d_{k}": np.concatenate([s.arrays[k] for s in items]) for k in items[0].arrays},
                      **{f"a_{k}": v for k, v in items[0].axes.items()}}
            self.stack_rows[name] = offset + len(arrays["seq_num"])
            meta = {"name": name, "offset": offset, "metadata": items[0].metadata}
            ops.append(Op("stack", self.uid, meta, arrays=arrays))
        return ops


# --- when to flush ----------------------------------------------------------------------

@dataclass(frozen=True)
class FlushPolicy:
    """Flush a run ``seconds`` after its first buffered item, or once it holds ``rows`` frames
    or table rows and the queue is empty; with a backlog, batches grow up to BACKLOG_FACTOR x
    ``rows`` (fewer, larger requests)."""
    rows: int
    seconds: float

    def full(self, buf: RunBuffer) -> bool:
        """Flush now, whatever waits in the queue."""
        return (buf.buffered >= BACKLOG_FACTOR * self.rows or len(buf.snapshots) >= SNAPSHOT_BATCH
                or any(len(v) >= SNAPSHOT_BATCH for v in buf.stacks.values()))

    def due(self, buf: RunBuffer, now: float, idle: bool) -> bool:
        """Flush at ``now`` (monotonic s); ``idle``: nothing waits in the queue."""
        if buf.first_buffered is None:
            return False
        return now - buf.first_buffered >= self.seconds or (idle and buf.buffered >= self.rows)

    def deadline(self, buf: RunBuffer) -> float | None:
        """Monotonic time at which ``buf`` is due whatever its size; None if it is empty."""
        return None if buf.first_buffered is None else buf.first_buffered + self.seconds
