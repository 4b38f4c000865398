"""Richardson-Lucy deconvolution of profiles with a known instrument function, batched over frames.

Richardson, JOSA 62, 55 (1972); Lucy, AJ 79, 745 (1974); PHYSICS.md:
Î_n = Î_{n−1} · [(I / (Î_{n−1} ⊗ P)) ⊗ Pᵀ]. In matrix form, with the forward model
I ≈ H f + b (H: instrument response, b: a known background), this is the ML-EM iteration for
Poisson data (Shepp & Vardi, IEEE TMI 1, 113 (1982)):

    f ← f · Hᵀ[m · I / (H f + b)] / Hᵀ m,

m the mask of valid points (finite I and σ). Dividing by Hᵀm (not 1) makes it correct where the
response leaves the measured range and where bins are masked.

* Background: included as a known additive term b in the forward model (Snyder, Hammoud &
  White, JOSA A 10, 1014 (1993)), not subtracted: the data stay non-negative and Poisson-like.
  Estimate b first (``workers.background.snip`` or ``robust_background``); the estimate f is
  then the background-free, deconvolved signal. Negative data points are clipped to 0.
* Instrument: a fixed kernel (K,) on a uniform grid (``instrument_kernel``; applied as a
  linear convolution by FFT) or a q-dependent matrix H (N, N) (``instrument_matrix``;
  H[i, j] is the response at x_i to unit flux at x_j).
* Boundary (kernel only): ``"extend"`` (default) estimates f on the grid extended by the kernel
  half-width h on both sides, so flux just outside the range can explain the data near the
  edges (Bertero & Boccacci, A&A 437, 369 (2005)); the returned estimate is cropped to the N
  points. ``"zero"``: f lives on the N points only, the kernel is cut at the edges
  (scikit-image's ``richardson_lucy``, mode "same", up to the Hᵀm normalisation).
* Positivity: f >= 0 throughout for f_0 > 0 (multiplicative update, H >= 0, I >= 0; the
  update factor is clipped at 0 against FFT rounding).
* Stopping: a fixed number of iterations, or per frame at the first iterate with
  χ²/n = Σ m ((I − Hf − b)/σ)² / Σ m <= ``discrepancy`` (Morozov's discrepancy principle),
  which stops before noise is fitted and amplified. χ²/n of the true profile scatters by
  sqrt(2/n) about 1, so with a target of 1.0 about half the frames never reach it and run to
  ``iterations``; 1 + 3·sqrt(2/n) stops nearly all of them. Separating narrow overlapping peaks
  needs more iterations than the discrepancy principle allows (RL's drift towards point-like
  peaks is then what one wants): use a fixed count there (tests/test_deconvolve.py: 2000).
No per-point variance is returned: the deconvolved points are strongly correlated; judge
uncertainties by repeating on resampled data or from fits to the measured profile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from workers.fit import fit_batch
from workers.profiles import PROFILE_FUNCS, BackgroundSpec, ModelSpec, PeakModel, PeakSpec

__all__ = ["KernelShape", "Boundary", "grid_step", "instrument_kernel", "instrument_matrix", "RLResult",
           "richardson_lucy", "PeakLocations", "locate_peaks", "SeparatedPeaks", "fit_separated_peaks"]

KernelShape = Literal["gaussian", "lorentzian", "pseudo_voigt"]
Boundary = Literal["extend", "zero"]


# =========================================================================================
# Instrument functions
# =========================================================================================
def _check_shape(shape: str, eta: float) -> None:
    if shape not in ("gaussian", "lorentzian", "pseudo_voigt"):
        raise ValueError(f"shape must be 'gaussian', 'lorentzian' or 'pseudo_voigt', got {shape!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")


def _shape_values(shape: str, d: torch.Tensor, fwhm: torch.Tensor, eta: float) -> torch.Tensor:
    """Area-normalised profile (workers.profiles) at offsets d, FWHM broadcast against d."""
    zero, one = torch.zeros_like(fwhm), torch.ones_like(fwhm)
    args = (d, zero, fwhm, one) + ((torch.full_like(fwhm, eta),) if shape == "pseudo_voigt" else ())
    return PROFILE_FUNCS[shape](*args, jac=False)[0]


def grid_step(x: torch.Tensor, rtol: float = 1e-3) -> float:
    """Step of a uniform ascending grid x (N,), 1/nm; ValueError if not uniform within rtol."""
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"x must be 1D with at least 2 points, got shape {tuple(x.shape)}")
    d = torch.diff(x.double())
    dx = float(d.mean())
    if not dx > 0 or float((d - dx).abs().max()) > rtol * dx:
        raise ValueError(f"x must be uniform and ascending (steps {float(d.min())} .. {float(d.max())})")
    return dx


def instrument_kernel(x: torch.Tensor, fwhm: float, *, shape: KernelShape = "gaussian", eta: float = 0.0,
                      extent: float = 4.0) -> torch.Tensor:
    """Instrument kernel (K,) for the uniform grid x (N,), on x's device/dtype.

    Point samples of the area-normalised profile (FWHM ``fwhm`` in 1/nm; pseudo-Voigt
    η L + (1 − η) G with shared FWHM) at offsets k·dx, |k| <= h = ceil(extent·fwhm/dx),
    normalised to sum 1 (so K = 2h + 1, odd, centred). Cutting Lorentzian tails at
    ±extent·FWHM drops 1 − (2/π)·atan(2·extent) of their area before the normalisation.
    """
    _check_shape(shape, eta)
    if not (math.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be finite and > 0 (1/nm), got {fwhm!r}")
    if not extent > 0:
        raise ValueError(f"extent must be > 0 (in FWHM), got {extent!r}")
    dx = grid_step(x)
    h = int(math.ceil(extent * fwhm / dx))
    if 2 * h + 1 > 2 * x.numel() + 1:
        raise ValueError(f"kernel half-width {h} bins (fwhm={fwhm}, extent={extent}) exceeds the grid "
                         f"of {x.numel()} points")
    d = torch.arange(-h, h + 1, dtype=x.dtype, device=x.device) * dx
    k = _shape_values(shape, d, torch.tensor(fwhm, dtype=x.dtype, device=x.device), eta)
    return k / k.sum()


def instrument_matrix(x: torch.Tensor, fwhm: float | torch.Tensor, *, shape: KernelShape = "gaussian",
                      eta: float = 0.0) -> torch.Tensor:
    """q-dependent instrument response H (N, N): H[i, j] = k(x_i − x_j; fwhm_j) · Δx_i.

    x: (N,) ascending, 1/nm (need not be uniform); fwhm: a float or (N,) tensor, the FWHM of
    the response to flux at each x_j. Δx_i: bin widths (torch.gradient of x). Column j is the
    profile recorded for unit flux at x_j: it sums to ~1 inside the range and less where the
    response leaves the measured range.
    """
    _check_shape(shape, eta)
    if x.dim() != 1 or x.numel() < 2 or not bool((torch.diff(x) > 0).all()):
        raise ValueError(f"x must be 1D ascending with at least 2 points, got shape {tuple(x.shape)}")
    w = torch.as_tensor(fwhm, dtype=x.dtype, device=x.device)
    if w.dim() == 0:
        w = w.expand(x.shape[0])
    if w.shape != x.shape or not bool((torch.isfinite(w) & (w > 0)).all()):
        raise ValueError(f"fwhm must be > 0, a float or ({x.shape[0]},) tensor, got {fwhm!r}")
    dxi = torch.gradient(x)[0]
    return _shape_values(shape, x[:, None] - x[None, :], w[None, :], eta) * dxi[:, None]


# =========================================================================================
# Richardson-Lucy
# =========================================================================================
@dataclass
class RLResult:
    estimate: torch.Tensor    # (B, N) deconvolved signal (background-free), same units as intensity
    model: torch.Tensor       # (B, N) H·estimate + background, to compare with the data
    chi2_red: torch.Tensor    # (B,) Σ m r² / Σ m of the returned estimate (NaN without sigma)
    n_iter: torch.Tensor      # (B,) iterations applied
    stopped: torch.Tensor     # (B,) bool: discrepancy criterion reached (False without one)


class _Operator:
    """Forward H: (B, M) -> (B, N) and adjoint Hᵀ: (B, N) -> (B, M); M = N + 2h for "extend".

    Kernels: linear convolutions by FFT (zero-padded to a power of two >= M + K − 1, so no
    wrap-around); c = f * P, forward = c[K−1 : K−1+N] ("extend") or c[h : h+N] ("zero");
    adjoint = r * flip(P), all M points ("extend") or [h : h+N] ("zero").
    """

    def __init__(self, psf: torch.Tensor, n: int, boundary: Boundary | None):
        self.matrix = psf.dim() == 2
        self.n = n
        if self.matrix:
            if boundary is not None:
                raise ValueError(f"boundary applies to kernels only; a matrix sets its own, got {boundary!r}")
            self.h_mat, self.h, self.extend, self.m = psf, 0, False, n
            return
        p = psf / psf.sum()
        K = p.numel()
        self.h = K // 2
        self.extend = (boundary or "extend") == "extend"
        self.m = n + 2 * self.h if self.extend else n
        self.nfft = 1 << int(math.ceil(math.log2(self.m + K - 1)))
        self.pf = torch.fft.rfft(p, self.nfft)
        self.pft = torch.fft.rfft(p.flip(0), self.nfft)
        self.f0 = K - 1 if self.extend else self.h          # start of the forward slice

    def _conv(self, a: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft(torch.fft.rfft(a, self.nfft) * spectrum, self.nfft)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.matrix:
            return f @ self.h_mat.T
        return self._conv(f, self.pf)[:, self.f0:self.f0 + self.n]

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        if self.matrix:
            return r @ self.h_mat
        s = 0 if self.extend else self.h
        return self._conv(r, self.pft)[:, s:s + self.m]

    def crop(self, f: torch.Tensor) -> torch.Tensor:
        return f[:, self.h:f.shape[1] - self.h] if self.extend else f

    def lift(self, f: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, M): edge values repeated over the extension."""
        if not self.extend or self.h == 0:
            return f
        return torch.cat((f[:, :1].expand(-1, self.h), f, f[:, -1:].expand(-1, self.h)), dim=1)


def _check_psf(psf: torch.Tensor, n: int) -> None:
    if psf.dim() == 1:
        if psf.numel() % 2 != 1 or psf.numel() > 2 * n + 1:
            raise ValueError(f"kernel psf must have an odd length <= {2 * n + 1}, got {psf.numel()}")
    elif psf.dim() != 2 or psf.shape != (n, n):
        raise ValueError(f"psf must be a kernel (K,) or a matrix ({n}, {n}), got shape {tuple(psf.shape)}")
    if not bool((torch.isfinite(psf) & (psf >= 0)).all()) or not float(psf.sum()) > 0:
        raise ValueError("psf must be finite, >= 0 and not all zero")


def _as_frames(v, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    try:
        return t.expand_as(like)
    except RuntimeError:
        raise ValueError(f"{name} must broadcast to {tuple(like.shape)}, got shape {tuple(t.shape)}") from None


def _chi2(intensity, model, sigma, valid):
    r = torch.where(valid, (intensity - model) / sigma, torch.zeros_like(model))
    return (r * r).sum(-1) / valid.sum(-1).clamp_min(1)


def richardson_lucy(intensity: torch.Tensor, psf: torch.Tensor, *, iterations: int = 100,
                    sigma: torch.Tensor | None = None, background: float | torch.Tensor | None = None,
                    init: torch.Tensor | None = None, boundary: Boundary | None = None,
                    discrepancy: float | None = None, early_exit: bool | None = None) -> RLResult:
    """Deconvolve profiles intensity (B, N) by the instrument function psf.

    psf: kernel (K,), K odd, on the profiles' uniform grid (normalised to sum 1 here), or
      matrix (N, N) with H[i, j] the response at point i to unit flux at point j (used as is).
    iterations: the most RL iterations (>= 1). sigma: (B, N) standard errors, for χ² and the
      discrepancy stop; non-finite or <= 0 sigma, and non-finite intensity, mask the point.
    background: known additive background (float, (N,) or (B, N), >= 0), see module doc.
    init: f_0 > 0, (N,) or (B, N); None: flat at each frame's mean of max(I − b, 0).
    boundary: "extend" (kernel default) or "zero"; None with a matrix.
    discrepancy: stop each frame at the first iterate with χ²/n <= discrepancy (needs sigma).
    early_exit: leave the loop once every frame has stopped (a host sync per iteration);
      default on CPU; on CUDA the loop runs ``iterations`` times with stopped frames frozen.
    """
    if intensity.dim() != 2:
        raise ValueError(f"intensity must be (B, N), got shape {tuple(intensity.shape)}")
    B, N = intensity.shape
    psf = torch.as_tensor(psf, dtype=intensity.dtype, device=intensity.device)
    _check_psf(psf, N)
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if boundary is not None and boundary not in ("extend", "zero"):
        raise ValueError(f"boundary must be 'extend' or 'zero', got {boundary!r}")
    if discrepancy is not None and not (isinstance(discrepancy, (int, float)) and discrepancy > 0):
        raise ValueError(f"discrepancy must be a number > 0 (target χ²/n), got {discrepancy!r}")
    if discrepancy is not None and sigma is None:
        raise ValueError("discrepancy stopping needs sigma")
    if early_exit is None:
        early_exit = intensity.device.type == "cpu"
    op = _Operator(psf, N, boundary)
    valid = torch.isfinite(intensity)
    if sigma is not None:
        if sigma.shape != intensity.shape:
            raise ValueError(f"sigma must be {tuple(intensity.shape)}, got {tuple(sigma.shape)}")
        valid = valid & torch.isfinite(sigma) & (sigma > 0)
        sg = torch.where(valid, sigma, torch.ones_like(sigma))
    y = torch.where(valid, intensity, torch.zeros_like(intensity)).clamp_min(0.0)
    b = torch.zeros_like(y) if background is None else _as_frames(background, y, "background")
    if not bool((torch.isfinite(b) & (b >= 0)).all()):
        raise ValueError("background must be finite and >= 0")
    mask = valid.to(y.dtype)
    norm = op.adjoint(mask).clamp_min(0.0)
    constrained = norm > 1e-12 * norm.amax(-1, keepdim=True)
    norm = torch.where(constrained, norm, torch.ones_like(norm))
    if init is None:
        level = ((y - b).clamp_min(0.0) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
        f = level.clamp_min(1e-12 * y.amax(-1, keepdim=True).clamp_min(1e-30)).expand(B, op.m).clone()
    else:
        f0 = _as_frames(init, y, "init")
        if not bool((torch.isfinite(f0) & (f0 > 0)).all()):
            raise ValueError("init must be finite and > 0")
        f = op.lift(f0.clone())
    floor = 1e-12 * y.amax(-1, keepdim=True).clamp_min(1e-30)
    stopped = torch.zeros(B, dtype=torch.bool, device=y.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=y.device)
    for _ in range(iterations):
        model = op.forward(f) + b
        if discrepancy is not None:
            stopped = stopped | (_chi2(y, model, sg, valid) <= discrepancy)
            if early_exit and bool(stopped.all()):
                break
        ratio = mask * y / model.clamp_min(floor)
        upd = torch.where(constrained, op.adjoint(ratio).clamp_min(0.0) / norm, torch.ones_like(norm))
        f = torch.where(stopped[:, None], f, f * upd)
        n_iter = n_iter + (~stopped).to(torch.int64)
    model = op.forward(f) + b
    chi2 = (_chi2(y, model, sg, valid) if sigma is not None
            else torch.full((B,), math.nan, dtype=y.dtype, device=y.device))
    if discrepancy is not None:
        stopped = stopped | (chi2 <= discrepancy)
    return RLResult(op.crop(f), model, chi2, n_iter, stopped)


# =========================================================================================
# Peak location after deconvolution
# =========================================================================================
@dataclass
class PeakLocations:
    center: torch.Tensor   # (B, n) 1/nm, ascending; NaN where fewer maxima were found
    height: torch.Tensor   # (B, n) value at the interpolated vertex; NaN likewise


def _vertex(x0, x1, x2, y0, y1, y2):
    """Vertex (x, y) of the parabola through three points (any spacing)."""
    a0, a2 = x1 - x0, x1 - x2
    num = a0 * a0 * (y1 - y2) - a2 * a2 * (y1 - y0)
    den = a0 * (y1 - y2) - a2 * (y1 - y0)
    ok = den != 0
    xv = torch.where(ok, x1 - 0.5 * num / torch.where(ok, den, torch.ones_like(den)), x1)
    xv = torch.minimum(torch.maximum(xv, x0), x2)
    # value at the vertex from the Lagrange form
    l0 = (xv - x1) * (xv - x2) / ((x0 - x1) * (x0 - x2))
    l1 = (xv - x0) * (xv - x2) / ((x1 - x0) * (x1 - x2))
    l2 = (xv - x0) * (xv - x1) / ((x2 - x0) * (x2 - x1))
    return xv, l0 * y0 + l1 * y1 + l2 * y2


def locate_peaks(x: torch.Tensor, y: torch.Tensor, *, n_peaks: int, rel_height: float = 0.01,
                 interpolation: Literal["gaussian", "parabolic"] = "gaussian") -> PeakLocations:
    """The n_peaks highest local maxima of profiles y (B, N) on x (N,), with sub-bin centres.

    A local maximum: y_i > y_{i−1} and y_i >= y_{i+1}, 0 < i < N − 1, and y_i > rel_height ·
    max(y) of its frame (ignores specks, e.g. in the flanks of a deconvolved profile).
    Sub-bin: vertex of the parabola through the three points around it, on log y
    ("gaussian": exact for Gaussian peaks; falls back to parabolic where a value is <= 0) or on
    y ("parabolic"). Results sorted by centre; NaN where fewer maxima exist.
    """
    if interpolation not in ("gaussian", "parabolic"):
        raise ValueError(f"interpolation must be 'gaussian' or 'parabolic', got {interpolation!r}")
    if not (isinstance(rel_height, (int, float)) and 0.0 <= rel_height < 1.0):
        raise ValueError(f"rel_height must be in [0, 1), got {rel_height!r}")
    if not (isinstance(n_peaks, int) and n_peaks >= 1):
        raise ValueError(f"n_peaks must be an int >= 1, got {n_peaks!r}")
    if y.dim() != 2 or x.shape != y.shape[-1:] or x.numel() < 3:
        raise ValueError(f"need x (N,) and y (B, N), N >= 3, got {tuple(x.shape)} and {tuple(y.shape)}")
    B, N = y.shape
    yy = torch.nan_to_num(y, nan=-math.inf)
    mid = yy[:, 1:-1]
    is_max = (mid > yy[:, :-2]) & (mid >= yy[:, 2:]) & (mid > rel_height * yy.amax(-1, keepdim=True))
    cand = torch.where(is_max, mid, torch.full_like(mid, -math.inf))
    k = min(n_peaks, N - 2)
    h, j = cand.topk(k, dim=-1)
    i = j + 1
    found = torch.isfinite(h)
    y0, y1, y2 = (yy.gather(1, (i + s).clamp(0, N - 1)) for s in (-1, 0, 1))
    x0, x1, x2 = (x[(i + s).clamp(0, N - 1)] for s in (-1, 0, 1))
    fin = torch.isfinite(y0) & torch.isfinite(y2)
    y0, y2 = torch.where(fin, y0, y1), torch.where(fin, y2, y1)     # a masked neighbour: no interpolation
    xv, hv = _vertex(x0, x1, x2, y0, y1, y2)
    if interpolation == "gaussian":
        pos = (y0 > 0) & (y1 > 0) & (y2 > 0)
        one = torch.ones_like(y1)
        lxv, lhv = _vertex(x0, x1, x2, *(torch.log(torch.where(pos, v, one)) for v in (y0, y1, y2)))
        xv, hv = torch.where(pos, lxv, xv), torch.where(pos, torch.exp(lhv), hv)
    nan = torch.full_like(xv, math.nan)
    xv, hv = torch.where(found, xv, nan), torch.where(found, hv, nan)
    order = torch.argsort(torch.where(found, xv, torch.full_like(xv, math.inf)), dim=-1)
    center, height = xv.gather(1, order), hv.gather(1, order)
    if k < n_peaks:
        pad = torch.full((B, n_peaks - k), math.nan, dtype=y.dtype, device=y.device)
        center, height = torch.cat((center, pad), 1), torch.cat((height, pad), 1)
    return PeakLocations(center, height)


@dataclass
class SeparatedPeaks:
    center: torch.Tensor      # (B, n) 1/nm, ascending; NaN where the seed was NaN
    fwhm: torch.Tensor        # (B, n) 1/nm, FWHM of the deconvolved (intrinsic) peak
    area: torch.Tensor        # (B, n) intensity x 1/nm (RL keeps the flux, so areas carry over)
    converged: torch.Tensor   # (B,) bool


def fit_separated_peaks(x: torch.Tensor, estimate: torch.Tensor, centers: torch.Tensor, *,
                        fwhm: float | None = None, shape: KernelShape = "gaussian",
                        max_iter: int = 200) -> SeparatedPeaks:
    """Fit n peaks (+ a constant) to deconvolved profiles, started at ``centers``.

    x: (N,) 1/nm; estimate: (B, N) from ``richardson_lucy``; centers: (B, n) start centres,
    e.g. ``locate_peaks(...).center``. fwhm: start FWHM (1/nm), default 3 grid steps.
    Unweighted least squares (workers.fit.fit_batch, sigma = 1): the deconvolved points are
    correlated, so no standard errors are reported. The fitted centres are less biased than
    the maxima of the RL estimate, whose overlapping peaks lean outwards (RL fills the valley
    between them with the inner flanks; see benchmarks/bench_deconvolve.py).
    """
    if centers.dim() != 2 or centers.shape[0] != estimate.shape[0]:
        raise ValueError(f"centers must be (B, n) with B = {estimate.shape[0]}, got {tuple(centers.shape)}")
    _check_shape(shape, 0.5)
    dx = float((x[-1] - x[0]) / (x.numel() - 1))
    w0 = 3.0 * dx if fwhm is None else fwhm
    if not w0 > 0:
        raise ValueError(f"fwhm must be > 0 (1/nm), got {fwhm!r}")
    n = centers.shape[1]
    spec = ModelSpec(tuple(PeakSpec(f"p{i}", shape, center=float(x[x.numel() // 2]), fwhm=w0) for i in range(n)),
                     BackgroundSpec("polynomial", 0))
    model = PeakModel(spec)
    bound = model.bind(x)
    seeded = torch.isfinite(centers)
    c0 = torch.where(seeded, centers, torch.full_like(centers, float(x[x.numel() // 2])))
    p0 = bound.guess(estimate)
    height = estimate.gather(1, torch.searchsorted(x, c0.contiguous()).clamp(0, x.numel() - 1)).clamp_min(0.0)
    area_per_height = {"gaussian": 1.0645, "lorentzian": 1.5708, "pseudo_voigt": 1.3}[shape] * w0
    for i, sl in enumerate(model.peak_slices):
        p0[:, sl.start] = c0[:, i]
        p0[:, sl.start + 2] = height[:, i] * area_per_height
    res = fit_batch(bound, x, estimate, None, p0, max_iter=max_iter, return_covariance=False)
    cols = [[res.params[:, sl.start + j] for sl in model.peak_slices] for j in range(3)]
    center, width, area = (torch.stack(c, dim=1) for c in cols)
    nan = torch.full_like(center, math.nan)
    center, width, area = (torch.where(seeded, v, nan) for v in (center, width, area))
    order = torch.argsort(torch.where(seeded, center, torch.full_like(center, math.inf)), dim=1)
    return SeparatedPeaks(center.gather(1, order), width.gather(1, order), area.gather(1, order), res.converged)
