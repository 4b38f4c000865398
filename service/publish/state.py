"""In-memory run state behind the REST API and the dashboard.

Thread-safe; one `RunRecord` per run. Peak rows are kept whole (they are small); profiles keep the
last `max_profiles` frames (Tiled holds them all).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from workers.columns import PEAK_COLUMNS, PHASE_COLUMNS

from ..jsonsafe import jsonable



@dataclass
class RunRecord:
    uid: str
    start: dict
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
    peaks: dict = field(default_factory=lambda: {c: [] for c in PEAK_COLUMNS})
    scalars: dict = field(default_factory=dict)      # seq_num -> the event's scalar fields
    phases: dict = field(default_factory=lambda: {c: [] for c in PHASE_COLUMNS})
    transitions: list = field(default_factory=list)  # confirmed phase transitions (dicts), time order
    frame: np.ndarray | None = None                  # latest raw 2D frame (rows, cols), detector counts
    frame_seq: int | None = None                     # its seq_num
    inversion: dict = field(default_factory=dict)    # column -> list: structural parameters per frame
    info: dict = field(default_factory=dict)         # modality; source_run, detector (service/detectors.py)
    qmap: tuple | None = None                        # latest (seq_num, q_xy (Nxy,), q_z (Nz,), (Nz, Nxy) f32)
    extra_profiles: dict = field(default_factory=dict)   # name -> latest (seq_num, radial, unit, I, sigma)
    series: dict = field(default_factory=dict)       # scalar name -> {"seq_num": [...], "value": [...]}

    def summary(self) -> dict:
        return {"uid": self.uid, "status": self.status, "reason": self.reason,
                "plan_name": self.start.get("plan_name"), "scan_id": self.start.get("scan_id"),
                "created": self.created, "stopped": self.stopped,
                "frames_received": self.frames_received, "frames_fitted": self.frames_fitted,
                "frames_final": self.frames_final, "frames_failed": dict(self.failed), "reseeds": self.reseeds,
                "peak_rows": len(self.peaks["seq_num"]), "unit": self.unit, **self.info}


class RunStore:
    def __init__(self, max_profiles: int = 2000, max_runs: int = 100):
        self._runs: dict[str, RunRecord] = {}
        self._lock = threading.Lock()
        self.max_profiles = max_profiles
        self.max_runs = max_runs
        self.max_frames_kept = 4           # runs whose latest raw frame is held (dashboard image)

    def start_run(self, uid: str, start: dict) -> None:
        with self._lock:
            self._runs[uid] = RunRecord(uid=uid, start=start, profiles=deque(maxlen=self.max_profiles))
            while len(self._runs) > self.max_runs:          # forget the oldest finished run
                old = next((u for u, r in self._runs.items() if r.status != "running"), None)
                if old is None:
                    break
                del self._runs[old]

    def get(self, uid: str) -> RunRecord | None:
        with self._lock:
            return self._runs.get(uid)

    def list(self) -> list[dict]:
        with self._lock:
            return [r.summary() for r in self._runs.values()]

    def frame_received(self, uid: str, seq: int, scalars: dict) -> None:
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.frames_received += 1
                if scalars:
                    run.scalars[seq] = scalars

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
        if not rows or len(rows["seq_num"]) == 0:
            return
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            for c in PEAK_COLUMNS:
                values = np.asarray(rows[c])
                if values.dtype.kind == "f":             # JSON has no NaN: undetermined values are null
                    values = np.where(np.isfinite(values), values, None)
                run.peaks[c].extend(values.tolist())
            run.frames_final = len({s for s, f in zip(run.peaks["seq_num"], run.peaks["final"]) if f})

    def add_phases(self, uid: str, rows: dict, transitions: list) -> None:
        """Per-frame phase rows (PHASE_COLUMNS) and newly confirmed transitions of run `uid`."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return
            if rows and len(rows["seq_num"]):
                for c in PHASE_COLUMNS:
                    values = np.asarray(rows[c])
                    if values.dtype.kind == "f":
                        values = np.where(np.isfinite(values), values, None)
                    run.phases[c].extend(values.tolist())
            run.transitions.extend(jsonable(t) for t in transitions)

    def add_inversion(self, uid: str, rows: dict) -> None:
        """Per-frame inversion rows (workers.inversion.refine.inversion_rows; NaN as None)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None or not len(rows["seq_num"]):
                return
            for c, values in rows.items():
                values = np.asarray(values)
                if values.dtype.kind == "f":
                    values = np.where(np.isfinite(values), values, None)
                run.inversion.setdefault(c, []).extend(values.tolist())

    def inversion_since(self, uid: str, since: int = 0) -> tuple[dict, int] | None:
        """Columnar inversion rows from row index `since`, and the next `since`."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return None
            n = len(run.inversion.get("seq_num", ()))
            return {c: v[since:n] for c, v in run.inversion.items()}, n

    def phases_since(self, uid: str, since: int = 0, final: bool | None = None) -> tuple[dict, int, list] | None:
        """Columnar phase rows from row index `since`, next `since`, and all transitions so far."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return None
            n = len(run.phases["seq_num"])
            cols = {c: run.phases[c][since:n] for c in PHASE_COLUMNS}
            transitions = list(run.transitions)
        return _only(cols, final), n, transitions

    def set_info(self, uid: str, info: dict) -> None:
        """Keys added to the run's summary (modality; source_run and detector of a detector)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is not None:
                run.info = dict(info)

    def add_extras(self, uid: str, seq, qmaps, profiles: dict, scalars: dict) -> None:
        """A grazing batch's extras (workers.pipeline.BatchResult: qmaps, extra_profiles,
        scalars): the latest q-map and extra profiles are kept, scalar series whole (NaN as None)."""
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
                col = run.series.setdefault(name, {"seq_num": [], "value": []})
                col["seq_num"].extend(int(x) for x in seq)
                col["value"].extend(float(v) if np.isfinite(v) else None for v in np.asarray(values, float))

    def latest_qmap(self, uid: str) -> tuple | None:
        """(seq_num, q_xy, q_z, map (Nz, Nxy)) of the run's latest q-map, or None."""
        with self._lock:
            run = self._runs.get(uid)
            return None if run is None else run.qmap

    def extras(self, uid: str) -> dict | None:
        """Latest extra profiles and the scalar series of run `uid` (None: no such run)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return None
            profiles = {name: {"seq_num": s, "radial": np.asarray(r).tolist(), "unit": u,
                               "intensity": np.asarray(i).tolist(), "sigma": np.asarray(e).tolist()}
                        for name, (s, r, u, i, e) in run.extra_profiles.items()}
            series = {name: {k: list(v) for k, v in col.items()} for name, col in run.series.items()}
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

    def peaks_since(self, uid: str, since: int = 0, final: bool | None = None) -> tuple[dict, int] | None:
        """Columnar rows from row index `since`; returns (columns, next_since)."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                return None
            n = len(run.peaks["seq_num"])
            cols = {c: run.peaks[c][since:n] for c in PEAK_COLUMNS}
        return _only(cols, final), n


def _only(cols: dict, final: bool | None) -> dict:
    """The rows of columnar ``cols`` whose ``final`` flag is ``final`` (None: all)."""
    if final is None:
        return cols
    keep = [i for i, f in enumerate(cols["final"]) if f == final]
    return {c: [v[i] for i in keep] for c, v in cols.items()}
