"""Per-frame inversion of a GISAXS run's map for a radius *histogram*
(``spheres_histogram_paracrystal_dwba``): the encoder's histogram and parameters as the start,
then the projected LM (``workers.inversion.lm.fit_bounded``) on the frame's own map.

Parameters of the LM, p (B, P), P = 2 + K + 2 (K radius bins of the checkpoint's
``distribution.RadiusBins``):

    (distance nm, disorder, z_0 .. z_{K-1}, i0, background)

z are logits of the *volume* fractions, v = softmax(z), the number fractions the model takes
w = ``distribution.number_fractions``(v) (the same softmax up to a fixed shift of the logits by
-ln <r^3>_k), so the weights stay >= 0 and sum to 1 whatever the step. z lie in [-Z, Z],
Z = ``LOGIT_BOUND``. The softmax leaves one direction (all z + c) free: one prior row pins it,
and a mild smoothness prior regularises the bins the data cannot see. Both are pseudo-data rows
appended to the map's bins (y = 0, sigma = 1), residuals

    ``smooth`` * (z_{k-1} - 2 z_k + z_{k+1}),  k = 1 .. K-2     (curvature of ln v: a
        Gaussian mode of relative width s has -(h / s)^2 per bin, h the bins' log width: 2.1 at
        s = 0.06; smooth = 0.3 costs ~0.4 in chi2 per bin of such a mode against ~N = 10^3-10^4
        data points, so it moves nothing the data determine)
    mean(z)                                                       (the gauge)

so chi2 (and the posterior covariance the errors come from) includes them; the reported chi2
(``chi2_red``, the verdict) is the data's alone over the same degrees of freedom (N - P + K - 1:
the K - 1 prior rows count as data points, the K logits as parameters).

Errors: the LM's covariance at the optimum, C = (J^T W J)_FF^-1 chi2_red (lmfit's scale_covar;
parameters on a bound fixed), then the delta method (g'(z) C_zz g'(z)^T, g' by autodiff) for the
number distribution's mean radius and relative width (``distribution.moments``) and the volume
fractions v. ``n_modes``: ``distribution.find_modes`` of v.

Start: the checkpoint's ``MapHistogramEncoder`` on the map resampled onto its grid (as
``GisaxsInverter.invert_map``), the amplitudes by non-negative least squares; without an encoder
or where the map does not fit its grid: a uniform volume histogram and the best of a grid of
distances. Then, as ``GisaxsInverter``, POISSON_STEPS reweighting steps with the model's
expected counts. The sphere amplitudes at the fixed radius nodes are computed once per map
(``HistogramMapModel``): each model evaluation is then the decoupling products and S(q).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from workers.fit import spd_inverse
from workers.inversion.distribution import RadiusBins, find_modes, number_fractions, radius_moments
from workers.inversion.dwba import dwba_amplitudes
from workers.inversion.encoder import ParamBounds
from workers.inversion.gisaxs import HISTOGRAM_PARACRYSTAL_PARAMS, paracrystal_s, sphere_amplitudes
from workers.inversion.lm import bound_flags, fit_bounded
from workers.inversion.maps import MapPoints
from workers.inversion.models import BasisModel
from workers.inversion.refine import POISSON_STEPS, GisaxsInverter, InversionResult, _as_dict
from workers.inversion.search import nonneg_amplitudes
from workers.inversion.spec import HISTOGRAM_MODELS, Substrate, shape_bounds

log = logging.getLogger(__name__)

LOGIT_BOUND = 20.0           # |z_k| (volume-fraction logits): ratios up to e^40
SMOOTH = 0.3                 # weight of the curvature prior on z (module docstring)


@dataclass
class RadiusDistribution:
    """Per frame (B frames, K bins): the fitted histogram and its derived quantities (errors by
    the delta method; NaN without refinement)."""
    bins: RadiusBins
    volume: np.ndarray            # (B, K) volume fractions
    volume_err: np.ndarray        # (B, K)
    radius_mean: np.ndarray       # (B,) nm, number-weighted
    radius_mean_err: np.ndarray
    radius_width: np.ndarray      # (B,) std / mean of the number distribution
    radius_width_err: np.ndarray
    n_modes: np.ndarray           # (B,) int: modes of the volume histogram (find_modes)

    def columns(self) -> dict[str, np.ndarray]:
        """Scalar columns: radius_mean, radius_mean_err, radius_width, radius_width_err, n_modes,
        radius_fraction_00 .. (volume fractions) and radius_fraction_00_err .."""
        out = {"radius_mean": self.radius_mean, "radius_mean_err": self.radius_mean_err,
               "radius_width": self.radius_width, "radius_width_err": self.radius_width_err,
               "n_modes": self.n_modes.astype(np.int64)}
        for k in range(self.volume.shape[1]):
            out[f"radius_fraction_{k:02d}"] = self.volume[:, k]
        for k in range(self.volume.shape[1]):
            out[f"radius_fraction_{k:02d}_err"] = self.volume_err[:, k]
        return out


class HistogramMapModel(BasisModel):
    """``spheres_histogram_paracrystal_dwba`` at a map's points as a BasisModel, p = (distance,
    disorder, z (K), i0, background), with the prior's rows appended after the N data points
    (module docstring): evaluate_and_jacobian -> (B, N + K - 1). ``jacobian="analytic"``
    (``_map_and_jacobian``: 3 evaluations of S a Jacobian) or "forward" (BasisModel's forward
    differences in all 2 + K shape parameters, K + 3 evaluations: the plain reference)."""

    def __init__(self, dq, bins: RadiusBins, n_points: int, lower, upper, smooth: float = SMOOTH,
                 jacobian: Literal["analytic", "forward"] = "analytic"):
        if jacobian not in ("analytic", "forward"):
            raise ValueError(f"jacobian must be 'analytic' or 'forward', got {jacobian!r}")
        self.bins, self.K, self.smooth, self.analytic = bins, bins.n_bins, float(smooth), jacobian == "analytic"
        x = torch.arange(n_points, dtype=lower.dtype, device=lower.device)
        super().__init__(self._shape_basis, x, lower, upper, 1, "forward")
        dq = dq.to(lower.dtype, lower.device)
        r, _ = bins.nodes(torch.ones(1, self.K, dtype=lower.dtype, device=lower.device))
        fr, fi, f0 = (t[0] for t in dwba_amplitudes(sphere_amplitudes, dq, r[None]))      # (n, M), (n,)
        self.m = fr.shape[1]
        self.stack = torch.cat([fr * fr + fi * fi, fr, fi], 1)                            # (n, 3 M)
        self.f0sq = f0 * f0
        self.q_par, self.omega = dq.q_par.reshape(-1), dq.omega.reshape(-1)
        eye = torch.eye(self.K, dtype=lower.dtype, device=lower.device)
        self.expand = bins.nodes(eye)[1]                    # (K, n): number fractions -> node weights
        self.r3 = bins.mean_r3(lower)                       # (K,) <r^3> per bin
        self.per_bin = self.expand @ self.stack            # (K, 3 M): (|F|^2, Re F, Im F) summed over each bin's nodes
        self.f0sq_bin = self.expand @ self.f0sq            # (K,)
        K = self.K
        d = torch.zeros(K - 1, K, dtype=lower.dtype, device=lower.device)
        for k in range(1, K - 1):
            d[k - 1, k - 1:k + 2] = torch.tensor([1.0, -2.0, 1.0]) * self.smooth
        d[K - 2] = 1.0 / K                                   # the gauge: mean(z)
        self.prior = d                                       # (K - 1, K)

    def number(self, z: torch.Tensor) -> torch.Tensor:
        """Number fractions (B, K) of volume logits z (B, K) (``distribution.number_fractions``)."""
        n = torch.softmax(z, -1) / self.r3
        return n / n.sum(-1, keepdim=True)

    def _shape_basis(self, x, shape):
        """(B, 1, N): the model with i0 = 1, background 0 for shape (distance, disorder, z)."""
        dist, dis = shape[:, 0], shape[:, 1]
        nodes = self.number(shape[:, 2:]) @ self.expand                                   # (B, n)
        s = paracrystal_s(self.q_par, dist, dis * dist)
        # gisaxs.decoupling as one GEMM: <|F|^2>, <Re F>, <Im F> = nodes @ (|F|^2, Re F, Im F)
        ff, mr, mi = (nodes @ self.stack).split(self.m, 1)
        i_da = (ff + (mr * mr + mi * mi) * (s - 1.0)) / (nodes @ self.f0sq)[:, None]
        return (self.omega * i_da)[:, None]

    def prior_rows(self, p: torch.Tensor) -> torch.Tensor:
        """The prior's residual rows (B, K - 1) (their data are 0, sigma 1)."""
        return p[:, 2:2 + self.K] @ self.prior.T

    def evaluate(self, p):
        return torch.cat([super().evaluate(p), self.prior_rows(p)], 1)

    def _map_and_jacobian(self, p):
        """The map rows f (B, M) and their Jacobian (B, P, M): forward differences in distance and
        disorder (2 evaluations of S), analytic in the logits and the amplitudes. With u = number
        fractions = softmax(z - ln <r^3>), n = u E the node weights, I_da = (n.|F|^2 + |n.F|^2 (S - 1))
        / n.F(0)^2 (``gisaxs.decoupling``):
            dI_da/du_k = [E_k.|F|^2 + 2 (Re<F> E_k.Re F + Im<F> E_k.Im F)(S - 1) - I_da E_k.F(0)^2] / n.F(0)^2,
            dI/dz_l = i0 omega u_l (dI_da/du_l - sum_k u_k dI_da/du_k)."""
        B, M, K = p.shape[0], self.m, self.K
        sh, z, i0, bkg = p[:, :2], p[:, 2:2 + K], p[:, 2 + K], p[:, 3 + K]
        h = 1e-5 * torch.maximum(sh.abs(), 1e-2 * self.span[:2].to(p))                   # (B, 2)
        dd = torch.cat([sh, (sh[None] + torch.diag_embed(h).transpose(0, 1)).reshape(-1, 2)], 0)   # (3 B, 2)
        s_all = paracrystal_s(self.q_par, dd[:, 0], dd[:, 1] * dd[:, 0])                  # (3 B, M)
        u = self.number(z)
        nodes = u @ self.expand
        ff, mr, mi = (nodes @ self.stack).split(M, 1)
        norm = (nodes @ self.f0sq)[:, None]
        coh = mr * mr + mi * mi
        i_all = (ff.repeat(3, 1) + coh.repeat(3, 1) * (s_all - 1.0)) / norm.repeat(3, 1)     # (3 B, M)
        i_da = i_all[:B]
        g = self.omega * i_da
        f = i0[:, None] * g + bkg[:, None]
        js = self.omega * (i_all[B:].reshape(2, B, M) - i_da[None]) / h.T[:, :, None] * i0[None, :, None]
        ffb, frb, fib = self.per_bin.split(M, 1)                                          # (K, M)
        du = (ffb[None] + 2.0 * (mr[:, None] * frb[None] + mi[:, None] * fib[None]) * (s_all[:B, None] - 1.0)
              - i_da[:, None] * self.f0sq_bin[None, :, None]) / norm[:, None]            # (B, K, M)
        jz = (i0[:, None, None] * self.omega) * u[:, :, None] * (du - (u[:, :, None] * du).sum(1, keepdim=True))
        cols = torch.cat([js.transpose(0, 1), jz, g[:, None], torch.ones_like(g[:, None])], 1)
        return f, cols

    def evaluate_and_jacobian(self, p, scale=None, jac=True):
        N = self.x.shape[0]
        if jac and self.analytic:
            f, cols = self._map_and_jacobian(p)
            if scale is not None:
                f, cols = f * scale[:, :N], cols * scale[:, None, :N]
        else:
            f, cols = super().evaluate_and_jacobian(p, None if scale is None else scale[:, :N], jac)
        sp = None if scale is None else scale[:, N:]
        fp = self.prior_rows(p) * (1.0 if sp is None else sp)
        f = torch.cat([f, fp], 1)
        if not jac:
            return f, None
        B, P = p.shape
        jp = torch.zeros(B, P, self.K - 1, dtype=p.dtype, device=p.device)
        jp[:, 2:2 + self.K] = self.prior.T
        if sp is not None:
            jp = jp * sp[:, None, :]
        return f, torch.cat([cols, jp], 2)


class GisaxsHistogramInverter(GisaxsInverter):
    """A grazing run's map in ``spheres_histogram_paracrystal_dwba`` (module docstring): ``state``
    the ``MapHistogramEncoder`` checkpoint (``radius_bins``, ``grid``, ``bounds``, ``substrate``),
    or None with ``bins`` given (start from a uniform histogram). ``invert_map`` as
    GisaxsInverter's; its InversionResult has the parameters HISTOGRAM_PARACRYSTAL_PARAMS and the
    histogram as ``distribution`` (RadiusDistribution)."""

    def __init__(self, state: dict | None = None, device="cpu", dtype=torch.float64, *,
                 model: str = "spheres_histogram_paracrystal_dwba", substrate: Substrate | None = None, bounds=(),
                 bins: RadiusBins | None = None, min_map_overlap: float = 0.5, good_p_value: float = 1e-3,
                 bad_chi2: float = 4.0, smooth: float = SMOOTH):
        from workers.inversion.encoder import encoder_from_state
        from workers.inversion.gisaxs import DetectorGrid
        info = HISTOGRAM_MODELS.get(model)
        if info is None:
            raise ValueError(f"histogram inversion model must be one of {tuple(HISTOGRAM_MODELS)}, got {model!r}")
        if substrate is None and state is not None and state.get("substrate"):
            substrate = Substrate(**state["substrate"])
        if substrate is None:
            raise ValueError(f"the {model} model needs a substrate (delta, beta at the run's energy)")
        if state is not None and state.get("arch", {}).get("class") != "MapHistogramEncoder":
            raise ValueError(f"the {model} model needs a MapHistogramEncoder checkpoint "
                             f"(service/models/gisaxs_dwba_encoder.pt), got {state.get('arch', {}).get('class')!r}")
        self.bins = RadiusBins.from_dict(state["radius_bins"]) if state is not None else bins
        if self.bins is None:
            raise ValueError(f"the {model} model needs radius bins: an encoder checkpoint or bins")
        self.info, self.substrate, self.smooth = info, substrate, float(smooth)
        self.model_name, self.names = model, HISTOGRAM_PARACRYSTAL_PARAMS
        self.device, self.dtype = torch.device(device), dtype
        self.encoder, self.grid = None, None
        defaults = {}
        if state is not None:
            self.encoder = encoder_from_state(state).to(device)
            eb = ParamBounds.from_dict(state["bounds"])
            if tuple(eb.names) != info.shape:
                raise ValueError(f"encoder parameters {eb.names} must be {info.shape}")
            defaults = dict(zip(eb.names, zip(eb.lo, eb.hi)))
            g = state["grid"]
            self.grid = DetectorGrid(float(g["wavelength"]), float(g["alpha_i"]), tuple(g["u"]), tuple(g["v"]))
        lo, hi = shape_bounds(model, {**defaults, **_as_dict(bounds)})
        K = self.bins.n_bins
        self.lower = torch.tensor([*lo, *[-LOGIT_BOUND] * K, 0.0, 0.0], dtype=dtype, device=device)
        self.upper = torch.tensor([*hi, *[LOGIT_BOUND] * K, math.inf, math.inf], dtype=dtype, device=device)
        self._bounds = (lo, hi)
        self.min_map_overlap = float(min_map_overlap)
        self.good_p_value, self.bad_chi2 = float(good_p_value), float(bad_chi2)
        self._map = None
        self._model: tuple | None = None        # (MapPoints, HistogramMapModel) of the last map
        self._warned = False
        self.lm_chunk = 1 if self.device.type == "cpu" else None

    @classmethod
    def from_spec(cls, spec, device="cpu") -> "GisaxsHistogramInverter":
        return cls(spec.state, device=device, model=spec.model, substrate=spec.substrate, bounds=spec.bounds,
                   min_map_overlap=spec.min_map_overlap, good_p_value=spec.good_p_value, bad_chi2=spec.bad_chi2)

    def __call__(self, *a, **k):
        raise NotImplementedError("the histogram model inverts a run's map: invert_map")

    def map_model(self, points: MapPoints) -> HistogramMapModel:
        """The model at ``points``' bins (cached per map)."""
        if self._model is None or self._model[0] is not points:
            dq, _ = self._use_map(points)
            self._model = (points, HistogramMapModel(dq, self.bins, points.index.size, self.lower, self.upper,
                                                     self.smooth))
        return self._model[1]

    def invert_map(self, points: MapPoints, intensity, sigma, *, refine_fit: bool = True,
                   max_iter: int = 40) -> InversionResult:
        """Invert B frames of a run's map: intensity, sigma (B, M) at ``points``' M bins
        (intensity per solid angle, any scale; NaN or sigma <= 0: no weight)."""
        y, s = self._t(intensity), self._t(sigma)
        if y.dim() != 2 or s.shape != y.shape or y.shape[1] != points.index.size:
            raise ValueError(f"intensity and sigma must be (B, {points.index.size}), got {tuple(y.shape)}, "
                             f"{tuple(s.shape)}")
        model = self.map_model(points)
        _, resampler = self._use_map(points)
        if resampler is not None and self._encoder_fits(points, resampler):
            start, how = self._encoder_start(model, resampler, y, s), "encoder"
        else:
            start, how = self._grid_start(model, y, s), "grid"
        if not refine_fit:
            return self._finish(model, y, s, start, start, None, how)
        fit, s_last = self._fit(model, y, s, start, max_iter), s
        w, dark = self._t(points.weight), self._t(points.dark)
        for _ in range(POISSON_STEPS):                      # as GisaxsInverter._poisson_step
            with torch.no_grad():
                mu = model.evaluate(fit.params)[:, :y.shape[1]]
            s_model = torch.where(torch.isfinite(s) & (s > 0), torch.sqrt((mu * w + dark).clamp_min(1.0)) / w, s)
            fit = self._fit(model, y, s_model, fit.params, max_iter)
            s_last = s_model
        return self._finish(model, y, s_last, fit.params, start, fit, how)

    # ------------------------------------------------------------------------------------------
    def _extended(self, model, y, s):
        """Data plus the prior's pseudo-data rows (0 +- 1)."""
        B, R = y.shape[0], model.K - 1
        return (torch.cat([y, torch.zeros(B, R, dtype=y.dtype, device=y.device)], 1),
                torch.cat([s, torch.ones(B, R, dtype=s.dtype, device=s.device)], 1))

    def _fit(self, model, y, s, p0, max_iter):
        ye, se = self._extended(model, y, s)
        return fit_bounded(model, ye, se, p0, self.lower, self.upper, max_iter=max_iter, chunk_size=self.lm_chunk)

    def _amplitudes_for(self, model, shape, y, s):
        amp, chi2 = nonneg_amplitudes(model.basis(shape), y, s)
        return torch.cat([shape, amp], 1), chi2

    @torch.no_grad()
    def _encoder_start(self, model, resampler, y, s):
        yg = self._t(resampler(y)).reshape(y.shape[0], -1)
        params, vol = self.encoder(self._features(None, yg, torch.ones_like(yg)))
        params = torch.minimum(torch.maximum(params.to(self.dtype), self.lower[:2]), self.upper[:2])
        z = vol.to(self.dtype).clamp_min(1e-12).log()
        z = (z - z.mean(-1, keepdim=True)).clamp(-LOGIT_BOUND, LOGIT_BOUND)
        return self._amplitudes_for(model, torch.cat([params, z], 1), y, s)[0]

    @torch.no_grad()
    def _grid_start(self, model, y, s):
        """Uniform volume histogram (z = 0), disorder mid-range, the distance of least chi2 on a log
        grid of 24 over its bounds."""
        lo, hi = self._bounds
        B, K = y.shape[0], model.K
        dists = torch.exp(torch.linspace(math.log(lo[0]), math.log(hi[0]), 24, dtype=self.dtype))
        best, best_chi = None, None
        for d in dists.tolist():
            shape = torch.tensor([[d, 0.5 * (lo[1] + hi[1])] + [0.0] * K], dtype=self.dtype,
                                 device=self.device).expand(B, -1)
            p, chi = self._amplitudes_for(model, shape, y, s)
            if best is None:
                best, best_chi = p, chi
            else:
                better = chi < best_chi
                best = torch.where(better[:, None], p, best)
                best_chi = torch.where(better, chi, best_chi)
        return best

    def _finish(self, model, y, s, p, start, fit, how) -> InversionResult:
        """InversionResult of the four parameters with ``distribution``; chi2 of the data alone."""
        B, N = y.shape
        P, K = p.shape[1], model.K
        ok = torch.isfinite(y) & torch.isfinite(s) & (s > 0)
        with torch.no_grad():
            f = model.evaluate(p)[:, :N]
        r = torch.where(ok, (y - f) / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(y))
        dof = (ok.sum(-1) + (K - 1) - P).clamp_min(1).to(y.dtype)
        chi2r = torch.where(ok.sum(-1) + K - 1 > P, (r * r).sum(-1) / dof, torch.full_like(dof, math.nan))
        at_b = bound_flags(p, self.lower, self.upper)
        keep = [0, 1, P - 2, P - 1]                          # distance, disorder, i0, background
        if fit is None:
            cov = torch.full((B, P, P), math.nan, dtype=p.dtype, device=p.device)
            conv = torch.zeros(B, dtype=torch.bool, device=p.device)
        else:
            cov = self._covariance(model, y, s, p, at_b, fit.chi2_red)
            conv = fit.converged
        se = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0))
        se = torch.where(at_b, torch.full_like(se, math.nan), se)
        res = self._result(p[:, keep], se[:, keep], start[:, keep], chi2r, conv, at_b[:, keep], dof, how)
        res.distribution = self._distribution(model, p[:, 2:2 + K], cov[:, 2:2 + K, 2:2 + K], at_b[:, 2:2 + K])
        return res

    def _covariance(self, model, y, s, p, at_b, chi2_red):
        """(B, P, P): (J^T W J)_FF^-1 chi2_red at p (data and prior rows), 0 for parameters on a bound."""
        ye, se = self._extended(model, y, s)
        ok = torch.isfinite(se) & (se > 0) & torch.isfinite(ye)
        w = torch.where(ok, 1.0 / torch.where(ok, se, torch.ones_like(se)), torch.zeros_like(ye))
        with torch.no_grad():
            _, jw = model.evaluate_and_jacobian(p, w)
        a = jw @ jw.transpose(1, 2)
        ff = (~at_b).to(a.dtype)
        inv, _ = spd_inverse(a * ff[:, :, None] * ff[:, None, :] + torch.diag_embed(1.0 - ff))
        return inv * ff[:, :, None] * ff[:, None, :] * chi2_red[:, None, None]

    def _distribution(self, model, z, cov_z, at_b) -> RadiusDistribution:
        """Volume fractions, moments of the number distribution, their delta-method errors, modes."""
        def derived(zz):                                   # (K,) -> (2 + K,)
            v = torch.softmax(zz, -1)
            return torch.cat([radius_moments(self.bins, number_fractions(self.bins, v[None]))[0], v])
        vals = torch.stack([derived(zb) for zb in z])
        jac = torch.func.vmap(torch.func.jacrev(derived))(z)                               # (B, 2 + K, K)
        var = torch.diagonal(jac @ cov_z @ jac.transpose(1, 2), dim1=1, dim2=2)
        err = var.clamp_min(0).sqrt().detach().cpu().numpy()
        v = vals.detach().cpu().numpy()
        vol = v[:, 2:]
        modes = np.array([len(find_modes(self.bins, row)) for row in vol], np.int64)
        return RadiusDistribution(self.bins, vol, err[:, 2:], v[:, 0], err[:, 0], v[:, 1], err[:, 1], modes)
