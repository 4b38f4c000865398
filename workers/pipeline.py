"""One run's numerics, frame batch in, results out: reduce (integration, grazing-incidence cuts
and maps, snapshots, calibration) then complete (peak fits with the temporal regularizer,
inversion, phases).

``RunSpec`` is everything a run asks for, built once at the service's edge from its settings and
the start document; ``RunPipeline(spec, device, cache)`` holds the run's state (the fitter's
window, the phase tracker); each batch gives a ``BatchResult``, the end of the run a
``RunFinal``. Integration matrices are shared between runs through an ``IntegratorCache``.
The fitter is given the fitted profile's variance inflation from shared pixels (its bins'
correlation, ``workers.integrate.bin_correlation``), so its errors count it.

Shapes: B frames per batch, (H, W) detector pixels row-major, N radial bins; q in 1/nm.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch

from workers.geometry import Geometry
from workers.grazing import (GrazingGeometry, build_chi_sector, build_qmap, build_vertical_cut,
                             build_wedge_profiles, build_yoneda_cut, hermans_orientation, horizon_mask)
from workers.integrate import build_integrator_1d
from workers.inversion.maps import InversionMap
from workers.inversion.refine import inversion_rows, make_inverter
from workers.inversion.spec import GisaxsInversionSpec
from workers.phase import PhaseSpec, PhaseTracker
from workers.specs import InversionSpec, ModelSpec, ReductionSpec, RegularizerSpec
from workers.temporal import TrajectoryFitter

log = logging.getLogger(__name__)

SNAPSHOT_MAX_PX = 256     # corrected 2D snapshots: at most this many px on the long side
CHI_BINS = 90             # bins of the GIWAXS orientation sector
DUMMY, DELTA_DUMMY = -1.0, 0.5     # pixels reading dummy ± delta are not counted (pyFAI's convention)

FrameKind = Literal["frame", "profile"]


class NoGeometry(ValueError):
    """2D frames arrived for a run without a geometry."""


# --------------------------------------------------------------------------------------------
# what a run asks for, and what a batch gives
@dataclass(frozen=True, eq=False)
class RunSpec:
    """Everything a worker needs to reduce and fit one run (picklable).

    ``geometry`` None: the run sends reduced profiles only (2D frames fail with NoGeometry).
    ``model`` None: no peak fit (reduce, and invert when ``inversion`` is set). ``phases``:
    set only when the model has the peaks the phase spec needs. mask (H, W) bool, True =
    masked (the detector's own mask included); dark, flat (H, W) in detector counts."""
    geometry: Geometry | None
    reduction: ReductionSpec = ReductionSpec()
    model: ModelSpec | None = None
    regularizer: RegularizerSpec = RegularizerSpec()
    phases: PhaseSpec | None = None
    phase_checkpoint: dict | None = None     # workers.phase.PhaseTracker checkpoint; None: rules
    inversion: InversionSpec | None = None
    mask: np.ndarray | None = None
    dark: np.ndarray | None = None
    flat: np.ndarray | None = None
    calibrant: str | None = None             # a calibrant run: calibrate from its first frame

    @property
    def peak_names(self) -> list[str]:
        return [] if self.model is None else [p.name for p in self.model.peaks]


@dataclass
class Profiles:
    """Reduced 1D profiles of a batch: radial (N,) in ``unit``, intensity and sigma (B, N) float32."""
    radial: np.ndarray
    unit: str
    intensity: np.ndarray
    sigma: np.ndarray

    def rows(self, keep: np.ndarray) -> "Profiles":
        return Profiles(self.radial, self.unit, self.intensity[keep], self.sigma[keep])


@dataclass
class QMaps:
    """(q_xy, q_z) maps of some frames of a grazing run: q_xy (Nxy,), q_z (Nz,) 1/nm;
    images [(seq_num, (Nz, Nxy) float32, NaN = no pixel: missing wedge, off detector)]."""
    q_xy: np.ndarray
    q_z: np.ndarray
    images: list[tuple[int, np.ndarray]]


Rows = dict[str, np.ndarray]      # columnar table: equal-length arrays (workers/columns.py)


@dataclass
class BatchResult:
    """What one batch of a run yields, rows in batch order.

    peaks: PeakRows (PEAK_COLUMNS) of the batch's frames (provisional) and of older frames
    leaving the regularizer window (final), None when the run fits no peaks; phases
    (PHASE_COLUMNS) and newly confirmed transitions likewise; inversion: one row per frame
    (workers.inversion.refine.inversion_rows); snapshots: corrected 2D frames
    [(seq_num, (h, w) float32, NaN = masked)]; extra_profiles and scalars (B,) of a grazing run;
    reseeds: fits re-seeded in this batch; seconds: wall time per stage."""
    seq: np.ndarray
    times: np.ndarray
    profiles: Profiles
    peaks: Rows | None = None
    reseeds: int = 0
    phases: Rows | None = None
    transitions: list[dict] = field(default_factory=list)
    inversion: Rows | None = None
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list)
    qmaps: QMaps | None = None
    extra_profiles: dict[str, Profiles] = field(default_factory=dict)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    calibration: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def final_seq(self) -> set[int]:
        """seq_nums whose final result this batch carries (every frame when no peaks are fitted)."""
        if self.peaks is None:
            return set(np.asarray(self.seq).tolist())
        return final_seq(self.peaks)

    def without(self, again: set[int]) -> "BatchResult":
        """This result less what was published for the frames ``again`` (seq_nums) before a
        worker death replayed them: their profiles, snapshots, maps, scalars, inversion and
        provisional rows; their final rows stay (the replayed frame's final fit is new)."""
        if not again:
            return self
        listed = list(again)
        keep = ~np.isin(np.asarray(self.seq), listed)

        def table(rows: Rows | None, provisional_only: bool) -> Rows | None:
            if rows is None or not len(rows["seq_num"]):
                return rows
            mask = ~np.isin(np.asarray(rows["seq_num"]), listed)
            if provisional_only:
                mask |= np.asarray(rows["final"], bool)
            return {k: np.asarray(v)[mask] for k, v in rows.items()}

        qmaps = self.qmaps
        if qmaps is not None:
            qmaps = QMaps(qmaps.q_xy, qmaps.q_z, [(s, m) for s, m in qmaps.images if int(s) not in again])
        return dataclasses.replace(
            self, seq=np.asarray(self.seq)[keep], times=np.asarray(self.times)[keep],
            profiles=self.profiles.rows(keep), peaks=table(self.peaks, True), phases=table(self.phases, True),
            inversion=table(self.inversion, False),
            snapshots=[(s, im) for s, im in self.snapshots if int(s) not in again], qmaps=qmaps,
            extra_profiles={k: p.rows(keep) for k, p in self.extra_profiles.items()},
            scalars={k: np.asarray(v)[keep] for k, v in self.scalars.items()})


@dataclass
class RunFinal:
    """The end of a run: final rows of the frames still in the regularizer window (None
    without a fit), their phases and the last transitions, re-seeds since the last batch."""
    peaks: Rows | None = None
    phases: Rows | None = None
    transitions: list[dict] = field(default_factory=list)
    reseeds: int = 0


def final_seq(rows: Rows) -> set[int]:
    """seq_nums of the final rows of a columnar table with ``seq_num`` and ``final``."""
    return set(np.asarray(rows["seq_num"])[np.asarray(rows["final"], bool)].tolist())


def pick_snapshots(seq: np.ndarray, every: int, first_pending: bool) -> np.ndarray:
    """Indices of the frames of a batch to snapshot (2D corrected frames, q-maps): the run's
    first frame (when ``first_pending``) and every seq_num divisible by ``every`` (0: none)."""
    if not every or len(seq) == 0:
        return np.zeros(0, np.int64)
    pick = np.asarray(seq, np.int64) % every == 0
    if first_pending:
        pick[0] = True
    return np.flatnonzero(pick)


# --------------------------------------------------------------------------------------------
# integration matrices, shared by the runs of a worker
def _digest(arr: np.ndarray | None) -> str:
    return "-" if arr is None else hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


class IntegratorCache:
    """Integrators of a worker (matrices are costly: seconds per Mpx), least recently used
    first out. Keyed on what decides the matrices; a build logs why: the first, or which of
    geometry, detector shape, reduction fields, mask, dark, flat differ from the last one."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._last: dict | None = None

    def get(self, spec: RunSpec, shape: tuple[int, ...], build: Callable[[], Any]):
        parts = {"geometry": spec.geometry, "detector shape": tuple(shape), "reduction": spec.reduction,
                 "mask": _digest(spec.mask), "dark": _digest(spec.dark), "flat": _digest(spec.flat)}
        key = tuple((k, v.integrator_key() if k == "reduction" else v) for k, v in parts.items())
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        log.info("building %s integrators for %s: %s", spec.reduction.modality,
                 getattr(spec.geometry, "detector", "?"), self._why(parts))
        self._items[key] = item = build()
        self._last = parts
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return item

    def _why(self, parts: dict) -> str:
        if self._last is None:
            return "first run of this worker"
        changed = []
        for name, value in parts.items():
            old = self._last[name]
            if name == "reduction":
                changed += [f"reduction.{f.name} {getattr(old, f.name)!r} -> {getattr(value, f.name)!r}"
                            for f in dataclasses.fields(value)
                            if f.name != "snapshot_every" and getattr(old, f.name) != getattr(value, f.name)]
            elif old != value:
                changed.append(f"{name} changed")
        return ", ".join(changed) or "evicted earlier (cache full)"


@dataclass
class _Integrators:
    """The integrators of one run's reduction: ``main`` gives the fitted profile (its
    ``corrected`` the 2D snapshots); grazing runs add extra profiles, the orientation sector
    (giwaxs) and the (q_xy, q_z) map."""
    main: Any
    extra: dict = field(default_factory=dict)
    chi: Any = None
    qmap: Any = None


def _build_integrators(spec: RunSpec, device: str) -> _Integrators:
    r, g = spec.reduction, spec.reduction.grazing
    mask = spec.mask if spec.mask is not None else spec.geometry.detector_mask()
    opts = dict(method=r.method, dummy=DUMMY, delta_dummy=DELTA_DUMMY, polarization_factor=r.polarization,
                dark=spec.dark, flat=spec.flat, device=device)
    if g is None:
        return _Integrators(build_integrator_1d(spec.geometry, npt=r.npt, unit=r.unit, radial_range=r.radial_range,
                                                azimuth_range=r.azimuth_range, mask=mask, **opts))
    ggeo = GrazingGeometry(spec.geometry, incident_angle=g.incident_angle, tilt_angle=g.tilt_angle,
                           sample_orientation=g.sample_orientation)
    below = mask | horizon_mask(ggeo)        # profiles: nothing below the sample horizon; maps show its shadow
    qmap = build_qmap(ggeo, npt=g.qmap_npt, q_xy_range=g.qmap_q_xy_range, q_z_range=g.qmap_q_z_range,
                      mask=mask, **opts)
    if g.modality == "gisaxs":
        main = build_yoneda_cut(ggeo, critical_angle=g.critical_angle, half_width=g.yoneda_half_width,
                                npt=r.npt, q_xy_range=r.radial_range, mask=below, **opts)
        rod = build_vertical_cut(ggeo, q_xy_band=g.rod_q_xy_band, both_sides=True, npt=r.npt,
                                 q_z_range=g.qmap_q_z_range, mask=below, **opts)
        return _Integrators(main, {"vertical_cut": rod}, qmap=qmap)
    oop, ip = build_wedge_profiles(ggeo, npt=r.npt, q_range=r.radial_range, out_of_plane=g.out_of_plane_sector,
                                   in_plane=g.in_plane_sector, mask=below, **opts)
    chi = None
    if g.orientation_q_band is not None:
        try:
            chi = build_chi_sector(ggeo, q_band=g.orientation_q_band, npt=CHI_BINS,
                                   chi_range=g.orientation_chi_range, mask=below, **opts)
        except ValueError as exc:         # e.g. no pixel in the band: the run goes on without it
            log.warning("no orientation sector: %s", exc)
    return _Integrators(oop, {"in_plane": ip}, chi=chi, qmap=qmap)


def _profiles(result) -> Profiles:
    return Profiles(result.radial.double().cpu().numpy(), result.unit, result.intensity.float().cpu().numpy(),
                    result.sigma.float().cpu().numpy())


# --------------------------------------------------------------------------------------------
class StageClock:
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


@dataclass
class Reduced:
    """A batch between ``RunPipeline.reduce`` and ``RunPipeline.complete``: its result so far and
    its profiles as tensors or arrays (radial (N,), intensity and sigma (B, N)) to fit."""
    result: BatchResult
    radial: Any
    intensity: Any
    sigma: Any
    clock: StageClock
    inversion_map: tuple | None = None     # GISAXS inversion: (MapPoints, intensity, sigma (B, M))


class RunPipeline:
    """Reduce-then-fit for one run. ``reduce`` reads the frames (which may be shared memory
    valid only until it returns); ``complete`` reads the profiles only and is sequential per run
    (the fitter's window), so it may run on another thread than ``reduce``."""

    def __init__(self, spec: RunSpec, device: str, cache: IntegratorCache):
        if spec.reduction.snapshot_every < 0:
            raise ValueError(f"reduction.snapshot_every must be >= 0 (0 = off), got {spec.reduction.snapshot_every}")
        self.spec, self.device, self.cache = spec, device, cache
        self.fitter = None if spec.model is None else TrajectoryFitter(spec.model, spec.regularizer, device=device)
        self.inverter = None if spec.inversion is None else make_inverter(spec.inversion, device=device)
        self._inversion_map: InversionMap | None = None      # a GISAXS inversion's map, built on the first frame
        self.phases = (None if spec.phases is None or self.fitter is None
                       else PhaseTracker(spec.phases, spec.phase_checkpoint, device=device))
        self._reseeds_reported = 0
        self._first_frame_pending = True
        self._calibration_pending = spec.calibrant is not None
        self._staging = None          # page-locked host buffer for GPU transfers
        self._inflation: np.ndarray | None = None   # fitted profile's F per bin (bin_correlation)
        if spec.geometry is not None and spec.geometry.shape is not None:    # build now, not on the first frame
            self._integrators(tuple(spec.geometry.shape))

    def _integrators(self, shape: tuple[int, ...]) -> _Integrators:
        return self.cache.get(self.spec, shape, lambda: _build_integrators(self.spec, self.device))

    def process(self, seq: np.ndarray, times: np.ndarray, frames: np.ndarray, kind: FrameKind = "frame") -> BatchResult:
        """One batch reduced and completed (both stages on the caller's thread)."""
        return self.complete(self.reduce(seq, times, frames, kind))

    # stage 1 ---------------------------------------------------------------------------------
    def reduce(self, seq: np.ndarray, times: np.ndarray, frames: np.ndarray, kind: FrameKind = "frame") -> Reduced:
        """Everything that reads the frames (B, H, W) (or profiles (B, 3, N): q, I, sigma)."""
        clock = StageClock()
        seq, times = np.asarray(seq, np.int64), np.asarray(times, np.float64)
        if kind == "profile":
            radial = frames[0, 0]
            if not np.allclose(frames[:, 0], radial):
                raise ValueError("profiles of one run must share their q grid")
            profiles = Profiles(radial, "q_nm^-1", frames[:, 1].astype(np.float32), frames[:, 2].astype(np.float32))
            return Reduced(BatchResult(seq, times, profiles), radial, frames[:, 1], frames[:, 2], clock)
        if self.spec.geometry is None:
            raise NoGeometry("no geometry for this run (set geometry.poni, or 'geometry' in the start document)")
        with clock("integrate"):
            batch = self._device_batch(frames)
            parts = self._integrators(frames.shape[1:])
            main = parts.main(batch)
            self._inflation = parts.main.correlation
            out = BatchResult(seq, times, _profiles(main))
            out.extra_profiles = {name: _profiles(integ(batch)) for name, integ in parts.extra.items()}
            if parts.chi is not None:
                sector = parts.chi(batch)
                f = hermans_orientation(parts.chi.radial, sector.intensity.double())
                out.scalars = {"hermans_orientation": f.cpu().numpy().astype(np.float64)}
        pick = pick_snapshots(seq, self.spec.reduction.snapshot_every, self._first_frame_pending)
        self._first_frame_pending = self._first_frame_pending and len(seq) == 0
        with clock("snapshots"):
            out.snapshots = self._snapshots(parts.main, batch, seq, pick)
            if parts.qmap is not None:
                out.qmaps = self._qmaps(parts.qmap, batch, seq, pick)
        inv_map = None
        if (isinstance(self.spec.inversion, GisaxsInversionSpec) and self.spec.reduction.modality == "gisaxs"
                and self.inverter is not None):
            with clock("inversion_map"):
                inv_map = self._map_for_inversion(batch)
        if self._calibration_pending:
            self._calibration_pending = False
            out.calibration = self._calibrate(frames[0])
        return Reduced(out, main.radial, main.intensity, main.sigma, clock, inv_map)

    def _map_for_inversion(self, batch) -> tuple | None:
        """(MapPoints, intensity, sigma (B, M)) of the batch for the GISAXS inversion
        (``workers.inversion.maps``: pixel centres, pixels below the horizon left out, |q_xy| in
        the spec's q_range); None, and no inversion for the run, where no bin is left."""
        if self._inversion_map is None:
            g, inv = self.spec.reduction.grazing, self.spec.inversion
            ggeo = GrazingGeometry(self.spec.geometry, incident_angle=g.incident_angle, tilt_angle=g.tilt_angle,
                                   sample_orientation=g.sample_orientation)
            mask = self.spec.mask if self.spec.mask is not None else self.spec.geometry.detector_mask()
            try:
                self._inversion_map = InversionMap(
                    ggeo, npt=inv.qmap_npt, q_xy_range=g.qmap_q_xy_range, q_z_range=g.qmap_q_z_range,
                    q_xy_band=inv.q_range, mask=mask | horizon_mask(ggeo), dummy=DUMMY, delta_dummy=DELTA_DUMMY,
                    polarization_factor=self.spec.reduction.polarization, dark=self.spec.dark, flat=self.spec.flat,
                    device=self.device)
            except ValueError as exc:          # e.g. a q_range without pixels: the reduction goes on
                log.error("no GISAXS inversion for this run: %s", exc)
                self.inverter = None
                return None
        y, s = self._inversion_map(batch)
        return self._inversion_map.points, y, s

    def _device_batch(self, frames: np.ndarray) -> torch.Tensor:
        """(B, H, W) frames as a tensor on the worker's device. On CPU a view of the (shared
        memory) array; on a GPU copied through a reused page-locked buffer, so the host-to-device
        copy is one DMA transfer without a fresh pinned allocation per batch."""
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

    def _snapshots(self, integrator, batch, seq: np.ndarray, pick: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Corrected 2D frames of the picked frames, block-averaged (NaN-ignoring mean) to at
        most SNAPSHOT_MAX_PX px on the long side."""
        if pick.size == 0:
            return []
        binning = max(1, -(-max(integrator.shape) // SNAPSHOT_MAX_PX))
        try:
            images = integrator.corrected(batch[pick.tolist()], binning=binning).float().cpu().numpy()
        except Exception:        # a view for people: never lose the batch's profiles over it
            log.exception("snapshot of frame(s) %s failed", seq[pick].tolist())
            return []
        return [(int(seq[i]), images[k]) for k, i in enumerate(pick)]

    def _qmaps(self, qmap, batch, seq: np.ndarray, pick: np.ndarray) -> QMaps | None:
        if pick.size == 0:
            return None
        try:
            images = qmap(batch[pick.tolist()]).intensity.float().cpu().numpy()
        except Exception:        # a view for people: never lose the batch's profiles over it
            log.exception("q-map of frame(s) %s failed", seq[pick].tolist())
            return None
        return QMaps(np.asarray(qmap.q_xy, np.float64), np.asarray(qmap.q_z, np.float64),
                     [(int(seq[i]), images[k]) for k, i in enumerate(pick)])

    def _calibrate(self, frame: np.ndarray) -> dict | None:
        """Geometry refined from a calibrant frame, starting from the run's geometry."""
        from workers.calibrate import calibrate        # pyFAI's calibrants: only for calibrant runs
        g, calibrant = self.spec.geometry, self.spec.calibrant
        f2d = g.to_pyfai().getFit2D()
        try:
            res = calibrate(frame, detector=g.detector, calibrant=calibrant, wavelength=g.wavelength,
                            distance_guess=f2d["directDist"] * 1e-3, mask=self.spec.mask,
                            beam_center_guess=(f2d["centerY"] - 0.5, f2d["centerX"] - 0.5), device=self.device)
        except Exception as exc:          # a failed calibration must not lose the run's frames
            log.error("calibration with %s failed: %s", calibrant, exc)
            return None
        return {"geometry": res.geometry, "calibrant": calibrant, "rings_used": res.rings_used,
                "rms_residual_deg": res.rms_residual_deg, "n_points": res.n_points, "seconds": res.seconds}

    # stage 2 ---------------------------------------------------------------------------------
    def complete(self, r: Reduced) -> BatchResult:
        """Peak fits, inversion and phases of a reduced batch."""
        out, clock = r.result, r.clock
        with clock("fit"):
            if self.fitter is not None:
                out.peaks = self.fitter.update(r.radial, r.intensity, r.sigma, out.seq, out.times, self._inflation)
            out.reseeds = self._new_reseeds()
        if self.inverter is not None and out.profiles.unit.startswith("q_nm"):
            with clock("inversion"):
                out.inversion = self._invert(r.radial, r.intensity, r.sigma, out.seq, out.times)
        elif r.inversion_map is not None:
            with clock("inversion"):
                spec = self.spec.inversion
                res = self.inverter.invert_map(*r.inversion_map, refine_fit=spec.refine, max_iter=spec.max_iter)
                out.inversion = inversion_rows(res, out.seq, out.times)
        if self.phases is not None and out.peaks is not None:
            with clock("phases"):
                out.phases = self.phases.update(out.peaks, seq_num=out.seq, radial=r.radial, intensity=r.intensity)
                out.transitions = self.phases.pop_transitions()
        out.seconds = clock.seconds
        return out

    def _new_reseeds(self) -> int:
        total = 0 if self.fitter is None else int(self.fitter.reseeds)
        new, self._reseeds_reported = total - self._reseeds_reported, total
        return new

    def _invert(self, radial, intensity, sigma, seq, times) -> Rows:
        """Per-frame structural parameters of the batch's profiles (q in 1/nm); points outside
        the spec's q_range get no weight."""
        spec = self.spec.inversion
        q = torch.as_tensor(radial, dtype=torch.float64).detach().cpu()
        y = torch.as_tensor(intensity, dtype=torch.float64).detach().cpu().clone()
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().clone()
        if spec.q_range is not None:
            outside = (q < spec.q_range[0]) | (q > spec.q_range[1])
            y[:, outside], s[:, outside] = math.nan, math.nan
        res = self.inverter(q, y, s, refine_fit=spec.refine, max_iter=spec.max_iter)
        return inversion_rows(res, seq, times)

    def finish(self) -> RunFinal:
        """Final rows of the frames still in the regularizer window, and their phases."""
        rows = None if self.fitter is None else self.fitter.finish()
        final = RunFinal(peaks=rows, reseeds=self._new_reseeds())
        if self.phases is not None:
            final.phases, final.transitions = self.phases.finish(rows), self.phases.pop_transitions()
        return final
