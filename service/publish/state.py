"""In-memory run state behind the REST API and the dashboard.

Thread-safe; one `RunRecord` per run, the newest ``max_runs`` runs (the oldest finished run is
forgotten first; Tiled keeps them all). Memory per run is bounded whatever the run's length:
result rows (peaks, phases, inversion, scalar series) and event scalars are numpy tables
(`service.publish.rowtable.RowTable`) holding the newest ``held_rows`` rows each (at least; older
rows are served from Tiled by the API), profiles the last ``max_profiles`` frames, transitions
the last `MAX_TRANSITIONS`.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from workers.columns import PEAK_COLUMNS, PEAK_DTYPES, PHASE_COLUMNS, PHASE_DTYPES
from workers.inversion.quality import InversionTally

from ..jsonsafe import jsonable
from .rowtable import RowQuery, RowTable, Selection

__all__ = ["PEAK_COLUMNS", "PHASE_COLUMNS", "Held", "RunRecord", "RunStore", "column_lists"]

HELD_ROWS = 100_000         # default rows held per table and run (ApiConfig.held_rows)
MAX_TRANSITIONS = 10_000    # confirmed phase transitions held per run (the newest)
TABLES = ("peaks", "phases", "inversion")     # the row tables `RunStore.select` reads


class ScalarFrames:
    """The event scalar fields (name -> float) of the newest frames of a run, columnar (a
    `RowTable` keyed by seq_num; frames gathered `BATCH` at a time, so a frame costs about a
    dict append). ``get(seq, default)`` as a dict's: that frame's fields, NaN fields left out;
    `default` for a frame not held."""
    BATCH = 256

    def __init__(self, held_rows: int):
        self.table = RowTable(None, held_rows)
        self._pending: list[tuple[int, dict]] = []
        self._lock = threading.Lock()       # readers (the demo) call get without the store's lock

    def add(self, seq: int, scalars: dict) -> None:
        with self._lock:
            self._pending.append((int(seq), scalars))
            if len(self._pending) >= self.BATCH:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        names = dict.fromkeys(k for _, d in self._pending for k in d if k != "seq_num")
        rows = {k: np.array([d.get(k, np.nan) for _, d in self._pending], np.float64) for k in names}
        rows["seq_num"] = np.array([s for s, _ in self._pending], np.int64)
        self._pending.clear()
        self.table.append(rows)

    def get(self, seq: int, default=None):
        with self._lock:
            self._flush()
            sel = self.table.frame(int(seq), newest=self.table.held)
        if not len(sel.rows):
            return default
        return {c: float(v[-1]) for c, v in sel.columns.items() if c != "seq_num" and np.isfinite(v[-1])}

    def __len__(self) -> int:
        return self.table.held + len(self._pending)


@dataclass
class RunRecord:
    uid: str
    start: dict
    held_rows: int = HELD_ROWS
    status: str = "running"     # then complete | abort | fail | failed | incomplete | refused | quarantined (hub.py)
    reason: str = ""            # why, when not complete
    created: float = field(default_factory=time.time)
    stopped: float | None = None
    frames_received: int = 0
    frames_fitted: int = 0
    frames_final: int = 0
    reseeds: int = 0                                 # fits re-seeded after divergence
    failed: Counter = field(default_factory=Counter)
    radial: np.ndarray | None = None
    unit: str = ""
    profiles: deque = field(default_factory=lambda: deque(maxlen=2000))   # (seq, time, I, sigma)
    transitions: deque = field(default_factory=lambda: deque(maxlen=MAX_TRANSITIONS))  # confirmed (dicts), time order
    frame: np.ndarray | None = None                  # latest raw 2D frame (rows, cols), detector counts
    frame_seq: int | None = None                     # its seq_num
    info: dict = field(default_factory=dict)         # modality; source_run, detector (service/detectors.py)
    qmap: tuple | None = None                        # latest (seq_num, q_xy (Nxy,), q_z (Nz,), (Nz, Nxy) f32)
    extra_profiles: dict = field(default_factory=dict)   # name -> latest (seq_num, radial, unit, I, sigma)
    series: dict = field(default_factory=dict)       # scalar name -> RowTable (seq_num, value), newest rows

    def __post_init__(self):
        self.peaks = RowTable(PEAK_DTYPES, self.held_rows)         # PEAK_COLUMNS, one row per frame and peak
        self.phases = RowTable(PHASE_DTYPES, self.held_rows)       # PHASE_COLUMNS, one row per frame
        self.inversion = RowTable(None, self.held_rows)            # columns of the first rows
        self.inversion_tally = InversionTally()                    # verdict counts over every row
        self.scalars = ScalarFrames(self.held_rows)                # seq_num -> the event's scalar fields

    def summary(self) -> dict:
        return {"uid": self.uid, "status": self.status, "reason": self.reason,
                "plan_name": self.start.get("plan_name"), "scan_id": self.start.get("scan_id"),
                "created": self.created, "stopped": self.stopped,
                "frames_received": self.frames_received, "frames_fitted": self.frames_fitted,
                "frames_final": self.frames_final, "frames_failed": dict(self.failed), "reseeds": self.reseeds,
                "peak_rows": self.peaks.n, "peak_rows_held": self.peaks.held, "source": "memory",
                "unit": self.unit, **self.info,
                **({"inversion": self.inversion_tally.summary()} if self.inversion_tally.frames else {})}


@dataclass
class Held:
    """What a run holds of one table for a poll: the rows it asked for that are held
    (`selection`), the table's row count so far (`n`), the row index of its oldest held row
    (`base`) and the greatest seq_num of the rows no longer held (`evicted_max_seq`)."""
    selection: Selection
    n: int
    base: int
    evicted_max_seq: int | None
    columns: tuple[str, ...]


class RunStore:
    """The runs behind the REST API.

    max_profiles : reduced profiles held per run (the newest frames).
    max_runs : runs held; past it the oldest finished run is forgotten.
    held_rows : rows held per table and run at least (peaks, phases, inversion, each scalar
        series, event scalars): memory is (held_rows + held_rows / 16) x row size per table, e.g.
        9 MB of peak rows for 100,000 rows (87 B each).
    """

    def __init__(self, max_profiles: int = 2000, max_runs: int = 100, held_rows: int = HELD_ROWS):
        if not (isinstance(held_rows, int) and held_rows >= 1):
            raise ValueError(f"held_rows must be an int >= 1, got {held_rows!r}")
        self._runs: dict[str, RunRecord] = {}
        self._lock = threading.Lock()
        self.max_profiles = max_profiles
        self.max_runs = max_runs
        self.held_rows = held_rows
        self.max_frames_kept = 4           # runs whose latest raw frame is held (dashboard image)

    def start_run(self, uid: str, start: dict) -> None:
        with self._lock:
            self._runs[uid] = RunRecord(uid=uid, start=start, held_rows=self.held_rows,
                                        profiles=deque(maxlen=self.max_profiles))
            while len(self._runs) > self.max_runs:          # forget the oldest finished run
                old = next((u for u, r in self._runs.items() if r.status != "running"), None)
                if old is None:
                    break
                del self._runs[old]

    def get(self, uid: str) -> RunRecord | None:
        with self._lock:
            return self._runs.get(uid)

    def uids(self, prefix: str = "") -> list[str]:
        """The uids held that start with ``prefix``."""
        with self._lock:
            return [u for u in self._runs if u.startswith(prefix)]

    def list(self) -> list[dict]:
        with self._lock:
            return [r.summary() for r in self._runs.values()]

    def frame_received(self, uid: str, seq: int, scalars: dict) -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.frames_received += 1
                if scalars:
                    run.scalars.add(seq, scalars)

    def set_latest_frame(self, uid: str, seq: int, frame: np.ndarray) -> None:
        """Keep the latest raw detector frame (rows, cols) of run `uid` for the dashboard image.

        Only a reference is kept (frames from ingest are read-only), one per run and for the
        `max_frames_kept` newest runs only (a 4 Mpx frame is 16 MB); frames older than the one
        held are ignored."""
        with self._lock:
            run = self._runs.get(uid)
            if run is not None and (run.frame_seq is None or int(seq) >= run.frame_seq):
                run.frame, run.frame_seq = frame, int(seq)
                holding = sorted((r for r in self._runs.values() if r.frame is not None),
                                 key=lambda r: r.created, reverse=True)
                for old in holding[self.max_frames_kept:]:
                    old.frame = old.frame_seq = None

    def latest_frame(self, uid: str) -> tuple[int, np.ndarray] | None:
        """(seq_num, frame) of the latest raw frame of run `uid`, or None if none was kept."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None or run.frame is None:
                return None
            return run.frame_seq, run.frame

    def add_profiles(self, uid: str, seq, times, radial, unit, intensity, sigma) -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            run.radial, run.unit = radial, unit
            run.frames_fitted += len(seq)
            for i in range(len(seq)):
                run.profiles.append((int(seq[i]), float(times[i]), intensity[i], sigma[i]))

    def add_peaks(self, uid: str, rows: dict) -> None:
        """Peak rows (PEAK_COLUMNS, equal-length arrays). A frame's final rows come once, in one
        batch (the service publishes each frame's final fit once): `frames_final` counts them."""
        if not rows or len(rows["seq_num"]) == 0:
            return
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            run.peaks.append(rows)
            final = np.asarray(rows["final"], bool)
            run.frames_final += len(np.unique(np.asarray(rows["seq_num"])[final]))

    def add_phases(self, uid: str, rows: dict, transitions: list) -> None:
        """Per-frame phase rows (PHASE_COLUMNS) and newly confirmed transitions of run `uid`."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            if rows and len(rows["seq_num"]):
                run.phases.append(rows)
            run.transitions.extend(jsonable(t) for t in transitions)

    def add_inversion(self, uid: str, rows: dict) -> None:
        """Per-frame inversion rows (workers.inversion.refine.inversion_rows)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None or not len(rows["seq_num"]):
                return
            run.inversion.append(rows)
            run.inversion_tally.add(rows)

    def select(self, uid: str, table: str, q: RowQuery, until: int | None = None) -> Held | None:
        """The held rows of ``table`` (one of `TABLES`) of run ``uid`` that ``q`` asks for (below
        row index ``until``), and where the table stands; None: no such run. Costs the rows
        looked at (`RowTable.select`), under the store's lock."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return None
            t: RowTable = getattr(run, table)
            return Held(t.select(q, until), t.n, t.base, t.evicted_max_seq, t.columns)

    def transitions(self, uid: str) -> list | None:
        """The confirmed phase transitions held of run ``uid`` (dicts, time order); None: no such run."""
        with self._lock:
            run = self._runs.get(uid)
            return None if run is None else list(run.transitions)

    def inversion_since(self, uid: str, since: int = 0) -> tuple[dict, int] | None:
        """Columnar inversion rows (lists, NaN as None) held from row index `since`, and the next `since`."""
        held = self.select(uid, "inversion", RowQuery(since=since))
        return None if held is None else (column_lists(held.selection.columns), held.n)

    def phases_since(self, uid: str, since: int = 0, final: bool | None = None) -> tuple[dict, int, list] | None:
        """Columnar phase rows (lists, NaN as None) held from row index `since`, next `since`,
        and the transitions held."""
        held = self.select(uid, "phases", RowQuery(since=since, final=final))
        if held is None:
            return None
        return column_lists(held.selection.columns), held.n, self.transitions(uid) or []

    def peaks_since(self, uid: str, since: int = 0, final: bool | None = None) -> tuple[dict, int] | None:
        """Columnar peak rows (lists, NaN as None) held from row index `since`; returns (columns,
        next_since). Rows no longer held are left out (the REST route reads them from Tiled)."""
        held = self.select(uid, "peaks", RowQuery(since=since, final=final))
        return None if held is None else (column_lists(held.selection.columns), held.n)

    def frame_peaks(self, uid: str, seq: int) -> dict | None:
        """The peak rows of frame ``seq`` among the newest rows of run ``uid`` (lists, NaN as None)."""
        with self._lock:
            run = self._runs.get(uid)
            return None if run is None else column_lists(run.peaks.frame(int(seq)).columns)

    def set_info(self, uid: str, info: dict) -> None:
        """Keys added to the run's summary (modality; source_run and detector of a detector)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.info = dict(info)

    def add_extras(self, uid: str, seq, qmaps, profiles: dict, scalars: dict) -> None:
        """A grazing batch's extras (workers.pipeline.BatchResult: qmaps, extra_profiles,
        scalars): the latest q-map and extra profiles are kept, the newest rows of each scalar series."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            if qmaps is not None and qmaps.images:
                s, image = qmaps.images[-1]
                run.qmap = (int(s), qmaps.q_xy, qmaps.q_z, image)
            for name, p in profiles.items():
                if len(seq) and len(p.intensity):
                    run.extra_profiles[name] = (int(seq[-1]), p.radial, p.unit, p.intensity[-1], p.sigma[-1])
            for name, values in scalars.items():
                table = run.series.setdefault(name, RowTable({"seq_num": np.int64, "value": np.float64}, run.held_rows))
                table.append({"seq_num": np.asarray(seq, np.int64), "value": np.asarray(values, np.float64)})

    def latest_qmap(self, uid: str) -> tuple | None:
        """(seq_num, q_xy, q_z, map (Nz, Nxy)) of the run's latest q-map, or None."""
        with self._lock:
            run = self._runs.get(uid)
            return None if run is None else run.qmap

    def extras(self, uid: str) -> dict | None:
        """Latest extra profiles and the scalar series held of run `uid` (None: no such run)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return None
            profiles = {name: {"seq_num": s, "radial": np.asarray(r).tolist(), "unit": u,
                               "intensity": np.asarray(i).tolist(), "sigma": np.asarray(e).tolist()}
                        for name, (s, r, u, i, e) in run.extra_profiles.items()}
            series = {name: column_lists(t.select(RowQuery()).columns) for name, t in run.series.items()}
            qmap = None if run.qmap is None else {"seq_num": run.qmap[0]}
        return {"profiles": profiles, "scalars": series, "qmap": qmap}

    def add_reseeds(self, uid: str, n: int) -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.reseeds += int(n)

    def add_failed(self, uid: str, n: int, reason: str) -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.failed[reason] += n

    def stop_run(self, uid: str, status: str, reason: str = "") -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.status, run.reason, run.stopped = status, reason, time.time()


def column_lists(columns: dict[str, np.ndarray]) -> dict[str, list]:
    """Columns as JSON-ready lists: non-finite floats as None (JSON has no NaN)."""
    out = {}
    for c, v in columns.items():
        values = v.tolist()
        if v.dtype.kind == "f":
            for i in np.flatnonzero(~np.isfinite(v)).tolist():
                values[i] = None
        out[c] = values
    return out
