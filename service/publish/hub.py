"""Where a result leaves: the dispatcher's results fan out to the API state, Tiled, the 0MQ
results stream and Prometheus. Live-view sinks fail softly (logged); Tiled failures are the
Tiled writer's to retry and spool."""
from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np

from ..ingest import Frame
from ..metrics import Metrics
from ..detectors import analysis_info
from .state import RunStore

log = logging.getLogger(__name__)


class PublishHub:
    def __init__(self, store: RunStore, metrics: Metrics, *, tiled=None, results=None, config: dict | None = None,
                 on_calibration=None):
        self.store = store
        self.metrics = metrics
        self.tiled = tiled            # service.publish.tiled_writer.TiledPublisher or None
        self.results = results        # service.publish.results.ResultsPublisher or None
        self.config = config or {}
        self.on_calibration = on_calibration      # called (uid, info) when a calibrant run was calibrated
        self._arrivals: dict[str, dict[int, float]] = {}
        self._peak_names: dict[str, list[str]] = {}
        # exact recent latencies (s) for benchmarks and the dashboard; Prometheus has the histogram
        self.latencies = {"provisional": deque(maxlen=100_000), "final": deque(maxlen=100_000)}

    def _safe(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("publishing %s failed", what)

    # ResultSink ----------------------------------------------------------------------------
    def run_started(self, uid: str, start: dict, setup) -> None:
        self.store.start_run(uid, start)
        info = analysis_info(start, setup)
        self.store.set_info(uid, info)
        self.metrics.runs_active.inc()
        self._arrivals[uid] = {}
        names = [p["name"] for p in (setup.fit.get("peaks", []) if setup is not None else [])]
        self._peak_names[uid] = names
        if self.tiled is not None:
            analysis = {} if setup is None else {"analysis": {"reduction": setup.reduction, "fit": setup.fit}}
            self._safe("tiled start", self.tiled.start_run, uid, start, self.config, {**info, **analysis})
        if self.results is not None:
            self._safe("results start", self.results.start_run, uid, start, self.config, names)

    def frame_accepted(self, frame: Frame) -> None:
        self.store.frame_received(frame.run_uid, frame.seq_num, frame.scalars)
        if frame.kind == "frame":
            self.store.set_latest_frame(frame.run_uid, frame.seq_num, frame.data)
        arrivals = self._arrivals.get(frame.run_uid)
        if arrivals is not None:
            arrivals[frame.seq_num] = frame.arrival

    def frames_reduced(self, uid: str, frames: list[Frame], out: dict) -> None:
        now = time.monotonic()
        for f in frames:
            self.metrics.latency.labels("provisional").observe(now - f.arrival)
            self.latencies["provisional"].append(now - f.arrival)
        if out.get("calibration") is not None and self.on_calibration is not None:
            self._safe("calibration", self.on_calibration, uid, out["calibration"])
        seq = np.array([f.seq_num for f in frames], dtype=np.int64)
        times = np.array([f.time for f in frames])
        self.store.add_profiles(uid, seq, times, out["radial"], out["unit"], out["intensity"], out["sigma"])
        self._publish_rows(uid, out["rows"], now)
        if out["rows"] is None:                 # no peak fit: a reduced frame is final
            self._frames_final(uid, seq.tolist(), now)
        self._publish_inversion(uid, out.get("inversion"))
        self._publish_phases(uid, out.get("phases"), out.get("transitions"))
        if self.tiled is not None:
            self._safe("tiled profiles", self.tiled.add_profiles, uid, seq, times, out["radial"],
                       out["intensity"], out["sigma"], out["unit"])
            time_of = dict(zip(seq.tolist(), times.tolist()))
            for s, image in out.get("snapshots") or ():
                self._safe("tiled snapshot", self.tiled.add_snapshot, uid, s, image,
                           time_of.get(int(s), float("nan")))
        self._publish_extras(uid, seq, times, out)

    def _publish_extras(self, uid: str, seq: np.ndarray, times: np.ndarray, out: dict) -> None:
        """A modality's extras (service/modalities.py): q-maps, extra profiles, per-frame scalars,
        to the state (REST) and Tiled (arrays qmap, q_xy, q_z, <profile>..., table scalars)."""
        maps, profiles, scalars = out.get("maps"), out.get("extra_profiles") or {}, out.get("scalars") or {}
        if not (maps or profiles or scalars):
            return
        self.store.add_extras(uid, seq, times, maps, profiles, scalars)
        if self.tiled is None:
            return
        if maps and maps["images"]:
            time_of = dict(zip(seq.tolist(), times.tolist()))
            mseq = [int(s) for s, _ in maps["images"]]
            self._safe("tiled qmap", self.tiled.add_stack, uid, "qmap", mseq,
                       [time_of.get(s, float("nan")) for s in mseq], {"qmap": np.stack([m for _, m in maps["images"]])},
                       {"q_xy": maps["q_xy"], "q_z": maps["q_z"]},
                       {"dims": ["snapshot", "q_z", "q_xy"], "unit": "1/nm", "description":
                        "mean corrected intensity on a (q_xy, q_z) grid; NaN: no pixel (missing wedge, off detector)"})
        for name, p in profiles.items():
            self._safe(f"tiled {name}", self.tiled.add_stack, uid, name, seq, times,
                       {name: p["intensity"], f"{name}_sigma": p["sigma"]}, {f"{name}_radial": p["radial"]},
                       {"dims": ["frame", "radial"], "unit": p["unit"]})
        if scalars:
            self._safe("tiled scalars", self.tiled.add_table, uid, "scalars",
                       {"seq_num": seq, "time": times, **{k: np.asarray(v, np.float64) for k, v in scalars.items()}})

    def _publish_rows(self, uid: str, rows: dict | None, now: float) -> None:
        if not rows or len(rows["seq_num"]) == 0:
            return
        final = np.asarray(rows["final"], dtype=bool)
        self._frames_final(uid, set(np.asarray(rows["seq_num"])[final].tolist()), now)
        self.metrics.change_points.inc(int(np.sum(np.asarray(rows["change_point"], bool) & final)))
        self.store.add_peaks(uid, rows)
        if self.tiled is not None:
            self._safe("tiled peaks", self.tiled.add_peaks, uid, rows)
        if self.results is not None:
            self._safe("results rows", self.results.publish_rows, uid, rows)

    def _frames_final(self, uid: str, seqs, now: float) -> None:
        """Count frames whose final result leaves now, with their arrival-to-final latency."""
        arrivals = self._arrivals.get(uid, {})
        for s in seqs:
            a = arrivals.pop(int(s), None)
            if a is not None:
                self.metrics.latency.labels("final").observe(now - a)
                self.latencies["final"].append(now - a)
        self.metrics.frames_final.inc(len(seqs))

    def _publish_inversion(self, uid: str, rows: dict | None) -> None:
        """Structural parameters per frame: state (REST), Tiled table ``inversion``, results stream."""
        if rows is None or not len(rows["seq_num"]):
            return
        self.store.add_inversion(uid, rows)
        if self.tiled is not None:
            self._safe("tiled inversion", self.tiled.add_table, uid, "inversion", rows)
        if self.results is not None:
            self._safe("results inversion", self.results.publish_stream, uid, "inversion", rows)

    def open_runs(self) -> list[str]:
        """Uids of the runs started and not stopped yet."""
        return list(self._arrivals)

    def interrupt_open_runs(self, reason: str) -> list[str]:
        """Close every open run as interrupted (exit_status "abort", `reason`) without more
        results: for a service stopping before their stop documents. Returns their uids."""
        uids = self.open_runs()
        for uid in uids:
            log.warning("run %s: closed as interrupted (%s)", uid[:8], reason)
            self.run_stopped(uid, {"exit_status": "abort", "reason": reason}, None)
        return uids

    def _publish_phases(self, uid: str, rows: dict | None, transitions: list | None) -> None:
        """Phase labels per frame and confirmed transitions: state, Prometheus, Tiled, results stream."""
        transitions = transitions or []
        if rows is None and not transitions:
            return
        if rows is not None and len(rows["seq_num"]):
            final = np.asarray(rows["final"], bool)
            for phase in np.asarray(rows["phase"])[final].tolist():
                if phase:
                    self.metrics.phase_frames.labels(phase).inc()
        for t in transitions:
            self.metrics.phase_transitions.labels(t["from"], t["to"]).inc()
            log.info("run %s: phase %s -> %s at frame %d (t = %.3f ± %.3f s%s)", uid[:8], t["from"], t["to"],
                     t["seq_num"], t["time"], t["time_sigma"], ", change point" if t["change_point"] else "")
        self.store.add_phases(uid, rows, transitions)
        if self.tiled is not None:
            if rows is not None and len(rows["seq_num"]):
                self._safe("tiled phases", self.tiled.add_table, uid, "phases", rows)
            if transitions:
                cols = {k: [t[k] for t in transitions] for k in transitions[0]}
                self._safe("tiled transitions", self.tiled.add_table, uid, "phase_transitions", cols)
        if self.results is not None and hasattr(self.results, "publish_phases"):
            self._safe("results phases", self.results.publish_phases, uid, rows, transitions)

    def frames_failed(self, uid: str, seq, reason: str, detail: str) -> None:
        log.warning("run %s: %d frame(s) failed: %s %s", uid[:8], len(seq), reason, detail)
        self.metrics.frames_failed.labels(reason).inc(len(seq))
        self.store.add_failed(uid, len(seq), reason)
        arrivals = self._arrivals.get(uid, {})
        for s in np.asarray(seq).tolist():
            arrivals.pop(int(s), None)

    def run_stopped(self, uid: str, stop: dict, rows: dict | None, extras: dict | None = None) -> None:
        if uid not in self._arrivals:           # stopped already (interrupt_open_runs, then the worker's answer)
            log.warning("run %s: stop after the run was closed; ignored", uid[:8])
            return
        self._publish_rows(uid, rows, time.monotonic())
        self._publish_phases(uid, (extras or {}).get("phases"), (extras or {}).get("transitions"))
        exit_status = stop.get("exit_status", "unknown")
        reason = stop.get("reason", "")
        status = {"success": "complete"}.get(exit_status, exit_status)
        self.store.stop_run(uid, status, reason)
        self.metrics.runs_active.dec()
        self._arrivals.pop(uid, None)
        if self.tiled is not None:
            self._safe("tiled stop", self.tiled.stop_run, uid, exit_status, reason)
        if self.results is not None:
            self._safe("results stop", self.results.stop_run, uid, exit_status)
