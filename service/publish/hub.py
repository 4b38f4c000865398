"""Where a result leaves: each worker result fans out to the live views (the REST state, the 0MQ
results stream, Prometheus) and to Tiled, the archive.

The two fail separately, as bluesky keeps ``make_callback_safe`` (live views) apart from its
writers: a live view that raises is logged and counted (``scatterflow_publish_errors{sink}``)
and the others go on; Tiled's writer retries and spools by itself, and a refusal at enqueue
(bad data) is logged as an error and counted, never hidden, and never stops the live views.

A run ends with one status (REST, and the reason with it), decided here (`run_outcome`):
"complete"; the stop document's exit_status when not "success" ("abort", "fail"); "failed" when
every frame failed; "incomplete" when events its stop document announced never arrived; or,
before its stop document, "refused" (limits or a bad value at setup) or "quarantined" (its worker
died twice while reducing it). Tiled and the results stream get exit_status "success" for
"complete" only ("abort" for "abort", else "fail"), and the reason.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from workers.pipeline import BatchResult, RunFinal, RunSpec, final_seq

from ..detectors import analysis_info
from ..messages import MISSING_EVENTS_KEY, RECOVERED_EVENTS_KEY, Frame
from ..metrics import Metrics
from .state import RunStore

log = logging.getLogger(__name__)
SERVICE_OUTCOMES = ("incomplete", "failed", "refused", "quarantined")   # statuses the service decides, not the stop


@dataclass
class _OpenRun:
    """What the hub keeps of a run until it ends: arrival times (time.monotonic()) of frames
    without a final result, and the counts that decide its status."""
    arrivals: dict[int, float] = field(default_factory=dict)
    received: int = 0
    reduced: int = 0
    failed: Counter = field(default_factory=Counter)      # reason -> frames


def run_outcome(stop: dict, run: _OpenRun) -> tuple[str, str]:
    """(status, reason) of a run at its stop document (module docstring)."""
    exit_status = stop.get("exit_status", "unknown")
    reason = str(stop.get("reason", "") or "")
    if exit_status != "success":
        return exit_status, reason
    if run.received and not run.reduced and run.failed:
        causes = ", ".join(f"{n} {why}" for why, n in sorted(run.failed.items()))
        return "failed", f"every frame failed ({causes})"
    missing = stop.get(MISSING_EVENTS_KEY) or 0
    if isinstance(missing, int) and missing > 0:
        return "incomplete", f"{missing} event(s) lost upstream never arrived"
    return "complete", reason


def sink_exit_status(status: str) -> str:
    """The exit_status Tiled and the results stream get for a run's status."""
    return {"complete": "success", "abort": "abort"}.get(status, "fail")


QMAP_AXES = {"dims": ["snapshot", "q_z", "q_xy"], "unit": "1/nm",
             "description": "mean corrected intensity on a (q_xy, q_z) grid; NaN: no pixel (missing wedge, off detector)"}


class PublishHub:
    def __init__(self, store: RunStore, metrics: Metrics, *, tiled=None, results=None, config: dict | None = None,
                 on_calibration=None):
        self.store = store
        self.metrics = metrics
        self.tiled = tiled            # service.publish.tiled.TiledPublisher or None
        self.results = results        # service.publish.results.ResultsPublisher or None
        self.config = config or {}
        self.on_calibration = on_calibration      # called (uid, info) when a calibrant run was calibrated
        self._open: dict[str, _OpenRun] = {}
        # exact recent latencies (s) for benchmarks and the dashboard; Prometheus has the histogram
        self.latencies = {"provisional": deque(maxlen=100_000), "final": deque(maxlen=100_000)}

    def _guarded(self, sink: str, fn, *args) -> None:
        """Call one sink; a failure is logged and counted, and the other sinks still get the result."""
        try:
            fn(*args)
        except Exception:
            self.metrics.publish_errors.labels(sink).inc()
            if sink == "tiled":
                log.error("Tiled refused a write (%s); the result is not archived", fn.__name__, exc_info=True)
            else:
                log.exception("publishing to %s failed (%s)", sink, fn.__name__)

    # ResultSink ----------------------------------------------------------------------------
    def run_started(self, uid: str, start: dict, spec: RunSpec | None) -> None:
        info = analysis_info(start, spec)
        names = [] if spec is None else spec.peak_names
        self.metrics.runs_active.inc()
        self._open[uid] = _OpenRun()
        self._guarded("state", self._state_started, uid, start, info)
        if self.results is not None:
            self._guarded("results", self.results.start_run, uid, start, self.config, names)
        if self.tiled is not None:
            analysis = {} if spec is None else {"analysis": _analysis_metadata(spec)}
            self._guarded("tiled", self.tiled.start_run, uid, start, self.config, {**info, **analysis})

    def _state_started(self, uid: str, start: dict, info: dict) -> None:
        self.store.start_run(uid, start)
        self.store.set_info(uid, info)

    def frame_accepted(self, frame: Frame) -> None:
        self._guarded("state", self._state_accepted, frame)
        run = self._open.get(frame.run_uid)
        if run is not None:
            run.arrivals[frame.seq_num] = frame.arrival
            run.received += 1

    def _state_accepted(self, frame: Frame) -> None:
        self.store.frame_received(frame.run_uid, frame.seq_num, frame.scalars)
        if frame.kind == "frame" and isinstance(frame.data, np.ndarray):     # not a FrameRef: read on a Ray node
            self.store.set_latest_frame(frame.run_uid, frame.seq_num, frame.data)

    def frames_reduced(self, uid: str, frames: list[Frame], result: BatchResult) -> None:
        now = time.monotonic()
        run = self._open.get(uid)
        if run is not None:
            run.reduced += len(result.seq)
        for f in frames:
            self.metrics.latency.labels("provisional").observe(now - f.arrival)
            self.latencies["provisional"].append(now - f.arrival)
        if result.calibration is not None and self.on_calibration is not None:
            self._guarded("calibration", self.on_calibration, uid, result.calibration)
        self._count(uid, result.peaks, result.phases, result.transitions, result.reseeds, result.final_seq(), now)
        self._guarded("state", self._state_reduced, uid, result)
        if self.results is not None:
            p = result.profiles
            self._guarded("results", self.results.publish_profiles, uid, result.seq, result.times, p.radial, p.unit,
                          p.intensity, p.sigma)
            self._guarded("results", self._results_rows, uid, result.peaks, result.phases, result.transitions,
                          result.inversion)
        if self.tiled is not None:
            self._tiled_reduced(uid, result)

    def _state_reduced(self, uid: str, r: BatchResult) -> None:
        p = r.profiles
        self.store.add_profiles(uid, r.seq, r.times, p.radial, p.unit, p.intensity, p.sigma)
        self._state_rows(uid, r.peaks, r.phases, r.transitions, r.reseeds)
        if _has_rows(r.inversion):
            self.store.add_inversion(uid, r.inversion)
        if r.qmaps is not None or r.extra_profiles or r.scalars:
            self.store.add_extras(uid, r.seq, r.qmaps, r.extra_profiles, r.scalars)

    def _state_rows(self, uid: str, peaks: dict | None, phases: dict | None, transitions: list, reseeds: int) -> None:
        self.store.add_reseeds(uid, reseeds)
        if _has_rows(peaks):
            self.store.add_peaks(uid, peaks)
        if phases is not None or transitions:
            self.store.add_phases(uid, phases, transitions)

    def _results_rows(self, uid: str, peaks: dict | None, phases: dict | None, transitions: list,
                      inversion: dict | None = None) -> None:
        if _has_rows(peaks):
            self.results.publish_rows(uid, peaks)
        if _has_rows(inversion):
            self.results.publish_stream(uid, "inversion", inversion)
        if phases is not None or transitions:
            self.results.publish_phases(uid, phases, transitions)

    def _tiled_reduced(self, uid: str, r: BatchResult) -> None:
        """Each item of the archive guarded on its own: one refused write loses only itself."""
        p, tiled = r.profiles, self.tiled
        self._guarded("tiled", tiled.add_profiles, uid, r.seq, r.times, p.radial, p.intensity, p.sigma, p.unit)
        time_of = dict(zip(np.asarray(r.seq).tolist(), np.asarray(r.times).tolist()))
        for s, image in r.snapshots:
            self._guarded("tiled", tiled.add_snapshot, uid, s, image, time_of.get(int(s), float("nan")))
        if _has_rows(r.peaks):
            self._guarded("tiled", tiled.add_peaks, uid, r.peaks)
        if _has_rows(r.inversion):
            self._guarded("tiled", tiled.add_table, uid, "inversion", r.inversion)
        self._tiled_phases(uid, r.phases, r.transitions)
        if r.qmaps is not None and r.qmaps.images:
            mseq = [int(s) for s, _ in r.qmaps.images]
            self._guarded("tiled", tiled.add_stack, uid, "qmap", mseq, [time_of.get(s, float("nan")) for s in mseq],
                          {"qmap": np.stack([m for _, m in r.qmaps.images])},
                          {"q_xy": r.qmaps.q_xy, "q_z": r.qmaps.q_z}, QMAP_AXES)
        for name, e in r.extra_profiles.items():
            self._guarded("tiled", tiled.add_stack, uid, name, r.seq, r.times,
                          {name: e.intensity, f"{name}_sigma": e.sigma}, {f"{name}_radial": e.radial},
                          {"dims": ["frame", "radial"], "unit": e.unit})
        if r.scalars:
            self._guarded("tiled", tiled.add_table, uid, "scalars",
                          {"seq_num": r.seq, "time": r.times,
                           **{k: np.asarray(v, np.float64) for k, v in r.scalars.items()}})

    def _tiled_phases(self, uid: str, rows: dict | None, transitions: list) -> None:
        if _has_rows(rows):
            self._guarded("tiled", self.tiled.add_table, uid, "phases", rows)
        if transitions:
            cols = {k: [t[k] for t in transitions] for k in transitions[0]}
            self._guarded("tiled", self.tiled.add_table, uid, "phase_transitions", cols)

    def _count(self, uid: str, peaks: dict | None, phases: dict | None, transitions: list, reseeds: int,
               final_seq: set[int], now: float) -> None:
        """Prometheus: re-seeds, change points of final rows, frames whose final result leaves
        now with their arrival-to-final latency, phase labels and transitions."""
        self.metrics.reseeds.inc(reseeds)
        if _has_rows(peaks):
            self.metrics.change_points.inc(int(np.sum(np.asarray(peaks["change_point"], bool)
                                                      & np.asarray(peaks["final"], bool))))
        run = self._open.get(uid)
        arrivals = run.arrivals if run is not None else {}
        for s in final_seq:
            a = arrivals.pop(int(s), None)
            if a is not None:
                self.metrics.latency.labels("final").observe(now - a)
                self.latencies["final"].append(now - a)
        self.metrics.frames_final.inc(len(final_seq))
        self._count_phases(uid, phases, transitions)

    def _count_phases(self, uid: str, rows: dict | None, transitions: list) -> None:
        """Phase labels and transitions in Prometheus (and the log for transitions)."""
        if _has_rows(rows):
            final = np.asarray(rows["final"], bool)
            for phase in np.asarray(rows["phase"])[final].tolist():
                if phase:
                    self.metrics.phase_frames.labels(phase).inc()
        for t in transitions:
            self.metrics.phase_transitions.labels(t["from"], t["to"]).inc()
            log.info("run %s: phase %s -> %s at frame %d (t = %.3f ± %.3f s%s)", uid[:8], t["from"], t["to"],
                     t["seq_num"], t["time"], t["time_sigma"], ", change point" if t["change_point"] else "")

    def open_runs(self) -> list[str]:
        """Uids of the runs started and not stopped yet."""
        return list(self._open)

    def interrupt_open_runs(self, reason: str) -> list[str]:
        """Close every open run as interrupted (exit_status "abort", `reason`) without more
        results: for a service stopping before their stop documents. Returns their uids."""
        uids = self.open_runs()
        for uid in uids:
            log.warning("run %s: closed as interrupted (%s)", uid[:8], reason)
            self.run_stopped(uid, {"exit_status": "abort", "reason": reason}, None)
        return uids

    def frames_failed(self, uid: str, seq, reason: str, detail: str) -> None:
        """Counted (metrics, REST) each time; logged once per run and reason (a refused run's
        frames are not logged: its refusal was)."""
        n = len(seq)
        self.metrics.frames_failed.labels(reason).inc(n)
        self._guarded("state", self.store.add_failed, uid, n, reason)
        run = self._open.get(uid)
        if run is None:
            return
        if not run.failed[reason]:
            log.warning("run %s: %d frame(s) failed: %s %s (more of this run counted, not logged)",
                        uid[:8], n, reason, detail)
        run.failed[reason] += n
        for s in np.asarray(seq).tolist():
            run.arrivals.pop(int(s), None)

    def run_refused(self, uid: str, kind: str, reason: str) -> None:
        """Close run ``uid`` as "refused" before its stop document: ``kind`` "limits" (a size
        above its ceiling) or "setup_error" (a bad value), counted in runs_refused{kind};
        ``reason`` names the key and value."""
        self.metrics.runs_refused.labels(kind).inc()
        log.error("run %s refused (%s): %s", uid[:8], kind, reason)
        self._close(uid, None, "refused", reason)

    def run_quarantined(self, uid: str, reason: str) -> None:
        """Close run ``uid`` as "quarantined" (its worker died twice while reducing it)."""
        self.metrics.runs_quarantined.inc()
        self._close(uid, None, "quarantined", reason)

    def run_stopped(self, uid: str, stop: dict, final: RunFinal | None) -> None:
        run = self._open.get(uid)
        if run is None:           # stopped already (interrupt_open_runs, then the worker's answer)
            log.warning("run %s: stop after the run was closed; ignored", uid[:8])
            return
        status, reason = run_outcome(stop, run)
        if status in ("failed", "incomplete"):
            log.warning("run %s %s: %s", uid[:8], status, reason)
        if RECOVERED_EVENTS_KEY in stop:
            self._guarded("state", self._state_recovery, uid, stop)
        self._close(uid, final, status, reason)

    def _state_recovery(self, uid: str, stop: dict) -> None:
        """The run's record names the events recovered from the catalogue and those still missing."""
        record = self.store.get(uid)
        if record is not None:
            self.store.set_info(uid, {**record.info, "events_recovered": int(stop[RECOVERED_EVENTS_KEY]),
                                      "events_unrecoverable": int(stop.get(MISSING_EVENTS_KEY) or 0)})

    def _close(self, uid: str, final: RunFinal | None, status: str, reason: str) -> None:
        """Publish the final rows of open run ``uid`` and end it with ``status`` everywhere."""
        if uid not in self._open:
            log.warning("run %s: %s after the run was closed; ignored", uid[:8], status)
            return
        final = final or RunFinal()
        done = set() if final.peaks is None else final_seq(final.peaks)
        self._count(uid, final.peaks, final.phases, final.transitions, final.reseeds, done, time.monotonic())
        exit_status = sink_exit_status(status)
        self._guarded("state", self._state_stopped, uid, final, status, reason)
        if self.results is not None:
            self._guarded("results", self._results_rows, uid, final.peaks, final.phases, final.transitions)
            self._guarded("results", self.results.stop_run, uid, exit_status, reason)
        if self.tiled is not None:
            if _has_rows(final.peaks):
                self._guarded("tiled", self.tiled.add_peaks, uid, final.peaks)
            self._tiled_phases(uid, final.phases, final.transitions)
            own = status if status in SERVICE_OUTCOMES else None     # else Tiled's own "complete"/"interrupted"
            self._guarded("tiled", self.tiled.stop_run, uid, exit_status, reason, own)
        self.metrics.runs_active.dec()
        self._open.pop(uid, None)

    def _state_stopped(self, uid: str, final: RunFinal, status: str, reason: str) -> None:
        self._state_rows(uid, final.peaks, final.phases, final.transitions, final.reseeds)
        self.store.stop_run(uid, status, reason)
        record = self.store.get(uid)
        inv = record.inversion_tally.summary() if record is not None else {}
        if inv.get("bad"):
            log.warning("run %s: the inversion model %s cannot describe %d of %d frames (fit_quality bad: "
                        "reduced chi2 above inversion.bad_chi2); their parameters are not measurements of "
                        "the sample. Other models: inversion.model (SAXS), inversion.gisaxs.model (GISAXS)", uid[:8],
                        inv["model"], inv["bad"], inv["frames"])


def _has_rows(rows: dict | None) -> bool:
    return rows is not None and len(rows["seq_num"]) > 0


def _analysis_metadata(spec: RunSpec) -> dict:
    """What the Tiled container says of a run's analysis: reduction and fit settings as JSON."""
    import dataclasses

    from ..jsonsafe import jsonable
    red = {k: v for k, v in dataclasses.asdict(spec.reduction).items() if k != "grazing"}
    if spec.reduction.grazing is not None:            # one flat mapping, as the configuration's `reduction`
        red.update({k: v for k, v in dataclasses.asdict(spec.reduction.grazing).items() if k != "modality"})
    fit = None if spec.model is None else {"q_range": spec.model.q_range,
                                            "background": dataclasses.asdict(spec.model.background),
                                            "peaks": [dataclasses.asdict(p) for p in spec.model.peaks],
                                            "regularizer": dataclasses.asdict(spec.regularizer)}
    return jsonable({"reduction": red, "fit": fit})
