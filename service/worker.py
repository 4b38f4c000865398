"""The worker process: where a frame is reduced and fitted.

One process per GPU (or several on CPU). It receives messages from the dispatcher on a bounded
queue and answers on a shared one. All numerics live in `workers/`; this module is the loop:

  ("start", uid, RunSetup)                       -> build integrator (cached per geometry) and fitter
  ("frames", uid, batch_id, seq, time, frames)   -> integrate batch, fit, answer ("reduced", ...)
  ("stop", uid)                                  -> flush the regularizer window, answer ("stopped", ...)
  None                                           -> exit

A batch goes through two stages on two threads, `RunPipeline.reduce` (integration: reads the
frames) then `RunPipeline.complete` (fits: reads the profiles), so the fits of one batch overlap
the integration of the next; answers keep batch order.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .frame_slots import SlotReader, SlotRef

log = logging.getLogger(__name__)

SNAPSHOT_MAX_PX = 256                       # corrected 2D snapshots: at most this many px on the long side
_NOT_INTEGRATOR = frozenset({"snapshot_every"})   # reduction keys that do not change the integrator


@dataclass
class RunSetup:
    """Everything a worker needs to reduce and fit one run (picklable)."""
    geometry: Any                       # workers.geometry.Geometry
    mask: np.ndarray | None = None      # bool (rows, cols), True = masked
    dark: np.ndarray | None = None
    flat: np.ndarray | None = None
    reduction: dict = field(default_factory=dict)   # ReductionConfig as dict
    fit: dict = field(default_factory=dict)         # FitConfig as dict
    calibrant: str | None = None                    # a calibrant run: calibrate from its first frame
    phases: dict | None = None                      # {"spec": dict, "checkpoint": state or None}; None: off
    inversion: dict | None = None                   # {"state", "refine", "max_iter", "q_range"}; None: off

    def integrator_key(self, shape: tuple[int, ...]) -> str:
        reduction = sorted((k, v) for k, v in self.reduction.items() if k not in _NOT_INTEGRATOR)
        h = hashlib.sha1(repr((self.geometry, reduction, shape)).encode())
        for arr in (self.mask, self.dark, self.flat):
            h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


@dataclass
class Reduced:
    """A batch between `RunPipeline.reduce` and `RunPipeline.complete`: its partial result and
    the profiles (radial (N,), intensity and sigma (B, N), tensors or arrays) to fit."""
    seq: np.ndarray
    times: np.ndarray
    out: dict
    radial: Any
    intensity: Any
    sigma: Any
    unit: str
    clock: "_StageClock"


class NoGeometry(ValueError):
    """2D frames arrived for a run without a geometry."""


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("workers.device is 'cuda' but no CUDA device is available")
    return name


class RunPipeline:
    """Reduce-then-fit for one run inside a worker."""

    def __init__(self, setup: RunSetup, device: str, integrators: dict):
        from workers.temporal import TrajectoryFitter, model_spec_from_dict
        self.setup = setup
        self.device = device
        self.integrators = integrators
        self.fitter = None            # no peaks configured: reduce (and invert) only
        if setup.fit.get("peaks"):
            model, regularizer = model_spec_from_dict(setup.fit)
            self.fitter = TrajectoryFitter(model, regularizer, device=device)
        self.inverter = None          # workers.inversion.SaxsInverter when inversion is on
        if setup.inversion:
            from workers.inversion.refine import SaxsInverter
            self.inverter = SaxsInverter(setup.inversion["state"], device=device)
        self.calibration_done = False
        self.snapshot_every = int(setup.reduction.get("snapshot_every", 25) or 0)
        if self.snapshot_every < 0:
            raise ValueError(f"reduction.snapshot_every must be >= 0 (0 = off), got {self.snapshot_every}")
        self._first_frame_seen = False
        self._staging = None          # page-locked host buffer for GPU transfers
        self.phases = self._phase_tracker(setup, device)
        from .modalities import GRAZING, GrazingReduction
        self.grazing = None           # GrazingReduction of a gisaxs/giwaxs run (service/modalities.py)
        if setup.reduction.get("modality", "saxs") in GRAZING and setup.geometry is not None:
            self.grazing = GrazingReduction(setup, device, integrators)
        elif setup.geometry is not None and setup.geometry.shape is not None:   # build now, not on the first frame
            self._integrator(tuple(setup.geometry.shape))

    def _integrator(self, shape: tuple[int, ...]):
        from workers.integrate import build_integrator_1d
        key = self.setup.integrator_key(shape)
        if key not in self.integrators:
            r = self.setup.reduction
            mask = self.setup.mask
            if mask is None:
                mask = self.setup.geometry.detector_mask()
            log.info("worker %d: building integration matrix for %s (%s, %s bins)", os.getpid(),
                     self.setup.geometry.detector, r.get("method"), r.get("npt"))
            self.integrators[key] = build_integrator_1d(
                self.setup.geometry, npt=r.get("npt", 1000), unit=r.get("unit", "q_nm^-1"),
                method=r.get("method", "bbox"), radial_range=r.get("radial_range"),
                azimuth_range=r.get("azimuth_range"), mask=mask, dummy=-1.0, delta_dummy=0.5,
                polarization_factor=r.get("polarization"), dark=self.setup.dark, flat=self.setup.flat,
                device=self.device)
        return self.integrators[key]

    def process(self, seq: np.ndarray, times: np.ndarray, frames: np.ndarray, kind: str = "frame") -> dict:
        """One batch reduced and fitted: profiles, peak rows and the extras the run asks for,
        with out["seconds"] the wall time of each stage (for the metrics and `scatterflow bench`)."""
        return self.complete(self.reduce(seq, times, frames, kind))

    def reduce(self, seq, times, frames, kind: str = "frame") -> "Reduced":
        """Stage 1 of a batch, everything that reads the frames: integration, modality maps,
        snapshots, calibration. `frames` (shared memory) are not used after it returns."""
        clock = _StageClock()
        if kind == "profile":                        # already reduced: (B, 3, N) q, I, sigma
            radial = frames[0, 0]
            if not np.allclose(frames[:, 0], radial):
                raise ValueError("profiles of one run must share their q grid")
            out = {"radial": radial, "unit": "q_nm^-1", "intensity": frames[:, 1].astype(np.float32),
                   "sigma": frames[:, 2].astype(np.float32)}      # profiles come pickled, not in shared memory
            return Reduced(seq, times, out, radial, frames[:, 1], frames[:, 2], "q_nm^-1", clock)
        if self.setup.geometry is None:
            raise NoGeometry("no geometry for this run (set geometry.poni, or 'geometry' in the start document)")
        with clock("integrate"):
            batch = self._device_batch(frames)
            if self.grazing is not None:             # per-modality profile, plus maps, extra profiles, scalars
                integrator, result, extras = self.grazing(batch, seq)
            else:
                integrator, extras = self._integrator(frames.shape[1:]), {}
                result = integrator(batch)
            out = {"radial": result.radial.cpu().numpy(), "unit": result.unit,
                   "intensity": result.intensity.float().cpu().numpy(),
                   "sigma": result.sigma.float().cpu().numpy()}
        out.update(extras)
        with clock("snapshots"):
            snapshots = self._snapshots(integrator, batch, seq)
        if snapshots:
            out["snapshots"] = snapshots
        if self.setup.calibrant and not self.calibration_done:
            self.calibration_done = True
            out["calibration"] = self._calibrate(frames[0])
        return Reduced(seq, times, out, result.radial, result.intensity, result.sigma, result.unit, clock)

    def complete(self, r: "Reduced") -> dict:
        """Stage 2 of a batch, from its profiles only: peak fits, inversion, phases. Sequential
        per run (the fitter's window), so it may run on another thread than `reduce`."""
        out, clock = r.out, r.clock
        with clock("fit"):
            out["rows"] = self._fit(r.radial, r.intensity, r.sigma, r.seq, r.times)
            out["reseeds"] = self.reseeds
        if r.unit.startswith("q_nm"):
            with clock("inversion"):
                self._with_inversion(out, r.seq, r.times, r.radial, r.intensity, r.sigma)
        with clock("phases"):
            self._with_phases(out, r.seq, r.radial, r.intensity)
        out["seconds"] = clock.seconds
        return out

    def _fit(self, radial, intensity, sigma, seq, times) -> dict | None:
        """Peak rows of the batch (provisional, and final for frames leaving the window), or
        None when the run fits no peaks."""
        return None if self.fitter is None else self.fitter.update(radial, intensity, sigma, seq, times)

    @property
    def reseeds(self) -> int:
        return 0 if self.fitter is None else int(self.fitter.reseeds)

    def _with_inversion(self, out: dict, seq, times, radial, intensity, sigma) -> None:
        """Per-frame structural parameters (workers.inversion.refine.inversion_rows) of the
        batch's profiles (q in 1/nm) in out["inversion"]; points outside q_range get no weight."""
        if self.inverter is None:
            return
        import torch
        from workers.inversion.refine import inversion_rows
        q = torch.as_tensor(radial, dtype=torch.float64).detach().cpu()
        y = torch.as_tensor(intensity, dtype=torch.float64).detach().cpu().clone()
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().clone()
        q_range = self.setup.inversion.get("q_range")
        if q_range is not None:
            outside = (q < q_range[0]) | (q > q_range[1])
            y[:, outside], s[:, outside] = math.nan, math.nan
        res = self.inverter(q, y, s, refine_fit=bool(self.setup.inversion.get("refine", True)),
                            max_iter=int(self.setup.inversion.get("max_iter", 40)))
        out["inversion"] = inversion_rows(res, np.asarray(seq), np.asarray(times))

    @staticmethod
    def _phase_tracker(setup: RunSetup, device: str):
        """workers.phase.PhaseTracker for the run, or None (off, or the fit lacks the spec's peaks)."""
        if not setup.phases:
            return None
        from workers.phase import PhaseTracker, phase_spec_from_dict
        spec = phase_spec_from_dict(setup.phases.get("spec") or {})
        try:
            if not setup.fit.get("peaks"):
                raise ValueError("no peaks are fitted")
            spec.check_peaks([p["name"] for p in setup.fit.get("peaks", [])])
            return PhaseTracker(spec, setup.phases.get("checkpoint"), device=device)
        except ValueError as exc:
            log.warning("worker %d: no phase identification for this run: %s", os.getpid(), exc)
            return None

    def _with_phases(self, out: dict, seq, radial, intensity) -> dict:
        """Add per-frame phase rows and confirmed transitions to a batch's result."""
        if self.phases is not None and out["rows"] is not None:
            out["phases"] = self.phases.update(out["rows"], seq_num=seq, radial=radial, intensity=intensity)
            out["transitions"] = self.phases.pop_transitions()
        return out

    def finish(self) -> tuple[dict, dict]:
        """Final rows of the frames still in the regularizer window, and their phases."""
        rows = None if self.fitter is None else self.fitter.finish()
        extras = {}
        if self.phases is not None:
            extras = {"phases": self.phases.finish(rows), "transitions": self.phases.pop_transitions()}
        return rows, extras

    def _device_batch(self, frames: np.ndarray):
        """(B, H, W) frames as a tensor on the worker's device. On CPU a view of the (shared
        memory) array; on a GPU copied through a reused page-locked buffer, so the host-to-device
        copy is one DMA transfer without a fresh pinned allocation per batch."""
        import warnings

        import torch
        with warnings.catch_warnings():      # read-only shared memory: the integrator only reads
            warnings.simplefilter("ignore", UserWarning)
            batch = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device == "cpu":
            return batch
        staging = self._staging
        if staging is None or staging.shape != batch.shape or staging.dtype != batch.dtype:
            staging = self._staging = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
        staging.copy_(batch)
        return staging.to(self.device, non_blocking=True)

    def _calibrate(self, frame: np.ndarray) -> dict | None:
        """Geometry refined from a calibrant frame, starting from the run's geometry."""
        from workers.calibrate import calibrate
        g = self.setup.geometry
        mask = self.setup.mask
        ai = g.to_pyfai()
        f2d = ai.getFit2D()
        try:
            res = calibrate(frame, detector=g.detector, calibrant=self.setup.calibrant, wavelength=g.wavelength,
                            distance_guess=f2d["directDist"] * 1e-3, mask=mask,
                            beam_center_guess=(f2d["centerY"] - 0.5, f2d["centerX"] - 0.5), device=self.device)
        except Exception as exc:          # a failed calibration must not lose the run's frames
            log.error("calibration with %s failed: %s", self.setup.calibrant, exc)
            return None
        return {"geometry": res.geometry, "calibrant": self.setup.calibrant, "rings_used": res.rings_used,
                "rms_residual_deg": res.rms_residual_deg, "n_points": res.n_points, "seconds": res.seconds}

    def _snapshots(self, integrator, batch, seq: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Corrected 2D frames of the run's first frame and of every `snapshot_every`-th
        seq_num, block-averaged (NaN-ignoring mean) to at most SNAPSHOT_MAX_PX px on the long
        side: [(seq_num, (h, w) float32, NaN = masked), ...]."""
        if not self.snapshot_every or len(seq) == 0:
            return []
        seq = np.asarray(seq, np.int64)
        pick = seq % self.snapshot_every == 0
        if not self._first_frame_seen:
            pick[0] = True
            self._first_frame_seen = True
        idx = np.flatnonzero(pick)
        if idx.size == 0:
            return []
        binning = max(1, -(-max(integrator.shape) // SNAPSHOT_MAX_PX))
        try:
            images = integrator.corrected(batch[idx.tolist()], binning=binning).float().cpu().numpy()
        except Exception:        # a view for people: never lose the batch's profiles over it
            log.exception("worker %d: snapshot of frame(s) %s failed", os.getpid(), seq[idx].tolist())
            return []
        return [(int(seq[i]), images[k]) for k, i in enumerate(idx)]


class _StageClock:
    """Wall seconds per named stage of one batch: ``with clock("fit"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def worker_main(index: int, device_name: str, inbox, outbox, threads: int | None = None) -> None:
    """Entry point of a worker process (spawned)."""
    import torch

    from .memory import reuse_freed_buffers
    reuse_freed_buffers()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{index}] %(levelname)s %(message)s")
    device = resolve_device(device_name)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    integrators: dict = {}
    runs: dict[str, RunPipeline] = {}
    slots = SlotReader()
    import workers.integrate  # noqa: F401  (import pyFAI and friends before the first run, not during it)
    import workers.temporal  # noqa: F401
    # Two stages on two threads, so that a batch's fits overlap the next batch's integration
    # (torch releases the GIL in its kernels): reduce() here, complete() on the "fit" thread, in
    # batch order through a queue of one. The shared-memory frames are read by reduce() only.
    fits: queue.Queue = queue.Queue(maxsize=1)
    fitter = threading.Thread(target=_fit_stage, args=(index, fits, outbox), name="fit", daemon=True)
    fitter.start()
    outbox.put(("ready", index, device, os.getpid()))
    while True:
        msg = inbox.get()
        if msg is None:
            break
        kind, uid = msg[0], msg[1]
        try:
            if kind == "start":
                runs[uid] = RunPipeline(msg[2], device, integrators)
            elif kind == "frames":
                _, _, batch_id, seq, times, frames, frame_kind = msg
                if isinstance(frames, SlotRef):      # shared memory: read in place, valid until we answer
                    frames = slots.read(frames)
                pipeline = runs.get(uid)
                if pipeline is None:
                    outbox.put(("failed", uid, batch_id, seq, "no_setup", "run setup failed or missing"))
                    continue
                fits.put(("frames", uid, batch_id, pipeline, pipeline.reduce(seq, times, frames, frame_kind)))
            elif kind == "stop":
                fits.put(("stop", uid, None, runs.pop(uid, None), None))
        except Exception as exc:
            log.error("worker %d: %s for run %s failed: %s", index, kind, uid[:8], exc)
            detail = f"{type(exc).__name__}: {exc}"
            if kind == "frames":
                reason = "no_geometry" if isinstance(exc, NoGeometry) else "reduction_error"
                fits.put(("failed", uid, msg[2], None, (msg[3], reason, detail)))   # in order with the fits
            elif kind == "start":
                outbox.put(("setup_failed", uid, detail, traceback.format_exc(limit=3)))
    fits.put(None)
    fitter.join()


def _fit_stage(index: int, fits: queue.Queue, outbox) -> None:
    """The worker's second stage: complete() each reduced batch, finish a stopped run, answer."""
    while True:
        item = fits.get()
        if item is None:
            return
        kind, uid, batch_id, pipeline, payload = item
        try:
            if kind == "frames":
                outbox.put(("reduced", uid, batch_id, payload.seq, payload.times, pipeline.complete(payload)))
            elif kind == "failed":
                outbox.put(("failed", uid, batch_id, *payload))
            elif kind == "stop":
                rows, extras = pipeline.finish() if pipeline is not None else (None, {})
                outbox.put(("stopped", uid, rows, pipeline.reseeds if pipeline else 0, extras))
        except Exception as exc:
            log.error("worker %d: %s for run %s failed: %s", index, kind, uid[:8], exc)
            if kind == "frames":
                outbox.put(("failed", uid, batch_id, payload.seq, "reduction_error", f"{type(exc).__name__}: {exc}"))
            else:
                outbox.put(("stopped", uid, None, 0, {}))
