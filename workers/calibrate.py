"""Unattended geometry calibration from one calibrant frame (powder rings, known d-spacings).

The five PONI parameters ``dist, poni1, poni2, rot1, rot2`` (m, rad; ``rot3`` fixed at 0, it
cannot be refined from powder rings) are found in four steps, all on the unmasked pixels:

1. **Beam centre and tilt** (first order): unless a guess is given, a gradient Hough vote
   (ring-flank gradients are radial, each votes along its line); then the direct-beam centre
   and the tilt slopes ``u = tilt / D`` that make the radial profile sharpest in the
   tilt-corrected radius ``ρ' = |Δ| / (1 + u·Δ)``, in which the rings are circles of radius
   ``D tan 2θ_k`` (:func:`center_tilt_sharpness`).
2. **Distance**, searched globally: the profile in ``ρ'`` (bins of half a pixel) is
   cross-correlated with the comb of the calibrant's ring radii ``ρ_k = D tan 2θ_k``
   (``2θ_k = 2 asin(λ / 2 d_k)``, Bragg's law) for every ``D`` from 0.5 to 2 times the guess,
   evenly in log D; the best normalised correlation wins (:func:`search_distance`). With the
   centre and tilts of step 1 this is the start geometry; a guess 25 % off is as good as an
   exact one.
3. **Control points**: in the current geometry every ring is cut into azimuthal sectors (about
   12 px of arc each); in each sector the pixels within a window around the ring's expected 2θ
   are binned by ``u = (2θ − 2θ_k) / a_k`` (``a_k`` = rad per radial pixel) and a Gaussian plus a
   linear background is fitted (batched Levenberg-Marquardt over all sectors). Accepted peaks
   (signal-to-noise, width, full coverage on both flanks: gaps, beamstop and detector edges are
   rejected here) become control points ``(2θ_k + a_k c, χ̄)``, mapped back to the detector plane
   by inverting the current geometry.
4. **Refinement**: ``min Σ_j (2θ(p1_j, p2_j; dist, poni1, poni2, rot1, rot2) − 2θ_{k_j})²`` by
   Levenberg-Marquardt (Marquardt's diagonal scaling, float64, Jacobian by ``torch.func``)
   through the differentiable :func:`workers.geometry.tth_chi`, with 5-MAD outlier rejection.

Steps 3-4 repeat with growing ring sets (outer rings once the inner ones fix the geometry) and
narrowing windows until the parameters stop moving. pyFAI is used only for the calibrant
d-spacings and the detector definition (pixel positions, gap mask), once per call.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .geometry import Geometry, pixel_positions, rotation_matrix, tth_chi

logger = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "calibrate", "calibrant_tth", "beam_center_hough", "center_tilt_sharpness",
           "search_distance", "refine_geometry", "pixel_to_position", "position_to_pixel"]


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    geometry: refined PONI geometry (rot3 = 0); rings_used: calibrant rings with control points;
    rms_residual_deg: rms of 2θ(control point) − 2θ_ring in degrees; n_points: control points;
    iterations: extraction/refinement cycles; seconds: wall time; ring_points: (n_points, 3)
    float64 ``(row, col, ring)`` with row/col in array-index units (pixel (i, j) centred at
    (i, j), as pyFAI control points) and ring the index into the calibrant's d-spacing list.
    """

    geometry: Geometry
    rings_used: int
    rms_residual_deg: float
    n_points: int
    iterations: int
    seconds: float
    ring_points: np.ndarray


# =========================================================================================
# Setup helpers (pyFAI once per call)
# =========================================================================================
def calibrant_tth(calibrant: str, wavelength: float) -> tuple[np.ndarray, np.ndarray]:
    """(d-spacings in Å, 2θ in rad) of a pyFAI calibrant; 2θ = 2 asin(λ / 2d), NaN if λ > 2d."""
    from pyFAI.calibrant import CALIBRANT_FACTORY, get_calibrant

    if calibrant not in CALIBRANT_FACTORY:
        names = ", ".join(sorted(CALIBRANT_FACTORY.keys()))
        raise ValueError(f"unknown calibrant {calibrant!r}; pyFAI knows: {names}")
    d = np.asarray(get_calibrant(calibrant).dspacing, dtype=np.float64)
    x = wavelength * 1e10 / (2.0 * d)
    with np.errstate(invalid="ignore"):
        tth = np.where(x < 1.0, 2.0 * np.arcsin(np.minimum(x, 1.0)), np.nan)
    return d, tth


def _affine(geometry: Geometry):
    """pos = a * index + b along each axis (m); (a1, b1, a2, b2). Flat, undistorted only."""
    p1, p2, p3 = pixel_positions(geometry)
    if p3 is not None and bool(torch.any(p3 != 0)):
        raise ValueError(f"detector {geometry.detector!r} is not flat; calibration needs a flat one")
    p1, p2 = p1.numpy(), p2.numpy()
    rows, cols = p1.shape
    a1 = (p1[-1, 0] - p1[0, 0]) / max(rows - 1, 1)
    a2 = (p2[0, -1] - p2[0, 0]) / max(cols - 1, 1)
    b1, b2 = p1[0, 0], p2[0, 0]
    r, c = np.indices(p1.shape, dtype=np.float64)
    tol = 1e-6 * max(abs(a1), abs(a2))
    if np.abs(a1 * r + b1 - p1).max() > tol or np.abs(a2 * c + b2 - p2).max() > tol:
        raise ValueError(f"detector {geometry.detector!r} has distorted pixel positions; not supported")
    return float(a1), float(b1), float(a2), float(b2)


def pixel_to_position(geometry: Geometry, row, col):
    """Detector coordinates (pos1, pos2) in m of array indices (row, col) (pixel centre at i)."""
    a1, b1, a2, b2 = _affine(geometry)
    return a1 * np.asarray(row, np.float64) + b1, a2 * np.asarray(col, np.float64) + b2


def position_to_pixel(geometry: Geometry, pos1, pos2):
    """Array indices (row, col) of detector coordinates (pos1, pos2) in m."""
    a1, b1, a2, b2 = _affine(geometry)
    return (np.asarray(pos1, np.float64) - b1) / a1, (np.asarray(pos2, np.float64) - b2) / a2


# =========================================================================================
# 1. Beam centre (Hough vote, profile sharpness); 2. distance from the radial profile
# =========================================================================================
def _highpass_log(frame: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """log1p(frame) minus its normalised Gaussian blur; 0 on invalid pixels."""
    from scipy.ndimage import gaussian_filter

    img = np.where(valid, np.log1p(np.clip(frame, 0, None)), 0.0)
    w = valid.astype(np.float64)
    blur = gaussian_filter(img, sigma) / np.maximum(gaussian_filter(w, sigma), 1e-6)
    return np.where(valid, img - blur, 0.0)


def _bin2(a: np.ndarray, b: int) -> np.ndarray:
    h, w = (a.shape[0] // b) * b, (a.shape[1] // b) * b
    return a[:h, :w].reshape(h // b, b, w // b, b).sum(axis=(1, 3))


def beam_center_hough(frame: np.ndarray, valid: np.ndarray, n_edges: int = 4000) -> tuple[float, float]:
    """Beam centre (row, col), array-index units, by a gradient Hough vote (Ballard 1981).

    On the smoothed log image (normalised convolution with the validity mask, binned to at most
    512 px a side) the steepest-gradient pixels lie on ring flanks, where the gradient is radial;
    each votes along its gradient line into an accumulator that extends one detector size
    beyond each edge; the smoothed maximum is the centre. Works for partial rings and beams off
    the detector centre; good to a pixel or two (tilted rings are ellipses).
    """
    from scipy.ndimage import binary_erosion, gaussian_filter

    b = max(1, math.ceil(max(frame.shape) / 512))
    valid_b = _bin2(valid.astype(np.float64), b)
    ok = valid_b >= 0.5 * b * b
    mean_b = np.where(ok, _bin2(np.where(valid, frame, 0.0), b) / np.maximum(valid_b, 1), 0.0)
    img = np.where(ok, np.log1p(np.clip(mean_b, 0, None)), 0.0)
    w = ok.astype(np.float64)
    sm = gaussian_filter(img, 1.5) / np.maximum(gaussian_filter(w, 1.5), 1e-6)
    g0, g1 = np.gradient(sm)
    inner = binary_erosion(ok, iterations=4)
    mag = np.where(inner, np.hypot(g0, g1), 0.0)
    n = min(n_edges, int(inner.sum()) // 4)
    if n < 20:
        raise ValueError("too few unmasked pixels to locate the beam centre; give a guess")
    flat = np.argpartition(mag.ravel(), -n)[-n:]
    r, c = np.unravel_index(flat, mag.shape)
    u0, u1 = g0.ravel()[flat] / mag.ravel()[flat], g1.ravel()[flat] / mag.ravel()[flat]
    h, wd = mag.shape
    span = int(1.5 * math.hypot(h, wd))
    t = np.arange(-span, span + 1, 0.5)
    vr = (r[:, None] + t[None, :] * u0[:, None]).ravel()
    vc = (c[:, None] + t[None, :] * u1[:, None]).ravel()
    inside = (vr > -h) & (vr < 2 * h - 1) & (vc > -wd) & (vc < 2 * wd - 1)
    ir = np.rint(vr[inside]).astype(np.int64) + h
    ic = np.rint(vc[inside]).astype(np.int64) + wd
    acc = np.bincount(ir * (3 * wd) + ic, minlength=9 * h * wd).reshape(3 * h, 3 * wd).astype(np.float64)
    acc = gaussian_filter(acc, 1.0)
    i, j = np.unravel_index(np.argmax(acc), acc.shape)
    lo0, hi0, lo1, hi1 = max(i - 2, 0), i + 3, max(j - 2, 0), j + 3
    patch = acc[lo0:hi0, lo1:hi1]
    ii, jj = np.mgrid[lo0:hi0, lo1:hi1]
    cb0 = (patch * ii).sum() / patch.sum() - h
    cb1 = (patch * jj).sum() / patch.sum() - wd
    return b * cb0 + 0.5 * (b - 1), b * cb1 + 0.5 * (b - 1)


def center_tilt_sharpness(frame: np.ndarray, valid: np.ndarray, guess: tuple[float, float],
                          radius: float = 12.0) -> tuple[float, float, float, float]:
    """Direct-beam centre (row, col) px and tilt slopes (u_row, u_col) 1/px near ``guess``.

    A detector tilted by small angles puts the pixel Δ = (Δrow, Δcol) px from the direct beam at
    D (1 + u·Δ) along the beam (u = tilt / D), so that ring k lies at ρ' = |Δ| / (1 + u·Δ) =
    D tan 2θ_k: circles around the direct beam in ρ', to first order in the tilt. The four
    parameters maximise the sharpness of the profile in ρ': the between-bin variance
    Σ_b n_b P_b² of the high-passed log image (P_b: its mean in bin b of ρ', one binned pixel
    wide), on the image binned to at most 384 px a side. A grid search over the centre
    (±radius px, u = 0), then Nelder-Mead over centre and u together (they are correlated: an
    untilted fit moves the centre towards the outer rings' ellipse centres).
    """
    from scipy.optimize import minimize

    b = max(1, math.ceil(max(frame.shape) / 384))
    valid_b = _bin2(valid.astype(np.float64), b)
    ok = valid_b >= 0.5 * b * b
    mean_b = np.where(ok, _bin2(np.where(valid, frame, 0.0), b) / np.maximum(valid_b, 1), 0.0)
    f = _highpass_log(mean_b, ok, sigma=6.0)
    r, c = np.nonzero(ok)
    fv = f[r, c]
    r = r * b + 0.5 * (b - 1)
    c = c * b + 0.5 * (b - 1)

    def score(p):
        dr, dc = r - p[0], c - p[1]
        scale = 1.0 + p[2] * dr + p[3] * dc
        if scale.min() < 0.5:                               # no physical tilt does that
            return -math.inf
        idx = (np.hypot(dr, dc) / scale / b).astype(np.int64)
        n = np.bincount(idx)
        s = np.bincount(idx, weights=fv, minlength=n.size)
        return float((s * s / np.maximum(n, 1)).sum())

    grid = np.arange(-radius, radius + 1e-9, max(1.0, radius / 6))
    _, r0, c0 = max((score((guess[0] + d0, guess[1] + d1, 0.0, 0.0)), guess[0] + d0, guess[1] + d1)
                    for d0 in grid for d1 in grid)
    rmax = float(np.hypot(r - r0, c - c0).max())
    unit = np.array([1.0, 1.0, 1.0 / rmax, 1.0 / rmax])      # u in units of 1/rmax
    start = np.array([r0, c0, 0.0, 0.0])
    simplex = np.vstack([np.zeros(4), np.diag([3.0, 3.0, 0.02, 0.02])])
    res = minimize(lambda x: -score(start + x * unit), np.zeros(4), method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, xatol=0.05, fatol=1e-9, maxfev=600))
    p = start + res.x * unit
    return float(p[0]), float(p[1]), float(p[2]), float(p[3])


def _radial_profile(intensity: np.ndarray, rho: np.ndarray, pixel: float):
    """High-passed log radial profile: (bin centres (B,) m, profile z (B,), bins with data (B,)).

    intensity: (P,) counts; rho: (P,) their radius (m, from the direct beam, tilt-corrected);
    pixel: m. Bins of half a pixel in ρ; per bin b the mean of log1p(counts) over its n_b
    pixels, minus its 20 px running median, times sqrt(n_b) (noise of a mean falls as
    1/sqrt(n)), in units of 1.4826 x its median absolute value (noise σ) and clipped to [-3, 6]:
    a ring counts by where it is, not by how bright it is, so that one strong ring cannot
    outweigh several weak ones in :func:`search_distance`.
    """
    from scipy.ndimage import median_filter

    bw = 0.5 * pixel
    nb = int(rho.max() / bw) + 2
    idx = (rho / bw).astype(np.int64)
    cnt = np.bincount(idx, minlength=nb)
    good = cnt >= 3
    if good.sum() < 50:
        raise ValueError(f"only {int(good.sum())} radial bins (half a pixel wide) hold data around "
                         "the beam centre; no radial profile to find rings in")
    mean = np.bincount(idx, weights=np.log1p(np.clip(intensity, 0, None)), minlength=nb) / np.maximum(cnt, 1)
    filled = np.interp(np.arange(nb), np.flatnonzero(good), mean[good])
    hp = (filled - median_filter(filled, size=41, mode="nearest")) * np.sqrt(cnt)
    sigma = 1.4826 * np.median(np.abs(hp[good])) + 1e-12
    z = np.where(good, np.clip(hp / sigma, -3.0, 6.0), 0.0)
    return (np.arange(nb) + 0.5) * bw, z, good


def search_distance(intensity: np.ndarray, rho: np.ndarray, tth: np.ndarray, guess: float,
                    pixel: float, span: tuple[float, float] = (0.5, 2.0)) -> float:
    """Sample-detector distance (m) from the radial profile, searched globally over a range.

    intensity: (P,) counts of the valid pixels; rho: (P,) their distance from the direct beam on
    the detector (m; tilt-corrected, see :func:`center_tilt_sharpness`); tth: calibrant 2θ (rad,
    NaN where unreachable); guess: m; pixel: m; span: the distances tried, as factors of ``guess``.

    Rings lie at ρ_k = D tan 2θ_k, so the trial distances D are spaced evenly in log D (steps that
    move the outermost ring by 1/8 px) and each is scored by the normalised cross-correlation of
    the profile z (:func:`_radial_profile`) with the comb of its predicted rings,
    S(D) = Σ_k z(D tan 2θ_k) / sqrt(n(D)), over the n(D) rings that fall where the profile has
    data; the best D wins. Dividing by sqrt(n) ranks the aliases below the truth: D/2 puts twice
    the rings on the detector, half of them on nothing; 2D explains only every other observed
    ring. One ring scores at most 6 (z is clipped there), so S < 6.5 means no two rings match:
    ValueError.
    """
    centres, z, good = _radial_profile(intensity, rho, pixel)
    bw = centres[1] - centres[0]
    r_lo, r_hi = centres[good][0], centres[good][-1]
    d_lo, d_hi = guess * span[0], guess * span[1]
    tan = np.tan(tth[np.isfinite(tth) & (tth < 0.5 * np.pi)])
    tan = tan[(d_hi * tan > r_lo) & (d_lo * tan < r_hi)]
    if tan.size < 2:
        raise ValueError(f"fewer than two calibrant rings can fall on the detector for distances "
                         f"{d_lo:.4g}..{d_hi:.4g} m")
    cand = np.exp(np.arange(math.log(d_lo), math.log(d_hi), 0.25 * bw / r_hi))
    score = np.empty(cand.size)
    for i in range(0, cand.size, 2048):                     # bounded memory: 2048 x rings
        radii = cand[i:i + 2048, None] * tan[None, :]
        inside = good[np.clip((radii / bw).astype(np.int64), 0, good.size - 1)] & (radii < r_hi)
        hit = np.where(inside, np.interp(radii, centres, z), 0.0).sum(axis=1)
        score[i:i + 2048] = hit / np.sqrt(np.maximum(inside.sum(axis=1), 1))
    best = int(np.argmax(score))
    if score[best] < 6.5:
        raise ValueError(f"no calibrant rings found: for no distance in {d_lo:.4g}..{d_hi:.4g} m do two "
                         f"or more of the calibrant's rings fall on peaks of the radial profile "
                         f"(best match score {score[best]:.1f}, needs 6.5)")
    return float(cand[best])


# =========================================================================================
# 3. Control points: batched Gaussian + linear background fits per (ring, sector)
# =========================================================================================
_NBINS = 40


def _gauss_model(p: torch.Tensor, x: torch.Tensor):
    """f = A exp(-(x-c)²/2s²) + b0 + b1 x and ∂f/∂p; p: (G, 5) [A, c, s, b0, b1], x: (G, nb)."""
    amp, c, s, b0, b1 = p.unbind(-1)
    z = (x - c[:, None]) / s[:, None]
    g = torch.exp(-0.5 * z * z)
    f = amp[:, None] * g + b0[:, None] + b1[:, None] * x
    jac = torch.stack([g, amp[:, None] * g * z / s[:, None], amp[:, None] * g * z * z / s[:, None],
                       torch.ones_like(x), x], dim=-1)
    return f, jac


def _fit_peaks(x, y, w, p0, iterations: int = 20):
    """Batched weighted LM of :func:`_gauss_model`. x, y, w: (G, nb); p0: (G, 5).

    Returns (p, covariance (G, 5, 5) scaled by max(χ²_red, 1), χ²_red)."""
    p = p0.clone()
    lam = torch.full_like(p[:, 0], 1e-2)
    f, jac = _gauss_model(p, x)
    chi2 = (w * (y - f) ** 2).sum(-1)
    eye = torch.eye(5, dtype=p.dtype, device=p.device)
    for _ in range(iterations):
        jtw = jac.transpose(1, 2) * w[:, None, :]
        a = jtw @ jac
        g = (jtw @ (y - f)[..., None])[..., 0]
        diag = torch.diagonal(a, dim1=1, dim2=2).clamp_min(1e-30)
        step = torch.linalg.solve(a + (lam[:, None] * diag)[:, :, None] * eye + 1e-30 * eye, g)
        trial = p + step
        trial[:, 2] = trial[:, 2].abs().clamp_min(1e-3)
        f_t, jac_t = _gauss_model(trial, x)
        chi2_t = (w * (y - f_t) ** 2).sum(-1)
        better = torch.isfinite(chi2_t) & (chi2_t < chi2)
        gain = torch.where(better, (chi2 - chi2_t) / chi2.clamp_min(1e-300), torch.zeros_like(chi2))
        p = torch.where(better[:, None], trial, p)
        f = torch.where(better[:, None], f_t, f)
        jac = torch.where(better[:, None, None], jac_t, jac)
        chi2 = torch.where(better, chi2_t, chi2)
        lam = torch.where(better, lam * 0.3, lam * 10.0).clamp(1e-9, 1e9)
        if _ % 4 == 3 and not bool((gain > 1e-7).any()):   # no fit moves any more
            break
    jtw = jac.transpose(1, 2) * w[:, None, :]
    a = jtw @ jac
    dof = ((w > 0).sum(-1) - 5).clamp_min(1)
    red = chi2 / dof
    cov = torch.linalg.pinv(torch.nan_to_num(a)) * red.clamp_min(1.0)[:, None, None]
    return p, cov, red


@dataclass
class _Rings:
    """Rings extracted in one cycle. Per ring k: calibrant index, 2θ (rad), rad per radial
    pixel a, window half-width W (px, allowed misplacement), peak σ guess (px), sectors."""

    index: np.ndarray
    tth: np.ndarray
    a: np.ndarray
    window: np.ndarray
    sigma: np.ndarray
    sectors: np.ndarray


def _extract(params: torch.Tensor, tth: torch.Tensor, chi: torch.Tensor, inten: torch.Tensor,
             rings: _Rings):
    """Control points (pos1, pos2, ring index, fitted σ px) for the rings in the current geometry.

    tth/chi/inten: (P,) valid pixels (rad, counts) in the geometry ``params``. Returns numpy
    arrays of the accepted points.
    """
    dev, dt = tth.device, tth.dtype
    t = lambda a: torch.as_tensor(a, dtype=dt, device=dev)
    tth_k, a_k, win = t(rings.tth), t(rings.a), t(rings.window)
    half = win + 5.0 * t(rings.sigma)                       # bins span [-half, half] px
    lo = tth_k - half * a_k
    hi = tth_k + half * a_k
    j = torch.searchsorted(lo.contiguous(), tth, right=True) - 1
    jc = j.clamp_min(0)
    sel = (j >= 0) & (tth < hi[jc])
    j, tt, ch, val = jc[sel], tth[sel], chi[sel], inten[sel]
    u = (tt - tth_k[j]) / a_k[j]
    nsec = torch.as_tensor(rings.sectors, device=dev)
    offs = torch.cumsum(nsec, 0) - nsec
    sec = ((ch + math.pi) / (2 * math.pi) * nsec[j]).floor().long().clamp(max=nsec[j] - 1).clamp_min(0)
    sec_c = (sec.to(dt) + 0.5) / nsec[j] * 2 * math.pi - math.pi
    dchi = torch.remainder(ch - sec_c + math.pi, 2 * math.pi) - math.pi
    grp = offs[j] + sec
    ngrp = int(nsec.sum())
    bw = 2 * half[j] / _NBINS
    b = ((u + half[j]) / bw).floor().long().clamp(0, _NBINS - 1)
    flat = grp * _NBINS + b
    size = ngrp * _NBINS
    cnt = torch.zeros(size, dtype=dt, device=dev).index_add_(0, flat, torch.ones_like(u))
    s_i = torch.zeros(size, dtype=dt, device=dev).index_add_(0, flat, val)
    s_chi = torch.zeros(size, dtype=dt, device=dev).index_add_(0, flat, dchi)
    cnt, s_i, s_chi = (v.view(ngrp, _NBINS) for v in (cnt, s_i, s_chi))

    ring_of = torch.repeat_interleave(torch.arange(len(rings.tth), device=dev), nsec)
    sec_of = torch.arange(ngrp, device=dev) - offs[ring_of]
    n_tot = cnt.sum(1)
    keep = n_tot >= 2 * _NBINS * 0.5                        # at least ~1 pixel per bin on average
    if not bool(keep.any()):
        return _empty_points()
    cnt, s_i, s_chi, ring_of, sec_of, n_tot = (v[keep] for v in (cnt, s_i, s_chi, ring_of, sec_of, n_tot))
    hk = half[ring_of]
    x = -hk[:, None] + (torch.arange(_NBINS, device=dev, dtype=dt)[None, :] + 0.5) * (2 * hk[:, None] / _NBINS)
    y = s_i / cnt.clamp_min(1)
    w = torch.where(cnt > 0, cnt / y.clamp_min(1.0), torch.zeros_like(y))
    # initial guess: maximum of the 3-bin smoothed profile inside the allowed window
    has = (cnt > 0).to(dt)
    pool = lambda v: torch.nn.functional.avg_pool1d(v[:, None], 3, 1, 1)[:, 0]
    ysm = pool(y * has) / pool(has).clamp_min(1e-9)
    ysm = torch.where((pool(has) > 0) & (x.abs() <= win[ring_of][:, None]), ysm, -torch.inf)
    imax = ysm.argmax(1)
    ymasked = torch.where(cnt > 0, y, torch.nan)
    base = torch.nanmedian(ymasked, dim=1).values
    peak = ymasked.gather(1, imax[:, None])[:, 0]
    p0 = torch.stack([(peak - base).clamp_min(1.0), x.gather(1, imax[:, None])[:, 0],
                      t(rings.sigma)[ring_of], base, torch.zeros_like(base)], dim=1)
    bad0 = ~torch.isfinite(p0).all(1)
    p0 = torch.where(bad0[:, None], torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=dt, device=dev), p0)
    p, cov, _ = _fit_peaks(x, y, w, p0)
    p = torch.where(bad0[:, None], torch.nan, p)
    amp, c, s = p[:, 0], p[:, 1], p[:, 2]
    sig_a = cov[:, 0, 0].clamp_min(0).sqrt()
    sig_c = cov[:, 1, 1].clamp_min(0).sqrt()
    # coverage: both flanks (c-2.5s, c) and (c, c+2.5s) populated, no empty bins in between
    near = (x - c[:, None]).abs() < 2.5 * s[:, None]
    left = ((x < c[:, None]) & near).to(dt)
    right = ((x >= c[:, None]) & near).to(dt)
    n_left, n_right = (cnt * left).sum(1), (cnt * right).sum(1)
    empty = ((cnt == 0) & near).sum(1)
    ok = (torch.isfinite(p).all(1) & (amp > 5 * sig_a) & (sig_c < 0.5) & (s > 0.2)
          & (s < 0.5 * (hk - c.abs())) & (c.abs() <= win[ring_of])
          & (n_left >= 0.6 * n_right) & (n_right >= 0.6 * n_left) & (empty <= 0.1 * near.sum(1))
          & (n_left + n_right >= 4))
    # full sectors only: drop sectors cut by gaps/edges/beamstop (fewer pixels than typical)
    for k in torch.unique(ring_of):
        mk = ring_of == k
        typical = torch.quantile(n_tot[mk], 0.75)
        ok &= ~mk | (n_tot >= 0.7 * typical)
    if not bool(ok.any()):
        return _empty_points()
    ring_of, sec_of, c, s, cnt, s_chi, near = (v[ok] for v in (ring_of, sec_of, c, s, cnt, s_chi, near))
    chi_mean = (s_chi * near).sum(1) / (cnt * near).sum(1).clamp_min(1)
    nsr = nsec[ring_of]
    chi_pt = (sec_of.to(dt) + 0.5) / nsr * 2 * math.pi - math.pi + chi_mean
    tth_pt = tth_k[ring_of] + c * a_k[ring_of]
    q1, q2 = _invert(params, tth_pt, chi_pt)
    return (q1.cpu().numpy(), q2.cpu().numpy(), rings.index[ring_of.cpu().numpy()],
            s.cpu().numpy())


def _empty_points():
    e = np.zeros(0)
    return e, e, np.zeros(0, np.int64), e


def _invert(params: torch.Tensor, tth: torch.Tensor, chi: torch.Tensor):
    """Detector coordinates (m) of the ray (2θ, χ) in the geometry ``params`` (flat detector).

    Lab direction t̂ = (sin2θ sinχ, sin2θ cosχ, cos2θ) (pyFAI: χ = atan2(t1, t2)); the detector
    point is (p1 - poni1, p2 - poni2, dist) = λ Rᵀ t̂ with λ fixing the third component to dist.
    """
    dist, poni1, poni2, r1, r2, r3 = params.unbind(0)
    tv = torch.stack([torch.sin(tth) * torch.sin(chi), torch.sin(tth) * torch.cos(chi),
                      torch.cos(tth)], dim=0)
    v = rotation_matrix(r1, r2, r3).T @ tv
    lam = dist / v[2]
    return poni1 + lam * v[0], poni2 + lam * v[1]


# =========================================================================================
# 4. Least-squares refinement of the PONI parameters
# =========================================================================================
def refine_geometry(params: torch.Tensor, pos1: torch.Tensor, pos2: torch.Tensor,
                    tth_target: torch.Tensor, *, free=(True, True, True, True, True),
                    iterations: int = 100, tol: float = 1e-12) -> torch.Tensor:
    """Levenberg-Marquardt on r_j = 2θ(pos1_j, pos2_j; p) − 2θ_target_j (rad), float64.

    params: (6,) [dist, poni1, poni2, rot1, rot2, rot3] start; rot3 is never refined; ``free``
    selects which of the first five move. Marquardt scaling: (JᵀJ + λ diag JᵀJ) δ = −Jᵀr.
    Returns the refined (6,) parameters.
    """
    p = params.detach().clone().to(torch.float64)
    pos1, pos2, target = (v.to(torch.float64) for v in (pos1, pos2, tth_target))
    mask = torch.tensor(list(free) + [False], dtype=torch.bool, device=p.device)

    def resid(q):
        return tth_chi(q, pos1, pos2)[0] - target

    r = resid(p)
    cost = float((r * r).sum())
    lam = 1e-3
    for _ in range(iterations):
        jac = torch.func.jacfwd(resid)(p)[:, mask]
        a = jac.T @ jac
        g = jac.T @ r
        diag = torch.diagonal(a).clamp_min(1e-300)
        improved = False
        for _ in range(12):
            step = torch.linalg.solve(a + lam * torch.diag(diag), -g)
            trial = p.clone()
            trial[mask] += step
            r_t = resid(trial)
            cost_t = float((r_t * r_t).sum())
            if math.isfinite(cost_t) and cost_t <= cost:
                improved = True
                break
            lam *= 10.0
        if not improved:
            break
        rel = (cost - cost_t) / max(cost, 1e-300)
        p, r, cost = trial, r_t, cost_t
        lam = max(lam * 0.1, 1e-12)
        if rel < tol:
            break
    return p


def _refine_robust(params, pos1, pos2, target, free, rounds: int = 2):
    """:func:`refine_geometry`, then up to ``rounds`` re-fits without points whose residual
    exceeds 5 robust sigmas (1.4826 MAD). Returns (params, bool keep mask (N,) numpy)."""
    keep = np.ones(pos1.shape[0], dtype=bool)
    new = refine_geometry(params, pos1, pos2, target, free=free)
    for _ in range(rounds):
        res = (tth_chi(new, pos1, pos2)[0] - target).cpu().numpy()
        mad = 1.4826 * np.median(np.abs(res[keep] - np.median(res[keep]))) + 1e-15
        good = keep & (np.abs(res) < 5 * mad)
        if (good == keep).all():
            break
        keep = good
        sel = torch.as_tensor(keep, device=pos1.device)
        new = refine_geometry(new, pos1[sel], pos2[sel], target[sel], free=free)
    return new, keep


# =========================================================================================
# Driver
# =========================================================================================
def _ring_plan(params: np.ndarray, tth_all: np.ndarray, pixel: float, tth_lo: float, tth_hi: float,
               limit: float, window_old: float, window_new: float, used_max: float,
               sigma_px: float) -> _Rings:
    """Rings to extract: on the detector (tth_lo..tth_hi), below ``limit``, isolated."""
    dist = params[0]
    idx = np.flatnonzero(np.isfinite(tth_all) & (tth_all > tth_lo) & (tth_all < tth_hi)
                         & (tth_all <= limit) & (tth_all < np.deg2rad(80)))
    tt = tth_all[idx]
    a = pixel * np.cos(tt) ** 2 / dist                      # rad of 2θ per radial pixel
    win = np.where(tt <= used_max * (1 + 1e-9), window_old, window_new)
    half = (win + 5 * sigma_px) * a
    # isolation: the neighbouring rings (all calibrant rings) outside this ring's bin span
    others = np.sort(tth_all[np.isfinite(tth_all)])
    keep = []
    for n, (k, t0) in enumerate(zip(idx, tt)):
        d = np.abs(others - t0)
        d = d[d > 1e-12]
        keep.append(d.size == 0 or d.min() > half[n] + 3 * sigma_px * a[n])
    keep = np.asarray(keep, dtype=bool)
    idx, tt, a, win = idx[keep], tt[keep], a[keep], win[keep]
    radius_px = dist * np.tan(tt) / pixel
    sectors = np.clip(np.round(2 * np.pi * radius_px / 12.0), 8, 360).astype(np.int64)
    order = np.argsort(tt)
    return _Rings(idx[order], tt[order], a[order], win[order],
                  np.full(len(order), sigma_px), sectors[order])


def _start_params(dist: float, centre: tuple[float, float], slope: tuple[float, float], device) -> torch.Tensor:
    """(6,) PONI parameters: direct beam at ``centre`` (m), tilts from the slopes of
    :func:`center_tilt_sharpness` (1/m), rot3 = 0. To first order in pyFAI's rotations, a pixel
    Δ (m) from the PONI lies at dist + rot2 Δ1 − rot1 Δ2 along the beam: rot2 = u1 dist,
    rot1 = −u2 dist; the PONI is the direct beam minus the beam's offset from it (:func:`_invert`)."""
    p = torch.tensor([dist, 0.0, 0.0, -slope[1] * dist, slope[0] * dist, 0.0], dtype=torch.float64,
                     device=device)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    q1, q2 = _invert(p, zero, zero)
    p[1], p[2] = centre[0] - q1[0], centre[1] - q2[0]
    return p


def calibrate(frame: np.ndarray, *, detector: str, calibrant: str, wavelength: float,
              distance_guess: float, mask: np.ndarray | None = None,
              beam_center_guess: tuple[float, float] | None = None, device="cpu",
              max_iterations: int = 12, distance_span: tuple[float, float] = (0.5, 2.0)) -> CalibrationResult:
    """Calibrate the PONI geometry from one calibrant frame.

    frame: (rows, cols) raw counts; negative / non-finite pixels count as masked. detector:
    pyFAI detector name; calibrant: pyFAI calibrant name (``pyFAI.calibrant.CALIBRANT_FACTORY``);
    wavelength: m; distance_guess: sample-detector distance in m; the distance is searched from
    ``distance_span[0]`` to ``distance_span[1]`` times it (default 0.5-2: guesses from 50 % short
    to 100 % long are captured); mask: bool (rows, cols), True = masked (added to the detector's
    gap mask); beam_center_guess: (row, col) array-index units (pixel (i, j) centred at (i, j)),
    within about 10 px, or None to find it from the frame (Hough vote; the beam should hit the
    detector or fall near it). At least two rings must be visible: with one, the distance is
    ambiguous. Returns a :class:`CalibrationResult` (rot3 = 0).
    """
    t0 = time.perf_counter()
    if not (isinstance(wavelength, (int, float)) and 1e-12 < wavelength < 1e-8):
        raise ValueError(f"wavelength must be in m (1e-12..1e-8), got {wavelength!r}")
    if not (isinstance(distance_guess, (int, float)) and 1e-3 < distance_guess < 100):
        raise ValueError(f"distance_guess must be in m (0.001..100), got {distance_guess!r}")
    lo, hi = distance_span
    if not 0 < lo < 1 < hi:
        raise ValueError(f"distance_span must be factors (lo, hi), 0 < lo < 1 < hi, got {distance_span!r}")
    if max_iterations < 2:
        raise ValueError(f"max_iterations must be >= 2, got {max_iterations!r}")
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"frame must be 2D, got shape {frame.shape}")
    geo0 = Geometry(dist=float(distance_guess), poni1=0.0, poni2=0.0, wavelength=float(wavelength),
                    detector=detector)
    if tuple(frame.shape) != tuple(geo0.shape):
        raise ValueError(f"frame shape {frame.shape} does not match detector {detector!r} {geo0.shape}")
    _, tth_all = calibrant_tth(calibrant, wavelength)
    valid = np.isfinite(frame) & (frame >= 0)
    if np.issubdtype(frame.dtype, np.unsignedinteger):
        valid &= frame != np.iinfo(frame.dtype).max
    valid &= ~geo0.detector_mask()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != frame.shape:
            raise ValueError(f"mask shape {mask.shape} does not match frame {frame.shape}")
        valid &= ~mask
    if valid.sum() < 1000:
        raise ValueError("fewer than 1000 unmasked pixels")
    data = np.where(valid, frame, 0).astype(np.float64)
    a1, b1, a2, b2 = _affine(geo0)
    pixel = math.sqrt(abs(a1 * a2))

    # 1. direct-beam centre and tilt slopes
    if beam_center_guess is None:
        beam_center_guess = beam_center_hough(data, valid)
    row0, col0, u_row, u_col = center_tilt_sharpness(data, valid, beam_center_guess)
    centre = (a1 * row0 + b1, a2 * col0 + b2)               # m
    slope = (u_row / a1, u_col / a2)                          # 1/m
    r_idx, c_idx = np.nonzero(valid)
    p1 = a1 * r_idx + b1
    p2 = a2 * c_idx + b2
    vals = data[r_idx, c_idx]
    dev = torch.device(device)
    pos1 = torch.as_tensor(p1, dtype=torch.float64, device=dev)
    pos2 = torch.as_tensor(p2, dtype=torch.float64, device=dev)
    inten = torch.as_tensor(vals, dtype=torch.float64, device=dev)
    # 2. distance from the tilt-corrected radial profile
    d1, d2 = p1 - centre[0], p2 - centre[1]
    rho = np.hypot(d1, d2) / (1.0 + slope[0] * d1 + slope[1] * d2)
    dist = search_distance(vals, rho, tth_all, float(distance_guess), pixel, span=(lo, hi))
    params = _start_params(dist, centre, slope, dev)
    logger.debug("direct beam (%.2f, %.2f) px, tilt slopes (%.4f, %.4f) 1/m, distance %.5f m",
                 row0, col0, slope[0], slope[1], dist)

    # 3-4. extract and refine, growing the ring set
    used_max = 0.0
    window_old, window_new = 10.0, 10.0
    sigma_px = 1.5
    pts = _empty_points()
    rms_px = float("inf")
    it = 0
    first = None
    for it in range(1, max_iterations + 1):
        tth_px, chi_px = tth_chi(params, pos1, pos2)
        tth_lo, tth_hi = float(tth_px.min()), float(tth_px.max())
        finite = np.sort(tth_all[np.isfinite(tth_all) & (tth_all > tth_lo)])
        if finite.size == 0:
            raise ValueError(f"no {calibrant} ring falls on the detector at this distance/wavelength")
        if first is None:
            first = finite[0]
        limit = max(2.5 * first, 1.6 * used_max)
        rings = _ring_plan(params.cpu().numpy(), tth_all, pixel, tth_lo, tth_hi, limit, window_old,
                           window_new, used_max, sigma_px)
        if rings.index.size == 0:
            raise ValueError("no isolated calibrant ring found on the detector")
        q1, q2, ring, sig = _extract(params, tth_px, chi_px, inten, rings)
        if q1.size < 8:
            raise ValueError(f"ring finding failed: only {q1.size} control points found on {calibrant} "
                             f"rings {rings.index.tolist()} in cycle {it}, at distance {float(params[0]):.5g} m "
                             f"(searched {lo * distance_guess:.4g}..{hi * distance_guess:.4g} m) and beam "
                             f"centre ({row0:.1f}, {col0:.1f}) px")
        target = torch.as_tensor(tth_all[ring], dtype=torch.float64, device=dev)
        qq1 = torch.as_tensor(q1, dtype=torch.float64, device=dev)
        qq2 = torch.as_tensor(q2, dtype=torch.float64, device=dev)
        n_rings = np.unique(ring).size
        free = (True, True, True, n_rings >= 2, n_rings >= 2)
        new, good = _refine_robust(params, qq1, qq2, target, free)
        qq1, qq2, target = qq1[good], qq2[good], target[good]
        q1, q2, ring, sig = q1[good], q2[good], ring[good], sig[good]
        res = (tth_chi(new, qq1, qq2)[0] - target).cpu().numpy()
        a_pts = pixel * np.cos(tth_all[ring]) ** 2 / float(new[0])
        rms_px = float(np.sqrt(np.mean((res / a_pts) ** 2)))
        # largest move of a control point's predicted 2θ, in radial pixels
        moved = (tth_chi(new, qq1, qq2)[0] - tth_chi(params, qq1, qq2)[0]).cpu().numpy()
        shift_px = float(np.max(np.abs(moved / a_pts)))
        params = new
        pts = (q1, q2, ring, sig)
        complete = limit >= np.nanmax(tth_all[np.isfinite(tth_all)]) or limit >= tth_hi
        used_max = max(used_max, float(np.max(tth_all[ring])))
        sigma_px = float(np.clip(np.median(sig), 0.3, 5.0))
        window_old = float(np.clip(3.0 + 5.0 * rms_px + 2.0 * shift_px, 3.0, 10.0))
        window_new = float(np.clip(3.0 + 10.0 * rms_px + 4.0 * shift_px, 4.0, 10.0))
        logger.debug("cycle %d: rings %s, %d points, rms %.4f px, moved %.4f px, windows %.1f/%.1f px, "
                     "sigma %.2f px, %.2f s", it, rings.index.tolist(), q1.size, rms_px, shift_px,
                     window_old, window_new, sigma_px, time.perf_counter() - t0)
        if complete and shift_px < 0.01 and it >= 3:
            break
    q1, q2, ring, _ = pts
    geometry = geo0.with_params(params.cpu().numpy())
    rows = (q1 - b1) / a1
    cols = (q2 - b2) / a2
    ring_points = np.stack([rows, cols, ring.astype(np.float64)], axis=1)
    res = (tth_chi(params, torch.as_tensor(q1, device=dev), torch.as_tensor(q2, device=dev))[0]
           - torch.as_tensor(tth_all[ring], device=dev)).cpu().numpy()
    return CalibrationResult(geometry=geometry, rings_used=int(np.unique(ring).size),
                             rms_residual_deg=float(np.degrees(np.sqrt(np.mean(res ** 2)))),
                             n_points=int(q1.size), iterations=it,
                             seconds=time.perf_counter() - t0, ring_points=ring_points)
