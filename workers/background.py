"""Background subtraction for reduced profiles, batched over frames.

Three tools, all on torch tensors ``(B, N)`` on the device of their inputs (q in 1/nm):

* ``subtract_measured``: a measured empty-cell / solvent / dark profile, scaled and subtracted,
  I_c = (I − s·I_bg) / (T_s·d), with the variance propagated,
  σ_c² = (σ² + s²·σ_bg² + var(s)·I_bg²) / (T_s·d)². The scale s is given, taken from the
  transmissions (s = T_s / T_bg; Pauw, J. Phys.: Condens. Matter 25, 383201 (2013)), or
  fitted by weighted least squares over a q range where the sample has no signal of its own.
* ``snip``: the SNIP clipping filter (Ryan et al., Nucl. Instrum. Methods B 34, 396 (1988)) on
  the LLS-transformed profile v = log(log(sqrt(I + 1) + 1) + 1), windows decreasing
  p = m … 1 (Morháč & Matoušek, Appl. Spectrosc. 62, 91 (2008)) or increasing p = 1 … m
  (Morháč et al., Nucl. Instrum. Methods A 401, 113 (1997)). Same clipping core as silx's
  ``silx.math.fit.filters.snip1d``.
* ``robust_background``: a smooth polynomial (Legendre basis) or power law A (q/q0)^−n + c fitted
  with the asymmetric truncated quadratic cost (Mazet et al., Chemom. Intell. Lab. Syst. 76,
  121 (2005)) by iterative reweighting: points more than ``threshold`` σ above the current
  background (the peaks) get weight 0, points below keep full weight, until the kept set stops
  changing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from workers.fit import fit_batch, spd_inverse
from workers.profiles import BackgroundSpec, ModelSpec, PeakModel

__all__ = ["Subtracted", "subtract_measured", "snip", "lls", "lls_inverse", "BackgroundFit",
           "robust_background", "noise_from_differences"]

Number = float | torch.Tensor
RobustKind = Literal["polynomial", "power_law"]


# =========================================================================================
# Measured background (empty cell, solvent, dark)
# =========================================================================================
@dataclass
class Subtracted:
    intensity: torch.Tensor   # (B, N) corrected intensity
    sigma: torch.Tensor       # (B, N) its standard error
    scale: torch.Tensor       # (B,) scale s applied to the background
    scale_err: torch.Tensor   # (B,) standard error of s (0 unless fitted, scale="auto")


def _per_frame(v: Number, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or (B,) tensor as a (B, 1) column on like's device/dtype, checked > 0."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, like.shape[0])):
        raise ValueError(f"{name} must be a float or a (B,) tensor with B = {like.shape[0]}, "
                         f"got shape {tuple(t.shape)}")
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0, got {v!r}")
    return t.reshape(-1, 1).expand(like.shape[0], 1)


def _fit_scale(intensity, sigma, bg, bg_sigma, inrange, n_rounds: int = 5):
    """Scale s of the background from the points in range, intensity ≈ s · bg there (B, N).

    Weighted least squares with the effective variance w = 1 / (σ² + s² σ_bg²) and the
    errors-in-variables (regression dilution) correction of the denominator:
    s = Σ w I I_bg / Σ w (I_bg² − σ_bg²), refreshed n_rounds times from s = 1;
    var(s) = 1 / Σ w I_bg². Without the correction a noisy background biases s low by the
    factor 1 / (1 + σ_bg²/I_bg²). Returns s, var(s) as (B, 1).
    """
    ok = inrange & torch.isfinite(intensity) & torch.isfinite(bg)
    ok = ok & torch.isfinite(sigma) & torch.isfinite(bg_sigma)
    y = torch.where(ok, intensity, torch.zeros_like(intensity))
    b = torch.where(ok, bg, torch.zeros_like(bg))
    vb = torch.where(ok, bg_sigma * bg_sigma, torch.zeros_like(bg))
    s = torch.ones(intensity.shape[0], 1, dtype=intensity.dtype, device=intensity.device)
    for _ in range(n_rounds):
        var = sigma * sigma + s * s * vb
        pos = ok & (var > 0)
        w = torch.where(pos, 1.0 / torch.where(pos, var, torch.ones_like(var)), torch.zeros_like(var))
        den = (w * b * b).sum(-1, keepdim=True)
        s = (w * y * b).sum(-1, keepdim=True) / (den - (w * vb).sum(-1, keepdim=True)).clamp_min(0.5 * den)
    return s, 1.0 / den


def subtract_measured(intensity: torch.Tensor, sigma: torch.Tensor, background: torch.Tensor,
                      background_sigma: torch.Tensor | None = None, *,
                      scale: Number | Literal["auto"] | None = None,
                      transmission: tuple[Number, Number] | None = None, thickness: float | None = None,
                      q: torch.Tensor | None = None, q_range: tuple[float, float] | None = None) -> Subtracted:
    """Subtract a measured background profile: I_c = (I − s·I_bg) / (T_s·d).

    intensity, sigma: (B, N) sample profiles and standard errors (e.g. IntegrationResult).
    background, background_sigma: (N,) or (B, N), the same q grid (background_sigma None: 0).
    Exactly one way to set the scale s (none: s = 1, T_s = 1):
      scale: a float or (B,) tensor s > 0 (e.g. a solvent volume fraction 1 − φ);
      scale="auto": least squares on ``q_range`` (1/nm, needs ``q`` (N,)), where the sample is
        assumed to scatter like the background (no signal of its own, e.g. high q), corrected
        for the noise of the background (see ``_fit_scale``);
        var(s) = 1/Σ w I_bg² is propagated: σ_c² gains var(s)·I_bg² (inside the fitting range,
        where the residuals are fitted, this overestimates σ_c slightly);
      transmission=(T_s, T_bg): s = T_s / T_bg and the result is divided by T_s (profiles
        normalised by I0 and time, not by transmission; Pauw 2013).
    thickness: sample thickness d (any unit, > 0): the result is divided by d.
    """
    if intensity.dim() != 2 or sigma.shape != intensity.shape:
        raise ValueError(f"intensity and sigma must both be (B, N), got {tuple(intensity.shape)} "
                         f"and {tuple(sigma.shape)}")
    B, N = intensity.shape
    bg = torch.as_tensor(background, dtype=intensity.dtype, device=intensity.device)
    if bg.shape not in ((N,), (B, N)):
        raise ValueError(f"background must be (N,) or (B, N) = ({B}, {N}), got {tuple(bg.shape)}")
    bg = bg.expand(B, N)
    bgs = (torch.zeros_like(bg) if background_sigma is None
           else torch.as_tensor(background_sigma, dtype=bg.dtype, device=bg.device).expand(B, N))
    if isinstance(scale, str) and scale != "auto":
        raise ValueError(f"scale must be a number, a (B,) tensor, 'auto' or None, got {scale!r}")
    if scale is not None and transmission is not None:
        raise ValueError(f"give either scale ({scale!r}) or transmission ({transmission!r}), not both")
    if (q_range is not None) != (isinstance(scale, str)):
        raise ValueError(f"q_range is needed with scale='auto' and only then, got scale={scale!r}, "
                         f"q_range={q_range!r}")
    zeros = torch.zeros(B, 1, dtype=intensity.dtype, device=intensity.device)
    norm = torch.ones_like(zeros)
    var_s = zeros
    if isinstance(scale, str):
        if q is None or q.shape != (N,):
            got = None if q is None else tuple(q.shape)
            raise ValueError(f"scale='auto' needs q of shape ({N},), got {got}")
        if len(q_range) != 2 or not q_range[0] < q_range[1]:
            raise ValueError(f"q_range must be (min, max) with min < max, got {q_range!r}")
        inrange = (q >= q_range[0]) & (q <= q_range[1])
        if int(inrange.sum()) < 2:
            raise ValueError(f"q_range {q_range!r} holds {int(inrange.sum())} points of q; need at least 2")
        s, var_s = _fit_scale(intensity, sigma, bg, bgs, inrange.expand(B, N))
    elif transmission is not None:
        if len(transmission) != 2:
            raise ValueError(f"transmission must be (T_sample, T_background), got {transmission!r}")
        t_s = _per_frame(transmission[0], intensity, "T_sample")
        t_b = _per_frame(transmission[1], intensity, "T_background")
        if not bool(((t_s <= 1) & (t_b <= 1)).all()):
            raise ValueError(f"transmissions must be in (0, 1], got {transmission!r}")
        s, norm = t_s / t_b, t_s
    else:
        s = norm if scale is None else _per_frame(scale, intensity, "scale")
    if thickness is not None:
        if not (isinstance(thickness, (int, float)) and math.isfinite(thickness) and thickness > 0):
            raise ValueError(f"thickness must be a finite number > 0, got {thickness!r}")
        norm = norm * thickness
    out = (intensity - s * bg) / norm
    var = sigma * sigma + s * s * bgs * bgs + var_s * bg * bg
    return Subtracted(out, var.sqrt() / norm, s[:, 0], var_s.sqrt()[:, 0])


# =========================================================================================
# SNIP
# =========================================================================================
def lls(intensity: torch.Tensor) -> torch.Tensor:
    """Log-log-square-root operator of Ryan et al. (1988): v = log(log(sqrt(I + 1) + 1) + 1), I >= 0."""
    return torch.log(torch.log(torch.sqrt(intensity + 1.0) + 1.0) + 1.0)


def lls_inverse(v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``lls``: I = (exp(exp(v) − 1) − 1)² − 1."""
    return (torch.exp(torch.exp(v) - 1.0) - 1.0) ** 2 - 1.0


def snip(intensity: torch.Tensor, half_width: int, *, use_lls: bool = True, decreasing: bool = True,
         smooth_half_width: int = 0) -> torch.Tensor:
    """SNIP background of profiles (B, N) -> (B, N), same units.

    For each window p (m = half_width bins; p = m … 1 if decreasing else 1 … m), every point
    i with p <= i < N − p is clipped: v_i = min(v_i, (v_{i−p} + v_{i+p}) / 2) (all i at once,
    from the previous pass). Boundary: the first and last p points are not clipped by window p
    (as silx snip1d and ROOT TSpectrum), so peaks closer than m bins to an edge leak into the
    background there. Choose m about the full width of the broadest peak at its base, in bins.
    use_lls: clip v = lls(I − o) and transform back (o = min(min_i I, 0) per frame, so
      negative values after a subtraction are allowed; the LLS suits counts-like scales).
    smooth_half_width: s > 0 replaces v by its running mean over 2s + 1 points (finite points
      only, shorter windows at the edges) before clipping. Without it the clipping follows the
      lower envelope of the noise and the background comes out low by about 1-2 σ (Poisson).
    Non-finite points are treated as +inf (clipped to the mean of their neighbours); those
    the clipping cannot reach (edges) come back NaN. No variance: the clipping is nonlinear.
    """
    if intensity.dim() != 2:
        raise ValueError(f"intensity must be (B, N), got shape {tuple(intensity.shape)}")
    N = intensity.shape[-1]
    if not (isinstance(half_width, int) and 1 <= half_width <= (N - 1) // 2):
        raise ValueError(f"half_width must be an int in [1, {(N - 1) // 2}] (bins), got {half_width!r}")
    finite = torch.isfinite(intensity)
    y = torch.where(finite, intensity, torch.zeros_like(intensity))
    offset = y.amin(-1, keepdim=True).clamp_max(0.0)
    v = lls(y - offset) if use_lls else y
    if smooth_half_width:
        v = _boxcar(v, finite, smooth_half_width)
    v = torch.where(finite, v, torch.full_like(v, math.inf))
    for p in (range(half_width, 0, -1) if decreasing else range(1, half_width + 1)):
        mid = 0.5 * (v[:, :N - 2 * p] + v[:, 2 * p:])
        v = torch.cat((v[:, :p], torch.minimum(v[:, p:N - p], mid), v[:, N - p:]), dim=-1)
    out = (lls_inverse(v) + offset) if use_lls else v
    return torch.where(torch.isfinite(out), out, torch.full_like(out, math.nan))


def _boxcar(v: torch.Tensor, finite: torch.Tensor, s: int) -> torch.Tensor:
    """Running mean over 2s + 1 points of the finite entries of v (B, N)."""
    if not (isinstance(s, int) and s >= 0):
        raise ValueError(f"smooth_half_width must be an int >= 0, got {s!r}")
    w = finite.to(v.dtype)
    ones = torch.ones(1, 1, 2 * s + 1, dtype=v.dtype, device=v.device)
    v0 = torch.where(finite, v, torch.zeros_like(v))
    num = torch.nn.functional.conv1d(v0[:, None], ones, padding=s)[:, 0]
    den = torch.nn.functional.conv1d(w[:, None], ones, padding=s)[:, 0]
    return torch.where(den > 0, num / den.clamp_min(1.0), v)


# =========================================================================================
# Robust (asymmetric, iteratively reweighted) polynomial / power-law background
# =========================================================================================
@dataclass
class BackgroundFit:
    background: torch.Tensor   # (B, N) fitted background
    sigma: torch.Tensor        # (B, N) its standard error, from (J^T W J)^-1 over the kept points
    params: torch.Tensor       # (B, P) Legendre coefficients c_0..c_d in u, or (A, n, c)
    used: torch.Tensor         # (B, N) bool, points kept as background at the end
    n_iter: torch.Tensor       # (B,) reweighting rounds until the kept set stopped changing
    converged: torch.Tensor    # (B,) bool


def noise_from_differences(intensity: torch.Tensor) -> torch.Tensor:
    """Robust per-frame noise σ (B, 1) from first differences: 1.4826 · median|Δy| / sqrt 2."""
    d = torch.diff(torch.nan_to_num(intensity), dim=-1).abs()
    return (1.4826 / math.sqrt(2.0)) * d.median(dim=-1, keepdim=True).values


def _legendre(u: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_d at u (N,) -> (N, d+1), Bonnet's recurrence."""
    cols = [torch.ones_like(u), u]
    for k in range(1, degree):
        cols.append(((2 * k + 1) * u * cols[k] - k * cols[k - 1]) / (k + 1))
    return torch.stack(cols[:degree + 1], dim=-1)


def _poly_fit(basis, y, w):
    """Weighted least squares per frame: basis (N, P), y, w (B, N) -> coefficients (B, P), cov (B, P, P)."""
    a = torch.einsum("np,bn,nq->bpq", basis, w, basis)
    g = torch.einsum("np,bn->bp", basis, w * y)
    cov, _ = spd_inverse(a)
    return (cov @ g[..., None])[..., 0], cov


def _power_law_fit(bound, y, sigma, keep, p0):
    """One weighted power-law fit with fit_batch (dropped points: sigma = inf). Unscaled covariance."""
    s_eff = torch.where(keep, sigma, torch.full_like(sigma, math.inf))
    res = fit_batch(bound, bound.x, y, s_eff, p0, max_iter=100)
    cov = res.covariance / res.chi2_red.clamp_min(torch.finfo(y.dtype).tiny)[:, None, None]
    return res.params, cov


def robust_background(x: torch.Tensor, intensity: torch.Tensor, sigma: torch.Tensor | None = None, *,
                      kind: RobustKind = "polynomial", degree: int = 2, threshold: float = 2.0,
                      max_iter: int = 30, early_exit: bool | None = None) -> BackgroundFit:
    """Smooth background under peaks by the asymmetric truncated quadratic (Mazet et al. 2005).

    x: (N,) 1/nm. intensity, sigma: (B, N); sigma None: a constant per frame from
    ``noise_from_differences``. kind "polynomial": Σ_k c_k P_k(u), u = (x − x0)/xs in [−1, 1]
    (Legendre basis for conditioning), degree 0..8, linear weighted least squares;
    "power_law": A (x/x0)^−n + c (x > 0), fitted with ``workers.fit.fit_batch``.
    Each round refits on the kept points and keeps those with (I − b)/σ <= threshold; it stops
    per frame when the kept set repeats (max_iter rounds). Noise above the threshold is dropped
    too, which biases b low by about φ(t)/Φ(t)·σ (0.055 σ at t = 2).
    early_exit: stop when all frames have converged (one host sync a round); default on CPU.
    """
    if kind not in ("polynomial", "power_law"):
        raise ValueError(f"kind must be 'polynomial' or 'power_law', got {kind!r}")
    if kind == "polynomial" and not (isinstance(degree, int) and 0 <= degree <= 8):
        raise ValueError(f"degree must be an int in [0, 8], got {degree!r}")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"threshold must be > 0 (in σ), got {threshold!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if intensity.dim() != 2 or x.shape != intensity.shape[-1:]:
        raise ValueError(f"need x (N,) and intensity (B, N), got {tuple(x.shape)} and {tuple(intensity.shape)}")
    if kind == "power_law" and not bool((x > 0).all()):
        raise ValueError("power_law needs x > 0 everywhere")
    if sigma is None:
        tiny = torch.finfo(intensity.dtype).tiny
        sigma = noise_from_differences(intensity).clamp_min(tiny).expand_as(intensity)
    if early_exit is None:
        early_exit = intensity.device.type == "cpu"
    B, N = intensity.shape
    valid = torch.isfinite(intensity) & torch.isfinite(sigma) & (sigma > 0)
    y = torch.where(valid, intensity, torch.zeros_like(intensity))
    sg = torch.where(valid, sigma, torch.ones_like(sigma))
    keep = valid.clone()
    done = torch.zeros(B, dtype=torch.bool, device=y.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=y.device)
    if kind == "polynomial":
        x0, xs = 0.5 * (x.max() + x.min()), (0.5 * (x.max() - x.min())).clamp_min(1e-12)
        basis = _legendre((x - x0) / xs, degree)

        def fit(p_prev):
            return _poly_fit(basis, y, keep.to(y.dtype) / (sg * sg))

        def evaluate(p):
            return p @ basis.T, basis.T.expand(B, -1, -1)
        params = torch.zeros(B, degree + 1, dtype=y.dtype, device=y.device)
    else:
        bound = PeakModel(ModelSpec((), BackgroundSpec("power_law"))).bind(x)

        def fit(p_prev):
            return _power_law_fit(bound, y, sg, keep, p_prev)

        def evaluate(p):
            return bound.evaluate_and_jacobian(p)
        params = bound.guess(y)
    cov = None
    for _ in range(max_iter):
        p_new, cov_new = fit(params)
        params = torch.where(done[:, None], params, p_new)
        cov = cov_new if cov is None else torch.where(done[:, None, None], cov, cov_new)
        b, _ = evaluate(params)
        keep_new = valid & ((y - b) / sg <= threshold)
        same = (keep_new == keep).all(-1)
        n_iter = n_iter + (~done).to(torch.int64)
        keep = torch.where(done[:, None], keep, keep_new)
        done = done | same
        if early_exit and bool(done.all()):
            break
    b, jac = evaluate(params)
    var = torch.einsum("bpn,bpq,bqn->bn", jac, cov, jac).clamp_min(0.0)
    return BackgroundFit(b, var.sqrt(), params, keep, n_iter, done)
