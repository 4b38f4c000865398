"""LM start (encoder or grid search) + bounded LM in the same forward model, with errors and a
fit-quality verdict.

Per batch of profiles (q (N,), intensity and sigma (B, N)):
  1. the start: the encoder maps ``profile_features`` to the shape parameters, always inside
     their bounds, when the run's model has an encoder (``sphere_hs``) and the profiles' q
     range overlaps the encoder's grid enough (``q_overlap``); otherwise a grid search over the
     shape parameters gives ``n_starts`` starts (``workers.inversion.search``) and a warning is
     logged once per inverter (one per run in the worker);
  2. the linear amplitudes (i0, ..., background) by non-negative weighted least squares
     (variable projection; ``search.nonneg_amplitudes``);
  3. optionally, the projected active-set LM (``workers.inversion.lm.fit_bounded``) refines all
     parameters against the data with weights 1/sigma^2, from each start; the start of least
     final chi2 wins. Parameters on a bound are flagged, their standard errors NaN.
  4. the verdict: p-value of chi2 and good / poor / bad (``workers.inversion.quality``).

``SaxsInverter`` (profiles, any model of ``workers.inversion.spec.SAXS_MODELS``) and
``GisaxsInverter`` (maps on the checkpoint's detector grid, or a grazing run's own (q_xy, q_z)
map: ``invert_map``; Born or DWBA models; a radius histogram instead of a Gaussian size:
``workers.inversion.histogram_map.GisaxsHistogramInverter``) bundle the steps;
``inversion_rows`` turns a result into one row per frame for publishing (like the peaks
table). ``refine`` is the LM alone (method "projected", or "transform": workers.fit's LM with
lmfit's bound transform, the one used before issue 28, kept for comparison).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from workers.fit import fit_batch
from workers.inversion.encoder import ParamBounds, encoder_from_state, map_features, profile_features
from workers.inversion.dwba import (cylinders_paracrystal_dwba, dwba_points, spheres_hard_disk_dwba,
                                    spheres_paracrystal_dwba)
from workers.inversion.gisaxs import (CYLINDER_PARACRYSTAL_PARAMS, SPHERE_HARDDISK_PARAMS, SPHERE_PARACRYSTAL_PARAMS,
                                      DetectorGrid, cylinders_paracrystal, spheres_hard_disk, spheres_paracrystal)
from workers.inversion.lm import bound_flags, fit_bounded
from workers.inversion.maps import GridResampler, MapPoints
from workers.inversion.models import SAXS_BASIS, SAXS_FORWARD, AmplitudeModel, BasisModel, amplitude_basis
from workers.inversion.quality import fit_verdict
from workers.inversion.saxs import SPHERE_HS_PARAMS, sphere_hs
from workers.inversion.search import grid_starts, nonneg_amplitudes, shape_grid, size_window
from workers.inversion.spec import (GISAXS_MODELS, HISTOGRAM_MODELS, SAXS_MODELS, GisaxsInversionSpec, Substrate,
                                    is_dwba, shape_bounds)

log = logging.getLogger(__name__)

FORWARD_MODELS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "sphere_hs": (sphere_hs, SPHERE_HS_PARAMS),
    "spheres_paracrystal": (spheres_paracrystal, SPHERE_PARACRYSTAL_PARAMS),
    "spheres_paracrystal_dwba": (spheres_paracrystal_dwba, SPHERE_PARACRYSTAL_PARAMS),
    "cylinders_paracrystal": (cylinders_paracrystal, CYLINDER_PARACRYSTAL_PARAMS),
    "cylinders_paracrystal_dwba": (cylinders_paracrystal_dwba, CYLINDER_PARACRYSTAL_PARAMS),
    "spheres_hard_disk": (spheres_hard_disk, SPHERE_HARDDISK_PARAMS),
    "spheres_hard_disk_dwba": (spheres_hard_disk_dwba, SPHERE_HARDDISK_PARAMS),
    **{k: (SAXS_FORWARD[k], m.names) for k, m in SAXS_MODELS.items() if k != "sphere_hs"},
}
assert all(FORWARD_MODELS[k][1] == m.names for k, m in GISAXS_MODELS.items())
ENCODER_MIN_COVERAGE = 0.4    # the encoder's training crops kept >= 44 % of its grid's log span
POISSON_STEPS = 2             # GISAXS maps: reweighting steps (``GisaxsInverter._poisson_step``)


@dataclass
class InversionResult:
    """B frames, P parameters (``names``)."""
    names: tuple[str, ...]
    params: torch.Tensor          # (B, P) refined (or start) values, inside the bounds
    stderr: torch.Tensor          # (B, P) standard errors (NaN without refinement and on a bound)
    encoder: torch.Tensor         # (B, P) the LM start (encoder or grid search, with its amplitudes)
    chi2_red: torch.Tensor        # (B,) chi2 / (N - P)
    converged: torch.Tensor       # (B,) bool: the LM met its optimality test (False without LM)
    model: str = ""               # forward-model name (FORWARD_MODELS key)
    at_bound: torch.Tensor | None = None     # (B, P) bool
    p_value: torch.Tensor | None = None      # (B,) P(chi2_dof >= chi2)
    quality: np.ndarray | None = None        # (B,) str: good | poor | bad
    warm_start: str = "encoder"              # "encoder" | "grid"
    dof: torch.Tensor | None = field(default=None, repr=False)
    # the radius histogram of ``spheres_histogram_paracrystal_dwba`` (workers.inversion.histogram_map
    # .RadiusDistribution: its ``columns()`` join the rows); None for the other models
    distribution: object | None = None


def linear_amplitudes(shape: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares for y ~ a * shape + b with a > 0, b >= 0; all (B, N) -> a, b (B,).

    Points with non-finite y or sigma <= 0 get weight 0. Differentiable (closed-form 2x2 solve;
    the encoder's physics loss in service/train uses it).
    """
    ok = torch.isfinite(y) & torch.isfinite(sigma) & (sigma > 0)
    w = torch.where(ok, 1.0 / torch.where(ok, sigma, torch.ones_like(sigma)) ** 2, torch.zeros_like(y))
    yy = torch.where(ok, y, torch.zeros_like(y))
    sff, sf, s1 = (w * shape * shape).sum(-1), (w * shape).sum(-1), w.sum(-1)
    sfy, sy = (w * shape * yy).sum(-1), (w * yy).sum(-1)
    det = sff * s1 - sf * sf
    tiny = torch.finfo(y.dtype).tiny
    a = (s1 * sfy - sf * sy) / det.clamp_min(tiny)
    b = (sff * sy - sf * sfy) / det.clamp_min(tiny)
    a0 = sfy / sff.clamp_min(tiny)                       # b = 0
    neg_b = b < 0
    a = torch.where(neg_b, a0, a)
    b = torch.where(neg_b, torch.zeros_like(b), b)
    a = a.clamp_min(tiny)
    return a, b


def refine(model: Callable, q: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, p0: torch.Tensor,
           lower: torch.Tensor, upper: torch.Tensor, *, max_iter: int = 40, ftol: float = 1e-6,
           chunk_size: int | None = None, method: Literal["projected", "transform"] = "projected"):
    """Bounded batched LM of model = i0 g(shape) + background from p0 (B, P). "projected":
    ``workers.inversion.lm.fit_bounded`` (BoundedFit); "transform": ``workers.fit.fit_batch``
    (FitResult). Both have params, stderr, chi2_red, converged, n_iter."""
    bound = AmplitudeModel(model, q, lower, upper)
    if method == "transform":
        return fit_batch(bound, q, y, sigma, p0, max_iter=max_iter, ftol=ftol, return_covariance=False,
                         chunk_size=chunk_size)
    if method != "projected":
        raise ValueError(f"method must be 'projected' or 'transform', got {method!r}")
    return fit_bounded(bound, y, sigma, p0, lower, upper, max_iter=max_iter, ftol=ftol, chunk_size=chunk_size)


def q_overlap(q_lo: float, q_hi: float, grid_lo: float, grid_hi: float) -> tuple[float, float]:
    """Fractions of the data's log-q span [q_lo, q_hi] inside [grid_lo, grid_hi], and of the
    grid's log span covered by the data (all > 0)."""
    common = max(0.0, math.log(min(q_hi, grid_hi) / max(q_lo, grid_lo)))
    span = math.log(q_hi / q_lo)
    inside = (1.0 if grid_lo <= q_lo <= grid_hi else 0.0) if span <= 0 else common / span
    return inside, common / math.log(grid_hi / grid_lo)


class _Inverter:
    """Start (encoder or grid search) + refinement for one forward model.

    The encoder runs in float32; the amplitudes and the LM in ``dtype`` (float64 default: the
    covariance wants it; float32 works on GPUs).
    """
    encoder = None
    enc_bounds: ParamBounds | None = None
    lm_chunk: int | None = None
    good_p_value, bad_chi2 = 1e-3, 4.0
    diff = "central"              # the LM Jacobian's finite differences (BasisModel)

    def _setup(self, model_name: str, names, basis, n_amp: int, lo, hi, state, device, dtype):
        self.model_name, self.names = model_name, tuple(names)
        self.model = FORWARD_MODELS[model_name][0]
        self.basis, self.n_amp = basis, n_amp
        self.n_shape = len(self.names) - n_amp - 1
        self.device, self.dtype = torch.device(device), dtype
        if state is not None:
            self.encoder = encoder_from_state(state).to(device)
            self.enc_bounds = self.encoder.bounds
            if tuple(self.enc_bounds.names) != self.names[:self.n_shape]:
                raise ValueError(f"encoder parameters {self.enc_bounds.names} must be {self.names[:self.n_shape]}")
        rest = [0.0] * (n_amp + 1), [math.inf] * (n_amp + 1)
        self.lower = torch.tensor(list(lo) + rest[0], dtype=dtype, device=device)
        self.upper = torch.tensor(list(hi) + rest[1], dtype=dtype, device=device)

    def _features(self, x, y, s) -> torch.Tensor:
        raise NotImplementedError

    def _fn(self, x, p):
        """Forward model on the flattened data grid: (B, P) -> (B, N)."""
        return self.model(x, p)

    def _basis(self, x, shape):
        return self.basis(x, shape)

    def _amplitudes(self, x, shape, y, s) -> torch.Tensor:
        """(B, P): shape (B, S) with its non-negative amplitudes and background."""
        amp, _ = nonneg_amplitudes(self._basis(x, shape), y, s)
        return torch.cat([shape, amp], 1)

    @torch.no_grad()
    def _encode(self, x, y, s) -> torch.Tensor:
        shape_p = self.encoder(self._features(x, y, s)).to(self.dtype)
        shape_p = torch.minimum(torch.maximum(shape_p, self.lower[:self.n_shape]), self.upper[:self.n_shape])
        return self._amplitudes(x, shape_p, y, s)

    def _invert(self, x, y, s, refine_fit: bool, max_iter: int) -> InversionResult:
        """From the encoder (the path ``service.train.inversion.evaluate`` times)."""
        return self._refine(x, y, s, self._encode(x, y, s)[:, None], refine_fit, max_iter, "encoder")

    def _refine(self, x, y, s, starts: torch.Tensor, refine_fit: bool, max_iter: int, how: str) -> InversionResult:
        """LM from each of the starts (B, K, P); per frame the result of least chi2."""
        B, K, P = starts.shape
        bound = BasisModel(lambda xx, sh: self._basis(xx, sh), x, self.lower, self.upper, self.n_amp, self.diff)
        if not refine_fit:
            p0 = starts[:, 0]
            ok = torch.isfinite(y) & torch.isfinite(s) & (s > 0)
            r = torch.where(ok, (y - bound.evaluate(p0)) / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(y))
            dof = (ok.sum(-1) - P).clamp_min(1).to(y.dtype)
            chi2r = torch.where(ok.sum(-1) > P, (r * r).sum(-1) / dof, torch.full_like(dof, math.nan))
            return self._result(p0, torch.full_like(p0, math.nan), p0, chi2r,
                                torch.zeros(B, dtype=torch.bool, device=y.device),
                                bound_flags(p0, self.lower, self.upper), dof, how)
        yk, sk = (y, s) if K == 1 else (y.repeat_interleave(K, 0), s.repeat_interleave(K, 0))
        fit = fit_bounded(bound, yk, sk, starts.reshape(B * K, P), self.lower, self.upper, max_iter=max_iter,
                          chunk_size=self.lm_chunk)
        chi = fit.chi2_red.reshape(B, K)
        best = torch.where(torch.isfinite(chi), chi, torch.full_like(chi, math.inf)).argmin(-1)
        pick = best + K * torch.arange(B, device=best.device)
        return self._result(fit.params[pick], fit.stderr[pick], starts.reshape(B * K, P)[pick], fit.chi2_red[pick],
                            fit.converged[pick], fit.at_bound[pick], fit.dof[pick], how)

    def _result(self, p, se, start, chi2r, conv, at_b, dof, how) -> InversionResult:
        pv, verdict = fit_verdict(chi2r, dof, good_p_value=self.good_p_value, bad_chi2=self.bad_chi2)
        return InversionResult(self.names, p, se, start, chi2r, conv, self.model_name, at_b, pv, verdict, how, dof)

    def _t(self, v):
        return torch.as_tensor(v, dtype=self.dtype, device=self.device)


class SaxsInverter(_Inverter):
    """Profiles: any SAXS_MODELS model; the encoder (``state``, on its ``q_grid``) where the
    model is the checkpoint's and the q ranges overlap, else a grid search (module docstring).

    bounds: {name: (lo, hi)} or (name, lo, hi) overrides of the shape bounds (defaults: the
    encoder's for its model, else ``SAXS_MODELS``). min_q_overlap: fraction of the profiles'
    log-q span that must lie inside the encoder's grid (and the profiles must cover >=
    ENCODER_MIN_COVERAGE of the grid's span). n_starts: LM starts from the grid search.
    good_p_value, bad_chi2: verdict thresholds (``workers.inversion.quality``).
    """

    def __init__(self, state: dict | None = None, device="cpu", dtype=torch.float64, *, model: str | None = None,
                 bounds=(), min_q_overlap: float = 0.5, n_starts: int = 3, good_p_value: float = 1e-3,
                 bad_chi2: float = 4.0):
        model = model or (state or {}).get("model") or "sphere_hs"
        info = SAXS_MODELS.get(model)
        if info is None:
            raise ValueError(f"SAXS inversion model must be one of {tuple(SAXS_MODELS)}, got {model!r}")
        if state is not None and state.get("model") != model:
            state = None                                  # the checkpoint encodes another model
        self.info = info
        if state is not None:                            # the encoder's training ranges are the defaults
            eb = ParamBounds.from_dict(state["bounds"])
            defaults = dict(zip(eb.names, zip(eb.lo, eb.hi)))
            lo, hi = shape_bounds(model, {**defaults, **_as_dict(bounds)})
        else:
            lo, hi = shape_bounds(model, bounds)
        self._setup(model, info.names, SAXS_BASIS[model], len(info.amplitudes), lo, hi, state, device, dtype)
        self.q_grid = None if state is None else torch.as_tensor(state["q_grid"], dtype=torch.float64, device=device)
        self.min_q_overlap, self.n_starts = float(min_q_overlap), int(n_starts)
        self.good_p_value, self.bad_chi2 = float(good_p_value), float(bad_chi2)
        self._bounds = (lo, hi)
        self._grid_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # q, grid, basis
        self._warned = False

    @classmethod
    def from_spec(cls, spec, device="cpu") -> "SaxsInverter":
        """From a run's InversionSpec (``workers.inversion.spec.SaxsInversionSpec`` or the plain one)."""
        kw = {k: getattr(spec, k) for k in ("model", "bounds", "min_q_overlap", "n_starts", "good_p_value",
                                             "bad_chi2") if hasattr(spec, k)}
        return cls(spec.state, device=device, **kw)

    def _features(self, q, y, s):
        return profile_features(self.q_grid, q, y.float(), s.float())

    def encode(self, q, intensity, sigma) -> torch.Tensor:
        """Encoder shape parameters + amplitudes: (B, P) in ``dtype``."""
        return self._encode(*self._prep(q, intensity, sigma))

    def __call__(self, q, intensity, sigma, *, refine_fit: bool = True, max_iter: int = 40) -> InversionResult:
        """Invert B profiles. q (N,) 1/nm increasing, intensity and sigma (B, N) (units of i0);
        points with q <= 0, non-finite values or sigma <= 0 are ignored."""
        x, y, s = self._prep(q, intensity, sigma)
        if self.use_encoder(x, y, s):
            return self._invert(x, y, s, refine_fit, max_iter)
        return self._refine(x, y, s, self.grid_starts(x, y, s), refine_fit, max_iter, "grid")

    def use_encoder(self, q, y, s) -> bool:
        """The encoder has been trained for these profiles' q range (class docstring); warns once
        when it has not."""
        if self.encoder is None:
            return False
        ok = (torch.isfinite(y) & torch.isfinite(s) & (s > 0)).any(0) & (q > 0)
        if not bool(ok.any()):
            return True                                   # nothing to fit: the results are NaN anyway
        q_lo, q_hi = float(q[ok].min()), float(q[ok].max())
        g_lo, g_hi = float(self.q_grid[0]), float(self.q_grid[-1])
        inside, covered = q_overlap(q_lo, q_hi, g_lo, g_hi)
        use = inside >= self.min_q_overlap and covered >= ENCODER_MIN_COVERAGE
        if not use and not self._warned:
            self._warned = True
            log.warning("inversion: profiles with q %.3g-%.3g 1/nm have %.0f %% of their log-q span inside the "
                        "encoder's grid %.3g-%.3g 1/nm (needs %.0f %%) and cover %.0f %% of it (needs %.0f %%): "
                        "the encoder was not trained for them; LM from a grid search instead (%s)", q_lo, q_hi,
                        100 * inside, g_lo, g_hi, 100 * self.min_q_overlap, 100 * covered,
                        100 * ENCODER_MIN_COVERAGE, self.model_name)
        return use

    def grid_starts(self, q, y, s) -> torch.Tensor:
        """(B, n_starts, P) starts from the grid search (``workers.inversion.search``)."""
        if self._grid_cache is None or not torch.equal(self._grid_cache[0], q):
            lo, hi = list(self._bounds[0]), list(self._bounds[1])
            ok = (torch.isfinite(y) & torch.isfinite(s) & (s > 0)).any(0)
            lo[0], hi[0] = size_window(q[ok], lo[0], hi[0])
            grid = shape_grid(self.info, lo, hi, self.dtype, self.device)
            self._grid_cache = (q, grid, self.basis(q, grid))
        _, grid, basis = self._grid_cache
        starts, _ = grid_starts(grid, basis, self.info.grid[0], y, s, self.n_starts)
        return starts

    def _prep(self, q, intensity, sigma):
        q, y, s = self._t(q), self._t(intensity), self._t(sigma)
        if y.dim() != 2 or s.shape != y.shape or q.dim() != 1 or q.shape[0] != y.shape[1]:
            raise ValueError(f"need q (N,), intensity and sigma (B, N); got {tuple(q.shape)}, "
                             f"{tuple(y.shape)}, {tuple(s.shape)}")
        if bool((q <= 0).any()):
            s = torch.where(q > 0, s, torch.full_like(s, math.nan))
        return q, y, s


def _as_dict(bounds) -> dict:
    return dict(bounds) if isinstance(bounds, dict) else {n: (a, b) for n, a, b in bounds}


class GisaxsInverter(_Inverter):
    """GISAXS maps in a GISAXS_MODELS model: Born, or the DWBA on ``substrate`` (delta, beta at
    the run's energy; None: the checkpoint's ``substrate`` dict).

    ``__call__``: maps on the checkpoint's detector grid (``state["grid"]``: DetectorGrid
    fields). ``invert_map``: a grazing run's own (q_xy, q_z) map (``workers.inversion.maps``):
    the LM fits the model at the run's bins (their q_par = |q_xy|, q_z and, for the DWBA,
    alpha_f from q_z at the run's alpha_i and wavelength) with the bins' errors; its start comes
    from the encoder on the map resampled onto the encoder's grid when the map covers at least
    ``min_map_overlap`` of that grid and the incidence angles agree within 2x (a DWBA map's
    Yoneda band and horizon then fall where the encoder's training maps had theirs), else from
    a grid search (``n_starts`` starts; a warning once per inverter). With ``refine_fit`` the LM
    then runs again with the errors of the model's expected counts (``_poisson_step``), so that
    maps of a few counts per bin get unbiased parameters and calibrated errors. An encoder is
    used when its parameters are the model's shape parameters (the shipped one, trained on Born
    maps of spheres, starts both ``spheres_paracrystal`` and ``spheres_paracrystal_dwba``); its
    training ranges are then the default bounds (``bounds`` overrides them).
    """

    def __init__(self, state: dict | None = None, device="cpu", dtype=torch.float64, *, model: str | None = None,
                 substrate: Substrate | None = None, bounds=(), min_map_overlap: float = 0.5, n_starts: int = 2,
                 good_p_value: float = 1e-3, bad_chi2: float = 4.0):
        model = model or (state or {}).get("model") or "spheres_paracrystal_dwba"
        info = GISAXS_MODELS.get(model)
        if info is None:
            raise ValueError(f"GISAXS inversion model must be one of {tuple(GISAXS_MODELS)}, got {model!r}")
        if substrate is None and state is not None and state.get("substrate"):
            substrate = Substrate(**state["substrate"])
        if is_dwba(model) and substrate is None:
            raise ValueError(f"the {model} model needs a substrate (delta, beta at the run's energy)")
        self.info, self.substrate = info, substrate
        self.grid = None if state is None else DetectorGrid(
            float(state["grid"]["wavelength"]), float(state["grid"]["alpha_i"]), tuple(state["grid"]["u"]),
            tuple(state["grid"]["v"]))
        if state is not None and tuple(state["bounds"]["names"]) != info.shape:
            state = None                                   # an encoder of other parameters
        defaults = {}
        if state is not None:
            eb = ParamBounds.from_dict(state["bounds"])
            defaults = dict(zip(eb.names, zip(eb.lo, eb.hi)))
        lo, hi = shape_bounds(model, {**defaults, **_as_dict(bounds)})
        self._setup(model, info.names, None, 1, lo, hi, state, device, dtype)
        self.basis = amplitude_basis(lambda x, p: self._fn(x, p))
        self._bounds = (lo, hi)
        self.min_map_overlap, self.n_starts = float(min_map_overlap), int(n_starts)
        self.good_p_value, self.bad_chi2 = float(good_p_value), float(bad_chi2)
        self._grid_pts = None
        if self.grid is not None:
            q_par, q_z, omega = self.grid.q()
            self._grid_pts = self._points(q_par, q_z, self.grid.alpha_f(), self.grid.wavelength, self.grid.alpha_i,
                                          omega)
        self._pts = self._grid_pts              # the points the model is evaluated on in this call
        self._map: tuple | None = None          # (MapPoints, points, resampler) of the last run map
        self._search: tuple | None = None       # (points, shape grid, its basis) of the last grid search
        self._warned = False
        # CPU: one map per LM chunk (measured with workers.fit's LM: 92 ms/map vs 400 (chunks of 4)
        # and 670 (16) on the held-out BornAgain maps)
        self.lm_chunk = 1 if self.device.type == "cpu" else None
        self.diff = "forward"        # S + 1 map evaluations a Jacobian, not 2 S + 1 (BasisModel)

    @classmethod
    def from_spec(cls, spec, device="cpu") -> "GisaxsInverter":
        """From a run's ``workers.inversion.spec.GisaxsInversionSpec``."""
        return cls(spec.state, device=device, model=spec.model, substrate=spec.substrate, bounds=spec.bounds,
                   min_map_overlap=spec.min_map_overlap, n_starts=spec.n_starts, good_p_value=spec.good_p_value,
                   bad_chi2=spec.bad_chi2)

    def _points(self, q_par, q_z, alpha_f, wavelength, alpha_i, omega=None):
        """What the forward model takes at points (H, W): (|q_par|, q_z, omega) (Born) or a DwbaQ
        (DWBA); q in 1/nm, angles in rad, wavelength in nm; omega None: 1 (intensity per solid angle)."""
        omega = torch.ones_like(q_par) if omega is None else omega
        if is_dwba(self.model_name):
            return dwba_points(q_par, alpha_f, wavelength, alpha_i, self.substrate, omega, self.dtype, self.device)
        return tuple(self._t(t) for t in (q_par.abs(), q_z, omega))

    def _fn(self, x, p):
        return self.model(self._pts, p).reshape(p.shape[0], -1)

    def _features(self, x, y, s):
        H, W = self.grid.shape
        ok = torch.isfinite(y) & (y > 0) & torch.isfinite(s) & (s > 0)
        li = torch.where(ok, y.clamp_min(1e-30).log10(), torch.zeros_like(y))
        return map_features(li.reshape(-1, H, W).float(), ok.reshape(-1, H, W))

    def encode(self, maps, sigma) -> torch.Tensor:
        self._pts = self._grid_pts
        return self._encode(*self._prep(maps, sigma))

    def __call__(self, maps, sigma, *, refine_fit: bool = True, max_iter: int = 40) -> InversionResult:
        """Invert B maps (B, H, W) on ``self.grid`` (row = v, column = u), sigma (B, H, W)."""
        self._pts = self._grid_pts
        x, y, s = self._prep(maps, sigma)
        if self.encoder is None:
            return self._refine(x, y, s, self._grid_starts(x, y, s), refine_fit, max_iter, "grid")
        return self._invert(x, y, s, refine_fit, max_iter)

    def invert_map(self, points: MapPoints, intensity, sigma, *, refine_fit: bool = True,
                   max_iter: int = 40) -> InversionResult:
        """Invert B frames of a run's map: intensity, sigma (B, M) at ``points``' M bins
        (intensity per solid angle, any scale; NaN or sigma <= 0: no weight). Class docstring."""
        pts, resampler = self._use_map(points)
        y, s = self._t(intensity), self._t(sigma)
        if y.dim() != 2 or s.shape != y.shape or y.shape[1] != points.index.size:
            raise ValueError(f"intensity and sigma must be (B, {points.index.size}), got {tuple(y.shape)}, "
                             f"{tuple(s.shape)}")
        self._pts = pts
        x = torch.arange(y.shape[1], dtype=self.dtype, device=self.device)
        if resampler is not None and self._encoder_fits(points, resampler):
            with torch.no_grad():
                yg = self._t(resampler(y)).reshape(y.shape[0], -1)
                shape_p = self.encoder(self._features(x, yg, torch.ones_like(yg))).to(self.dtype)
                shape_p = torch.minimum(torch.maximum(shape_p, self.lower[:self.n_shape]), self.upper[:self.n_shape])
                starts = self._amplitudes(x, shape_p, y, s)[:, None]
            res = self._refine(x, y, s, starts, refine_fit, max_iter, "encoder")
        else:
            res = self._refine(x, y, s, self._grid_starts(x, y, s), refine_fit, max_iter, "grid")
        return self._poisson_step(x, y, s, points, res, max_iter) if refine_fit else res

    def _poisson_step(self, x, y, s, points: MapPoints, res: InversionResult, max_iter: int) -> InversionResult:
        """The LM again from its result with the errors of the fitted model's expected counts,
        sigma = sqrt(max(I_model W + D, 1)) / W (``MapPoints``' weight and dark), instead of the observed
        counts': POISSON_STEPS steps of iteratively reweighted least squares toward the Poisson
        likelihood's optimum, sum (y - mu) / mu dmu/dp = 0 (McCullagh & Nelder, Generalized
        Linear Models, 2nd ed. (1989), 2.5); the second step moves the weights off the first
        fit's bias, a third changes nothing measurable. Weights from the observed
        counts bias a fit of a few counts per bin (measured, 2-20 counts a bin, 32 frames: radius
        pulls mean +0.86, std 1.34, before; +0.31, 1.00 after); chi2 and errors are then
        Pearson's. Bins without weight keep none."""
        w, dark = self._t(points.weight), self._t(points.dark)
        again = res
        for _ in range(POISSON_STEPS):
            with torch.no_grad():
                mu = self._fn(x, again.params)
            s_model = torch.where(torch.isfinite(s) & (s > 0), torch.sqrt((mu * w + dark).clamp_min(1.0)) / w, s)
            again = self._refine(x, y, s_model, again.params[:, None], True, max_iter, res.warm_start)
        return dataclasses.replace(again, encoder=res.encoder)

    def _use_map(self, points: MapPoints):
        """The forward model's points and the encoder's resampler of a run's map (cached)."""
        if self._map is None or self._map[0] is not points:
            t = lambda a: torch.as_tensor(np.asarray(a, np.float64))                       # noqa: E731
            pts = self._points(t(points.q_xy)[None], t(points.q_z)[None], t(points.alpha_f())[None],
                               points.wavelength, points.alpha_i)
            resampler = None if self.encoder is None else GridResampler(points, self.grid)
            self._map = (points, pts, resampler)
        return self._map[1], self._map[2]

    def _encoder_fits(self, points: MapPoints, resampler: GridResampler) -> bool:
        """The run's map covers enough of the encoder's grid at a similar alpha_i (class
        docstring); warns once when it does not."""
        ratio = points.alpha_i / self.grid.alpha_i
        use = resampler.coverage >= self.min_map_overlap and 0.5 <= ratio <= 2.0
        if not use and not self._warned:
            self._warned = True
            log.warning("inversion: the run's map (alpha_i %.3g mrad) covers %.0f %% of the encoder's grid "
                        "(alpha_i %.3g mrad; needs %.0f %% and alpha_i within 2x): the encoder was not trained "
                        "for it; LM from a grid search instead (%s)", 1e3 * points.alpha_i,
                        100 * resampler.coverage, 1e3 * self.grid.alpha_i, 100 * self.min_map_overlap,
                        self.model_name)
        return use

    def _grid_starts(self, x, y, s) -> torch.Tensor:
        """(B, n_starts, P) starts from a grid search on the current points (basis cached per points)."""
        if self._search is None or self._search[0] is not self._pts:
            grid = shape_grid(self.info, *self._bounds, self.dtype, self.device)
            self._search = (self._pts, grid, torch.cat([self.basis(x, g) for g in grid.split(32)]))
        starts, _ = grid_starts(self._search[1], self._search[2], self.info.grid[0], y, s, self.n_starts)
        return starts

    def _prep(self, maps, sigma):
        if self.grid is None:
            raise ValueError("maps on a detector grid need a checkpoint's grid; a run's map: invert_map")
        y, s = self._t(maps), self._t(sigma)
        if y.dim() != 3 or tuple(y.shape[1:]) != self.grid.shape or s.shape != y.shape:
            raise ValueError(f"maps and sigma must be (B, {self.grid.shape[0]}, {self.grid.shape[1]}), "
                             f"got {tuple(y.shape)}, {tuple(s.shape)}")
        x = torch.arange(y.shape[1] * y.shape[2], dtype=self.dtype, device=self.device)
        return x, y.reshape(y.shape[0], -1), s.reshape(s.shape[0], -1)


def make_inverter(spec, device="cpu") -> "SaxsInverter | GisaxsInverter":
    """The inverter of a run's InversionSpec: GisaxsInverter for a GisaxsInversionSpec (its
    subclass ``histogram_map.GisaxsHistogramInverter`` for a HISTOGRAM_MODELS model), else
    SaxsInverter."""
    if isinstance(spec, GisaxsInversionSpec) and spec.model in HISTOGRAM_MODELS:
        from workers.inversion.histogram_map import GisaxsHistogramInverter
        return GisaxsHistogramInverter.from_spec(spec, device=device)
    if isinstance(spec, GisaxsInversionSpec):
        return GisaxsInverter.from_spec(spec, device=device)
    return SaxsInverter.from_spec(spec, device=device)


def inversion_rows(res: InversionResult, seq_num=None, time=None) -> dict[str, np.ndarray]:
    """Columnar rows, one per frame: seq_num, time, model, then for each parameter <name>,
    <name>_err (NaN without refinement and on a bound), <name>_encoder (the LM start: encoder or
    grid search), <name>_at_bound (bool); then chi2 (reduced), p_value, fit_quality (good | poor
    | bad, workers.inversion.quality), converged, warm_start ("encoder" | "grid"); then, for the
    histogram model, the ``distribution``'s scalar columns (radius_mean, radius_mean_err,
    radius_width, radius_width_err, n_modes, radius_fraction_00.. and their _err,
    ``histogram_map.RadiusDistribution.columns``). seq_num, time: (B,) (default 1..B and NaN)."""
    B = res.params.shape[0]
    out = {"seq_num": np.asarray(seq_num if seq_num is not None else np.arange(1, B + 1), np.int64),
           "time": np.asarray(time if time is not None else np.full(B, np.nan), np.float64),
           "model": np.full(B, res.model)}
    p, e, pe = (t.detach().double().cpu().numpy() for t in (res.params, res.stderr, res.encoder))
    ab = (np.zeros(p.shape, bool) if res.at_bound is None else res.at_bound.detach().cpu().numpy().astype(bool))
    for j, nm in enumerate(res.names):
        out[nm], out[f"{nm}_err"], out[f"{nm}_encoder"], out[f"{nm}_at_bound"] = p[:, j], e[:, j], pe[:, j], ab[:, j]
    out["chi2"] = res.chi2_red.detach().double().cpu().numpy()
    out["p_value"] = (np.full(B, np.nan) if res.p_value is None else res.p_value.detach().double().cpu().numpy())
    out["fit_quality"] = (np.full(B, "") if res.quality is None else np.asarray(res.quality, dtype=np.str_))
    out["converged"] = res.converged.detach().cpu().numpy().astype(bool)
    out["warm_start"] = np.full(B, res.warm_start)
    if res.distribution is not None:
        out.update(res.distribution.columns())
    return out
