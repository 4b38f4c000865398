"""Azimuthal integration as sparse (CSR) matrix products, batched over frames, pyFAI-compatible.

Three layers, as in pyFAI (``engines/preproc.py``, ``engines/CSR_engine.py``):

1. **Matrix build** (numpy, once per geometry/mask/binning): pixel positions come from pyFAI
   (``ai.array_from_unit`` centres, deltas and corners); the splitting rules reproduce pyFAI's
   Cython builders so that bins and coefficients agree:
   ``no``/``bbox`` as ``ext/splitBBox_common.pyx`` (pixel = centre ± largest centre-to-corner
   distance, weight ∝ overlap, bins by C truncation), ``full`` as ``ext/splitpixel_common.pyx``
   (1D: exact area of the pixel quadrilateral in the (radial, χ) plane per radial bin; 2D:
   pyFAI's column-wise area scheme on corners clipped to the range).
   Bin centres: ``linspace(min + δ/2, max - δ/2, n)`` with ``max = maxin·(1+ε32)`` (pyFAI's
   ``calc_upper_bound``), ``min``/``maxin`` over unmasked pixels including their extent.
2. **Preprocessing** (torch, per batch): signal = raw − dark; variance (Poisson, pyFAI 2022
   model) = max(raw, 1); norm = flat·Ω·P; invalid pixels (mask, NaN, dummy) zeroed. As in
   pyFAI's Cython CSR engine (``ext/preproc.pyx``, no dark variance given) the dark adds no
   variance; pyFAI's pure-Python ``preproc`` would add it (max(raw, 1) + dark).
3. **Engine** (per batch; torch CSR on CUDA, scipy CSC on CPU): S = C·signal, N = C·norm,
   V = C²·variance, then I = S / N and σ = √V / N (standard error of the mean), divided last.

Units: radial ``q_nm^-1`` (1/nm), ``q_A^-1`` (1/Å), ``2th_deg`` (deg); χ in deg for cakes.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.sparse
import torch

from .geometry import Geometry

logger = logging.getLogger(__name__)

Unit = Literal["q_nm^-1", "q_A^-1", "2th_deg"]
Method = Literal["no", "bbox", "full"]
_EPS32 = 1.0 + float(np.finfo(np.float32).eps)
_TWO_PI = 2.0 * np.pi
_PI32 = float(np.float32(np.pi))

__all__ = ["Unit", "Method", "IntegrationResult", "Integration2DResult", "Integrator1D",
           "Integrator2D", "build_integrator_1d", "build_integrator_2d", "preprocess",
           "integrate_reference", "bin_correlation"]


# =========================================================================================
# Results
# =========================================================================================
@dataclass
class IntegrationResult:
    radial: torch.Tensor      # (N,) bin centres in the unit
    intensity: torch.Tensor   # (B, N) corrected mean intensity per bin (pyFAI's I)
    sigma: torch.Tensor       # (B, N) standard error of the mean (pyFAI 2022 Poisson model)
    unit: str


@dataclass
class Integration2DResult:
    radial: torch.Tensor      # (Nr,) radial bin centres in the unit
    azimuthal: torch.Tensor   # (Na,) χ bin centres in deg
    intensity: torch.Tensor   # (B, Na, Nr) as pyFAI's integrate2d (azimuth first)
    sigma: torch.Tensor       # (B, Na, Nr)
    unit: str


# =========================================================================================
# 1. Matrix build (numpy)
# =========================================================================================
def _upper_bound(x: float) -> float:
    """pyFAI ``calc_upper_bound``: smallest float32-step above the maximum."""
    return x * _EPS32 if x > 0 else x / _EPS32


def _bounds(lo: np.ndarray, hi: np.ndarray, rng, positive: bool, clip_pi: bool):
    """(min, maxin) of a binned coordinate over pixels, pyFAI ``calc_boundaries`` rules."""
    vmin, vmax = (float(lo.min()), float(hi.max())) if lo.size else (0.0, 1.0)
    if positive:
        vmin, vmax = max(0.0, vmin), max(0.0, vmax)
    if clip_pi:  # pyFAI clips χ with a float32 π
        vmin, vmax = max(vmin, -_PI32), min(vmax, _PI32)
    if rng is not None:
        vmin, vmax = float(min(rng)), float(max(rng))
    return vmin, vmax


def _centres(vmin: float, vmaxin: float, n: int):
    vmax = _upper_bound(vmaxin)
    delta = (vmax - vmin) / n
    return delta, np.linspace(vmin + 0.5 * delta, vmax - 0.5 * delta, n)


def _expand(counts: np.ndarray):
    """Per-entry owner index and offset for ragged per-pixel lists of the given lengths."""
    owner = np.repeat(np.arange(counts.size), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(owner.size) - starts[owner]


def _bbox_split(fmin: np.ndarray, fmax: np.ndarray, bins: int):
    """Bounding-box split along one axis (pyFAI ``calc_lut_1d``), positions in bin units.

    Returns (keep (P,) bool, owner (E,), bin (E,), weight (E,)) for kept pixels' entries;
    bins of a pixel run from trunc(fmin) to trunc(fmax) clipped to the range, the edge bins
    absorbing any overflow, so that the weights of a kept pixel sum to 1.
    """
    bmin = np.trunc(fmin).astype(np.int64)  # C cast: truncation toward zero
    bmax = np.trunc(fmax).astype(np.int64)
    keep = ~((bmax < 0) | (bmin >= bins))
    bmin = np.maximum(bmin[keep], 0)
    bmax = np.minimum(bmax[keep], bins - 1)
    fmin, fmax = fmin[keep], fmax[keep]
    n = bmax - bmin + 1
    owner, off = _expand(n)
    with np.errstate(divide="ignore"):
        inv = np.where(n > 1, 1.0 / np.where(n > 1, fmax - fmin, 1.0), 1.0)
    w = inv[owner]
    first, last = off == 0, off == n[owner] - 1
    w = np.where(first, inv[owner] * (bmin[owner] + 1 - fmin[owner]), w)
    w = np.where(last, inv[owner] * (fmax[owner] - bmax[owner]), w)
    w = np.where(n[owner] == 1, 1.0, w)
    return keep, owner, bmin[owner] + off, w


def _recenter_chi(r: np.ndarray, chi: np.ndarray, orientation: int) -> np.ndarray:
    """χ corners (P, 4) of pixels crossing the ±π cut moved to one side (pyFAI ``_recenter``).

    pyFAI flags such pixels by the sign of its approximate algebraic area ``area4p`` (formula
    kept as written there), flipped for orientations 2 and 4 which mirror one axis.
    """
    a0, b0, c0, d0 = r.T
    a1, b1, c1, d1 = chi.T
    sign = -1.0 if int(orientation) in (2, 4) else 1.0
    area = sign * (0.5 * ((c0 - a0) * (d1 - b1)) - ((c1 - a1) * (d0 - b0)))
    cross = area > 0
    chi = chi.copy()
    if cross.any():
        c = chi[cross]
        c = np.where(c < 0, c + _TWO_PI, c)
        c = np.where(c.mean(axis=1, keepdims=True) > np.pi, c - _TWO_PI, c)
        chi[cross] = c
    return chi


def _column_areas(x: np.ndarray, y: np.ndarray, owner: np.ndarray, col: np.ndarray):
    """Signed area of each quadrilateral (x, y: (P, 4) corners) within x ∈ [col, col+1].

    Exact: Σ over the 4 edges of ∫ y dx restricted to the column (trapezoids).
    """
    area = np.zeros(owner.size)
    for e in range(4):
        x0, y0 = x[owner, e], y[owner, e]
        x1, y1 = x[owner, (e + 1) % 4], y[owner, (e + 1) % 4]
        dx = x1 - x0
        slope = np.divide(y1 - y0, dx, out=np.zeros_like(dx), where=dx != 0)
        lo = np.clip(x0, col, col + 1.0)
        hi = np.clip(x1, col, col + 1.0)
        area += (hi - lo) * (y0 + slope * (0.5 * (lo + hi) - x0))
    return area


def _cell_areas(x: np.ndarray, y: np.ndarray, w0: int, w1: int) -> np.ndarray:
    """pyFAI ``_integrate2d`` area of quads (P, 4) over a (w0, w1) grid of unit cells.

    For each edge and column the signed area under the segment is spread over the rows from
    the bottom as a rectangle of the segment's mean height (pyFAI's scheme, exact for
    horizontal edges). x, y are already offset so that cells start at 0.
    """
    box = np.zeros((x.shape[0], w0, w1))
    h = np.arange(w1)
    for e in range(4):
        x0, y0 = x[:, e:e + 1], y[:, e:e + 1]
        x1, y1 = x[:, (e + 1) % 4:(e + 1) % 4 + 1], y[:, (e + 1) % 4:(e + 1) % 4 + 1]
        dx = x1 - x0
        slope = np.divide(y1 - y0, dx, out=np.zeros_like(dx), where=dx != 0)
        for i in range(w0):
            lo, hi = np.clip(x0, i, i + 1.0), np.clip(x1, i, i + 1.0)
            width = hi - lo
            seg = width * (y0 + slope * (0.5 * (lo + hi) - x0))       # (P, 1)
            aw = np.abs(width)
            height = np.divide(np.abs(seg), aw, out=np.zeros_like(aw), where=aw > 0)
            box[:, i, :] += np.sign(seg) * aw * np.clip(height - h, 0.0, 1.0)
    return box


@dataclass
class _Plan:
    """Everything a CSR build depends on."""

    geometry: Geometry
    npt: tuple[int, ...]          # (npt,) or (npt_rad, npt_azim)
    unit: str
    method: str
    radial_range: tuple | None    # internal (unscaled) units
    azimuth_range: tuple | None   # rad
    mask: np.ndarray              # bool (H, W), True = excluded



def _build_csr(plan: _Plan):
    """Build (csr scipy matrix (bins, H·W) float64, radial centres, azimuthal centres|None)."""
    import pyFAI.units

    ai = plan.geometry.to_pyfai()
    shape = plan.geometry.shape
    unit = pyFAI.units.to_unit(plan.unit)
    valid = ~plan.mask.ravel()
    pix = np.flatnonzero(valid)
    two_d = len(plan.npt) == 2
    nr = plan.npt[0]
    chi_c = chi_d = None

    if plan.method == "full":
        corners = np.asarray(ai.array_from_unit(shape, "corner", unit, scale=False), np.float64)
        corners = corners.reshape(-1, 4, 2)[pix]
        r, chi = corners[..., 0], corners[..., 1]
        rmin, rmaxin = _bounds(r.min(1), r.max(1), plan.radial_range, unit.positive, False)
        dr, rad_c = _centres(rmin, rmaxin, nr)
        if two_d:
            amin, amaxin = _bounds(chi.min(1), chi.max(1), plan.azimuth_range, False, True)
            chi = _recenter_chi(r, chi, plan.geometry.orientation)
            da, azi_c = _centres(amin, amaxin, plan.npt[1])
            rows, cols, w = _full_2d(r, chi, rmin, rmaxin, dr, amin, amaxin, da, plan.npt)
        else:
            azi_c = None
            rows, cols, w = _full_1d(r, _recenter_chi(r, chi, plan.geometry.orientation), rmin, dr, nr, plan.azimuth_range)
    else:
        rc = np.asarray(ai.array_from_unit(shape, "center", unit, scale=False), np.float64).ravel()[pix]
        rd = (np.zeros_like(rc) if plan.method == "no" else
              np.asarray(ai.array_from_unit(shape, "delta", unit, scale=False), np.float64).ravel()[pix])
        if two_d or plan.azimuth_range is not None:
            chi_unit = pyFAI.units.to_unit("chi_rad")
            chi_c = np.asarray(ai.array_from_unit(shape, "center", chi_unit, scale=False), np.float64).ravel()[pix]
            chi_d = (np.zeros_like(chi_c) if plan.method == "no" else
                     np.asarray(ai.array_from_unit(shape, "delta", chi_unit, scale=False), np.float64).ravel()[pix])
        rmin, rmaxin = _bounds(rc - rd, rc + rd, plan.radial_range, unit.positive, False)
        dr, rad_c = _centres(rmin, rmaxin, nr)
        keep0, own0, bin0, w0 = _bbox_split((rc - rd - rmin) / dr, (rc + rd - rmin) / dr, nr)
        idx0 = np.flatnonzero(keep0)
        if not two_d:
            azi_c = None
            sel = np.ones(own0.size, bool)
            if plan.azimuth_range is not None:   # whole pixel kept if its box overlaps the sector
                amin, amaxin = min(plan.azimuth_range), max(plan.azimuth_range)
                sel = ~((chi_c + chi_d < amin) | (chi_c - chi_d > amaxin))[idx0][own0]
            rows, cols, w = bin0[sel], idx0[own0][sel], w0[sel]
        else:
            amin, amaxin = _bounds(chi_c - chi_d, chi_c + chi_d, plan.azimuth_range, False, True)
            da, azi_c = _centres(amin, amaxin, plan.npt[1])
            keep1, own1, bin1, w1 = _bbox_split((chi_c - chi_d - amin) / da,
                                                (chi_c + chi_d - amin) / da, plan.npt[1])
            rows, cols, w = _outer_2d(keep0, own0, bin0, w0, keep1, own1, bin1, w1, plan.npt[1])
    nbins = int(np.prod(plan.npt))
    mat = scipy.sparse.csr_matrix((w, (rows, pix[cols])), shape=(nbins, valid.size))
    mat.sum_duplicates()
    mat.eliminate_zeros()
    mat.sort_indices()
    rad_c = rad_c * unit.scale
    if azi_c is not None:
        azi_c = np.rad2deg(azi_c)
    return mat, rad_c, azi_c


def _outer_2d(keep0, own0, bin0, w0, keep1, own1, bin1, w1, nazim):
    """Per-pixel outer product of the radial and azimuthal 1D bbox splits."""
    keep = keep0 & keep1
    pix = np.flatnonzero(keep)
    # map kept pixels to their entry ranges in each split
    def ranges(keepd, own):
        local = np.cumsum(keepd) - 1                       # index among kept-in-this-dim pixels
        counts = np.bincount(own, minlength=int(keepd.sum()))
        starts = np.cumsum(counts) - counts
        return starts[local[pix]], counts[local[pix]]
    s0, n0 = ranges(keep0, own0)
    s1, n1 = ranges(keep1, own1)
    owner, off = _expand(n0 * n1)
    e0 = s0[owner] + off // n1[owner]
    e1 = s1[owner] + off % n1[owner]
    return bin0[e0] * nazim + bin1[e1], pix[owner], w0[e0] * w1[e1]


def _full_1d(r, chi, rmin, dr, bins, azimuth_range):
    """Full split in 1D (pyFAI ``FullSplitIntegrator.calc_lut_1d``)."""
    x = (r - rmin) / dr
    xmin, xmax = x.min(1), x.max(1)
    keep = ~((xmax < 0) | (xmin >= bins))
    if azimuth_range is not None:
        amin, amaxin = min(azimuth_range), max(azimuth_range)
        keep &= ~((chi.max(1) < amin) | (chi.min(1) > amaxin))
    idx = np.flatnonzero(keep)
    x, y = x[idx], chi[idx] - chi[idx].mean(1, keepdims=True)
    bmin, bmax = np.floor(x.min(1)).astype(np.int64), np.floor(x.max(1)).astype(np.int64)
    single = bmin == bmax
    lo, hi = np.maximum(bmin, 0), np.minimum(bmax + 1, bins)   # split pixels: [lo, hi)
    n = np.where(single, 1, hi - lo)
    owner, off = _expand(n)
    col = np.where(single[owner], bmin[owner], lo[owner] + off)
    area = _column_areas(x, y, owner, col.astype(np.float64))
    total = np.bincount(owner, weights=area, minlength=idx.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(single[owner], 1.0, area / total[owner])
    ok = np.isfinite(w)
    return col[ok], idx[owner][ok], w[ok]


def _full_2d(r, chi, rmin, rmaxin, dr, amin, amaxin, da, npt):
    """Full split in 2D (pyFAI ``FullSplitIntegrator.calc_lut_2d``), grouped by box size."""
    bins0, bins1 = npt
    amax = _upper_bound(amaxin)
    keep = ~((r.max(1) < rmin) | (r.min(1) > rmaxin) | (chi.max(1) < amin) | (chi.min(1) >= amax))
    idx = np.flatnonzero(keep)
    x = (np.clip(r[idx], rmin, rmaxin) - rmin) / dr
    y = (np.clip(chi[idx], amin, amaxin) - amin) / da
    off0, off1 = np.floor(x.min(1)), np.floor(y.min(1))
    wd0 = (np.ceil(x.max(1)) - off0).astype(np.int64)
    wd1 = (np.ceil(y.max(1)) - off1).astype(np.int64)
    x, y = x - off0[:, None], y - off1[:, None]
    rows, cols, ws = [], [], []
    for a, b in sorted(set(zip(wd0.tolist(), wd1.tolist()))):
        if a == 0 or b == 0:
            continue
        g = np.flatnonzero((wd0 == a) & (wd1 == b))
        box = _cell_areas(x[g], y[g], a, b).reshape(g.size, -1)
        total = box.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            box = box / total
        ii, jj = np.divmod(np.arange(a * b), b)
        rows.append(((off0[g, None] + ii) * bins1 + off1[g, None] + jj).astype(np.int64).ravel())
        cols.append(np.repeat(idx[g], a * b))
        ws.append(box.ravel())
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    rows, cols, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(ws)
    ok = np.isfinite(w) & (w != 0)
    return rows[ok], cols[ok], w[ok]


# =========================================================================================
# 2. Preprocessing (torch, batched)
# =========================================================================================
def _dummy_for(dtype, dummy, delta_dummy, detector_dummy):
    """pyFAI's dummy for a frame dtype: the detector's is cast through that dtype (so -2
    reads 2**32-2 for uint32 frames); user values are float32. Returns (dummy, delta)|None."""
    if dummy is not None:
        return float(np.float32(dummy)), float(np.float32(delta_dummy or 0.0))
    if detector_dummy is None:
        return None
    value, delta = detector_dummy
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype)
    value = float(np.float32(np_dtype.type(np.int64(value))))
    return value, float(np.float32(np.finfo(np.float32).eps if delta is None else delta))


class _Workspace:
    """(P, B) buffers for one batch: contiguous views of an `_Arena` (see there)."""

    def __init__(self, arena: "_Arena", batch: int):
        n = arena.npix * batch
        self.raw = arena.raw[:n].view(arena.npix, batch)
        self.x = arena.x[:2 * n].view(arena.npix, 2 * batch)   # [signal | norm]
        self.var = arena.var[:n].view(arena.npix, batch)
        self.valid = arena.valid[:n].view(arena.npix, batch)
        self.tmp = arena.tmp[:n].view(arena.npix, batch)


class _Arena:
    """Flat buffers for up to `capacity` frames of `npix` pixels, reused across calls and batch
    sizes: a (P, B) workspace is a contiguous view of the first P·B elements. Fresh 1 Mpx
    allocations cost more in page faults than the arithmetic (measured 8 ms vs 1.2 ms per op per
    frame on 2 CPU cores); one set of buffers per batch size made a stream whose batch sizes
    vary (the dispatcher's load-sized batches) 3.6x slower per frame (42 vs 12 ms, Eiger 1M)."""

    def __init__(self, npix: int, capacity: int, device, dtype):
        self.npix, self.capacity = npix, capacity
        n = npix * capacity
        self.raw = torch.empty(n, device=device, dtype=dtype)
        self.x = torch.empty(2 * n, device=device, dtype=dtype)
        self.var = torch.empty(n, device=device, dtype=dtype)
        self.valid = torch.empty(n, device=device, dtype=torch.bool)
        self.tmp = torch.empty(n, device=device, dtype=torch.bool)


def _no_invalid_pixel(r: torch.Tensor, dummy: tuple[float, float] | None,
                      spare: torch.Tensor, ref: int) -> bool:
    """CPU: True when no pixel with matrix entries is NaN or a dummy, by one min/max pass.

    r: (P, B) or (P,) frames, overwritten on the ``spare`` pixels (masked and without matrix
    entries: no sum reads them, ``corrected`` blanks them) by pixel ``ref`` (one with entries),
    so that min/max are over the pixels that count. Sufficient test: all of them lie on one
    side of the dummy interval [dummy − δ, dummy + δ]; NaN makes min/max NaN and the test
    fail. False means: use the exact per-pixel masks (``preprocess``), which give the same sums
    when it is True.
    """
    if spare.numel():
        r[spare] = r[ref].clone()
    lo, hi = (float(v) for v in torch.aminmax(r))
    if dummy is None:
        return lo == lo
    value, delta = dummy
    return lo > value + delta or hi < value - delta


def preprocess(raw: torch.Tensor, *, norm: torch.Tensor, dark: torch.Tensor | None,
               dummy: tuple[float, float] | None, ws: _Workspace, check_nan: bool,
               masked: torch.Tensor | None = None, spare: tuple[torch.Tensor, int] | None = None):
    """Signal, Poisson variance and normalisation per pixel (pyFAI ``engines/preproc.py``).

    raw: (P, B) counts; norm: (P, 1) flat·Ω·P (0 on masked pixels); dark: (P, 1) or None.
    Writes into ``ws``: signal = raw − dark (``ws.x[:, :B]``), variance = max(raw, 1)
    (``ws.var``, pyFAI Cython), and if any pixel is invalid (NaN, dummy ± delta) the valid
    mask ``ws.valid`` with invalid pixels zeroed everywhere. Returns (signal, variance, valid|None);
    valid None means all pixels valid (then Σ c·norm is the static one). ``masked``: (P, 1) bool,
    pixels masked statically (no matrix entries, norm 0); their dummies (detector gaps read -1
    or 2³²−1 in every frame) are ignored, so frames with gaps still take the fast path.
    ``spare``: (index of masked pixels without matrix entries, a pixel with entries); on CPU a
    batch whose counted pixels are all valid is then recognised by one min/max pass
    (`_no_invalid_pixel`, cheaper than the per-pixel path) and its signal is ``raw``
    itself when there is no dark (no copy).
    """
    b = raw.shape[1]
    # B = 1: work on 1-D views; TensorIterator is ~8x slower on (P, 1) than on (P,) on CPU
    view = (lambda t: t[:, 0]) if b == 1 else (lambda t: t)
    r, nrm = view(raw), view(norm)
    dk = None if dark is None else view(dark)
    valid = None
    if (dummy is not None or check_nan) and spare is not None and r.device.type == "cpu" \
            and _no_invalid_pixel(r, dummy, *spare):
        dummy, check_nan = None, False
    if dummy is not None:
        value, delta = dummy
        if delta > 0:   # |raw - dummy| > delta, NaN compares False
            valid = torch.lt(r, value - delta, out=view(ws.valid))
            valid |= torch.gt(r, value + delta, out=view(ws.tmp))
        else:
            valid = torch.ne(r, value, out=view(ws.valid))
            if check_nan:
                valid &= torch.eq(r, r, out=view(ws.tmp))
    elif check_nan:
        valid = torch.eq(r, r, out=view(ws.valid))
    if valid is not None and r.device.type == "cpu":
        # CPU only: a cheap check that skips the Σ c·norm product (no sync on GPU)
        if masked is not None:
            valid |= view(masked)
        if bool(valid.all()):
            valid = None
    signal = ws.x[:, :b]
    if dk is not None:
        torch.sub(r, dk, out=view(signal))
    elif valid is None:
        signal = raw
    else:
        view(signal).copy_(r)
    variance = ws.var
    torch.clamp(r, min=1.0, out=view(variance))
    if valid is not None:
        invalid = torch.logical_not(valid, out=view(ws.tmp))
        view(signal).masked_fill_(invalid, 0.0)
        view(variance).masked_fill_(invalid, 0.0)
        torch.mul(nrm, valid, out=view(ws.x[:, b:2 * b]))
        valid = ws.valid
    return signal, variance, valid


# =========================================================================================
# 3. Sparse engine (torch CSR on CUDA, scipy CSC on CPU)
# =========================================================================================
def _to_torch_csr(mat: scipy.sparse.csr_matrix, device, dtype) -> torch.Tensor:
    with warnings.catch_warnings():   # "sparse CSR support is in beta" / invariant checks
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.as_tensor(mat.indptr, dtype=torch.int64),
                                       torch.as_tensor(mat.indices, dtype=torch.int64),
                                       torch.as_tensor(mat.data, dtype=dtype),
                                       size=mat.shape, check_invariants=False).to(device)


class CsrEngine:
    """Thin sparse-product engine: Σ c·signal, Σ c²·variance and Σ c·norm per bin.

    ``mat``: (bins, P) coefficients c, applied to (P, B) columns (one column per frame, batch
    stacked along columns). CUDA: ``torch.sparse.mm`` with CSR. CPU: scipy's CSC product, which
    walks the pixels in order, reads each frame row once (streaming) and scatters into the
    (bins, B) output that stays in cache; the CSR product walks the bins and gathers frame rows
    from all over the (P, B) buffer. Same sums in the same order (bit-identical), about 3x
    faster on CPU (benchmarks/RESULTS.md), and scipy releases the GIL. Σ c·norm uses the static
    normalisation unless some pixel of the batch is invalid.
    """

    def __init__(self, mat: scipy.sparse.csr_matrix, norm: np.ndarray, device, dtype):
        mat = mat.astype(np.float64)
        self.nbins, self.npix = mat.shape
        sq = mat.multiply(mat).tocsr()
        self.on_cpu = torch.device(device).type == "cpu"
        if self.on_cpu:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self.c, self.c2 = mat.tocsc().astype(np_dtype), sq.tocsc().astype(np_dtype)
        else:
            self.c, self.c2 = _to_torch_csr(mat, device, dtype), _to_torch_csr(sq, device, dtype)
        self.norm_sum = torch.as_tensor(mat @ norm, dtype=dtype).to(device)     # (bins,)

    def _product(self, m, cols: torch.Tensor) -> torch.Tensor:
        """m (bins, P) @ cols (P, B) -> (bins, B)."""
        if self.on_cpu:
            return torch.from_numpy(m @ cols.numpy())
        return torch.sparse.mm(m, cols)

    def __call__(self, ws: _Workspace, signal, variance, valid):
        """signal/variance (P, B) (ws views) -> Σ c·signal, Σ c²·variance, Σ c·norm, (B, bins)."""
        b = signal.shape[1]
        cols = ws.x[:, :2 * b] if valid is not None else signal
        out = self._product(self.c, cols).T
        s = out[:b]
        n = out[b:] if valid is not None else self.norm_sum.expand(b, -1)
        v = self._product(self.c2, variance).T
        return s, v, n


def bin_correlation(mat: scipy.sparse.spmatrix, norm: np.ndarray) -> np.ndarray:
    """Variance inflation F (bins,) of smooth functionals of the bin means, from shared pixels.

    With pixel splitting a pixel feeds several neighbouring bins, so bin means are positively
    correlated, and a fit that takes them as independent (weights 1/σ²) understates the
    variance of anything smooth over several bins (a peak's centre, width, area) by F. For
    Ī_r = Σ_i c_ri s_i / D_r, D_r = Σ_i c_ri n_i (n = flat·Ω·P, the static normalisation),
    independent pixels of variance σ_i², and a slowly varying weight a_r:

        Var(Σ_r a_r Ī_r) = Σ_i σ_i² (Σ_r a_r c_ri / D_r)²  ≈  Σ_r a_r² F_r Var(Ī_r),
        F_r = D_r Σ_i c_ri u_i σ_i² / Σ_i c_ri² σ_i²,   u_i = Σ_s c_si / D_s,

    against Σ_r a_r² Var(Ī_r) with Var(Ī_r) = Σ_i c_ri² σ_i² / D_r² (the per-bin σ, right bin
    by bin). Evaluated for Poisson counts of a locally flat intensity, σ_i² ∝ n_i (exact up to
    the intensity's variation within one pixel's reach). Without splitting, or a matrix whose
    rows share no pixel and weigh their own pixels equally, F = 1; a pixel spread evenly over
    w bins gives F ≈ w (pyFAI's error model, PHYSICS.md, is the per-bin σ; the covariance
    between bins is what it leaves out). Empty bins: NaN.
    """
    c = scipy.sparse.csr_matrix(mat, dtype=np.float64)
    n = np.asarray(norm, np.float64).ravel()
    d = c @ n                                                   # D_r
    inv_d = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    u = c.T @ inv_d                                             # u_i = Σ_s c_si / D_s
    num = d * (c @ (u * n))
    den = c.multiply(c) @ n
    out = np.full(d.shape, np.nan)
    ok = (d > 0) & (den > 0)
    out[ok] = num[ok] / den[ok]
    return out


def _finish(s, v, n, empty: float):
    """I = S / N, σ = √V / N; empty bins (N = 0) get ``empty``."""
    ok = n != 0
    safe = torch.where(ok, n, torch.ones_like(n))
    fill = torch.full_like(n, empty)
    return torch.where(ok, s / safe, fill), torch.where(ok, torch.sqrt(v) / safe, fill)


# =========================================================================================
# Integrators
# =========================================================================================
def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_batch(frames, shape) -> torch.Tensor:
    """(H, W) or (B, H, W) numpy/torch, any numeric dtype -> (B, H·W) tensor (dtype kept)."""
    if isinstance(frames, np.ndarray):
        if frames.dtype.byteorder not in ("=", "|") or frames.dtype.kind not in "fiub":
            frames = frames.astype(frames.dtype.newbyteorder("=") if frames.dtype.kind in "fiu"
                                   else np.float32)
        with warnings.catch_warnings():   # read-only arrays (memmaps, msgpack): only read here
            warnings.simplefilter("ignore", UserWarning)
            frames = torch.from_numpy(np.ascontiguousarray(frames))
    elif not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or tuple(frames.shape[1:]) != tuple(shape):
        raise ValueError(f"frames must be (H, W) or (B, H, W) with (H, W) = {tuple(shape)}, "
                         f"got {tuple(frames.shape)}")
    return frames.reshape(frames.shape[0], -1)


class _Integrator:
    """Shared state: CSR engine, static normalisation, dark, dummies, workspaces."""

    def __init__(self, plan: _Plan, mat, norm, dark, dummy, delta_dummy, detector_dummy,
                 device, dtype, empty=0.0):
        self.geometry, self.unit, self.method = plan.geometry, plan.unit, plan.method
        self.shape = plan.geometry.shape
        self.device, self.dtype, self.empty = device, dtype, float(empty)
        self.matrix = mat                              # scipy CSR (bins, P), float64
        self.engine = CsrEngine(mat, norm, device, dtype)
        self.correlation = bin_correlation(mat, norm)  # (bins,) F of the bins' shared pixels, NaN: empty
        self.norm = torch.as_tensor(norm, dtype=dtype).to(device).reshape(-1, 1)      # (P, 1)
        self.masked = self.norm == 0                                                    # (P, 1) bool
        # pixels no sum reads and `corrected` blanks: masked and without matrix entries
        counted = np.bincount(mat.indices, minlength=mat.shape[1]) > 0
        spare = np.flatnonzero(~counted & (np.asarray(norm).ravel() == 0))
        self.spare = (torch.as_tensor(spare).to(device), int(np.argmax(counted)))
        self.dark = None if dark is None else torch.as_tensor(dark, dtype=dtype).to(device).reshape(-1, 1)
        self._dummy = (dummy, delta_dummy, detector_dummy)
        self._arena: _Arena | None = None
        self._ws: dict[int, _Workspace] = {}

    def dummy_for(self, src_dtype):
        """(dummy, delta_dummy) used for frames of this dtype, or None."""
        return _dummy_for(src_dtype, *self._dummy)

    def _workspace(self, batch):
        if self._arena is None or self._arena.capacity < batch:     # grow by doubling, once per size class
            capacity = max(batch, 2 * self._arena.capacity if self._arena else batch)
            self._arena, self._ws = None, {}
            self._arena = _Arena(self.engine.npix, capacity, self.device, self.dtype)
        ws = self._ws.get(batch)
        if ws is None:
            ws = self._ws[batch] = _Workspace(self._arena, batch)
        return ws

    def _preprocessed(self, frames):
        """frames (H, W) or (B, H, W) -> (ws, signal, variance, valid|None), see `preprocess`."""
        frames = _as_batch(frames, self.shape)
        ws = self._workspace(frames.shape[0])
        if frames.shape[0] == 1:                      # host->device, dtype cast, transpose
            ws.raw[:, 0].copy_(frames[0], non_blocking=True)
        else:
            ws.raw.copy_(frames.T, non_blocking=True)
        check_nan = frames.dtype.is_floating_point
        sig, var, valid = preprocess(ws.raw, norm=self.norm, dark=self.dark,
                                     dummy=self.dummy_for(frames.dtype), ws=ws, check_nan=check_nan,
                                     masked=self.masked, spare=self.spare)
        return ws, sig, var, valid

    def _sums(self, frames):
        ws, sig, var, valid = self._preprocessed(frames)
        return self.engine(ws, sig, var, valid)

    def corrected(self, frames, *, binning: int = 1) -> torch.Tensor:
        """Corrected 2D frames, the per-pixel quantity the integrator averages.

        frames (H, W) or (B, H, W) counts -> (B, H', W') tensor in the integrator's dtype and
        device: (raw − dark) / (flat·Ω·P), with the integrator's own preprocessing (same
        dark, normalisation flat·solid angle·polarization, mask, dummy and NaN rules); masked
        or invalid pixels are NaN. ``binning`` f >= 1 block-averages f x f pixels with a
        NaN-ignoring mean (edge blocks partial; all-NaN blocks NaN): H' = ceil(H / f),
        W' = ceil(W / f).
        """
        if not isinstance(binning, (int, np.integer)) or isinstance(binning, bool) or binning < 1:
            raise ValueError(f"binning must be an int >= 1, got {binning!r}")
        ws, sig, _, valid = self._preprocessed(frames)
        ok = self.norm != 0                                       # (P, 1): mask, zero flat
        if valid is not None:
            ok = ok & valid                                       # (P, B): dummies, NaN
        img = torch.where(ok, sig / torch.where(ok, self.norm, torch.ones_like(self.norm)),
                          torch.full_like(sig, float("nan")))
        h, w = self.shape
        img = img.T.reshape(-1, h, w)
        f = int(binning)
        if f == 1:
            return img.contiguous()
        hp, wp = -(-h // f) * f, -(-w // f) * f
        img = torch.nn.functional.pad(img, (0, wp - w, 0, hp - h), value=float("nan"))
        return torch.nanmean(img.reshape(-1, hp // f, f, wp // f, f), dim=(2, 4))

    def _intensity(self, frames, normalization):
        s, v, n = self._sums(frames)
        if normalization is not None:   # per-frame monitor, pyFAI's normalization_factor
            k = torch.as_tensor(normalization, dtype=self.dtype).to(self.device).reshape(-1, 1)
            n = n * k
        return _finish(s, v, n, self.empty)


class Integrator1D(_Integrator):
    """Azimuthal integrator I(radial) for a fixed geometry/mask/binning; call it on frames."""

    def __init__(self, plan, mat, radial, **kw):
        super().__init__(plan, mat, **kw)
        self.npt = plan.npt[0]
        self.radial = radial                                       # (N,) np.ndarray, unit
        self._radial_t = torch.as_tensor(radial, dtype=self.dtype).to(self.device)

    def __call__(self, frames, *, normalization=None) -> IntegrationResult:
        """frames (H, W) or (B, H, W) -> I, σ (B, N); ``normalization`` (B,) monitor or None."""
        i, s = self._intensity(frames, normalization)
        return IntegrationResult(self._radial_t, i, s, self.unit)


class Integrator2D(_Integrator):
    """Cake integrator I(χ, radial); call it on frames."""

    def __init__(self, plan, mat, radial, azimuthal, **kw):
        super().__init__(plan, mat, **kw)
        self.npt_rad, self.npt_azim = plan.npt
        self.radial, self.azimuthal = radial, azimuthal            # np.ndarray, unit and deg
        self._radial_t = torch.as_tensor(radial, dtype=self.dtype).to(self.device)
        self._azim_t = torch.as_tensor(azimuthal, dtype=self.dtype).to(self.device)

    def __call__(self, frames, *, normalization=None) -> Integration2DResult:
        """frames (H, W) or (B, H, W) -> I, σ (B, npt_azim, npt_rad)."""
        i, s = self._intensity(frames, normalization)
        b = i.shape[0]
        cake = lambda t: t.reshape(b, self.npt_rad, self.npt_azim).transpose(1, 2)
        return Integration2DResult(self._radial_t, self._azim_t, cake(i), cake(s), self.unit)


def _check_image(name, arr, shape):
    if arr is None:
        return None
    arr = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have the detector shape {tuple(shape)}, got {arr.shape}")
    return arr


def _prepare(geometry, npt, unit, method, radial_range, azimuth_range, mask, dummy, delta_dummy,
             polarization_factor, solid_angle, dark, flat, device, dtype):
    import pyFAI.units

    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    if unit not in get_args(Unit):
        raise ValueError(f"unit must be one of {get_args(Unit)}, got {unit!r}")
    if method not in get_args(Method):
        raise ValueError(f"method must be one of {get_args(Method)}, got {method!r}")
    for n in npt:
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"number of bins must be a positive int, got {n!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if polarization_factor is not None and not -1.0 <= float(polarization_factor) <= 1.0:
        raise ValueError(f"polarization_factor must be in [-1, 1] or None, got {polarization_factor!r}")
    shape = geometry.shape
    ai = geometry.to_pyfai()
    scale = pyFAI.units.to_unit(unit).scale
    if radial_range is not None:
        if len(radial_range) != 2 or not np.all(np.isfinite(radial_range)) or radial_range[0] == radial_range[1]:
            raise ValueError(f"radial_range must be two distinct finite values, got {radial_range!r}")
        radial_range = tuple(float(radial_range[i]) / scale for i in (0, -1))
    if azimuth_range is not None:
        if len(azimuth_range) != 2 or not np.all(np.isfinite(azimuth_range)):
            raise ValueError(f"azimuth_range must be two finite angles in deg, got {azimuth_range!r}")
        azimuth_range = tuple(float(v) for v in ai.normalize_azimuth_range(tuple(azimuth_range)))
    mask = _check_image("mask", mask, shape)
    mask = geometry.detector_mask() if mask is None else mask.astype(bool)   # pyFAI: user mask replaces
    plan = _Plan(geometry, tuple(int(n) for n in npt), unit, method, radial_range, azimuth_range, mask)
    dark, flat = _check_image("dark", dark, shape), _check_image("flat", flat, shape)
    norm = np.ones(shape, np.float64)
    if flat is not None:
        norm *= np.asarray(flat, np.float32)
    if solid_angle:
        norm *= ai.solidAngleArray(shape, True)
    if polarization_factor is not None:
        norm *= ai.polarization(shape, float(polarization_factor))
    norm[mask] = 0.0
    det = ai.detector
    detector_dummy = None if det.dummy is None else (det.dummy, det.delta_dummy)
    kw = dict(norm=norm.ravel(), dark=None if dark is None else np.asarray(dark, np.float64).ravel(),
              dummy=dummy, delta_dummy=delta_dummy, detector_dummy=detector_dummy,
              device=_resolve_device(device), dtype=dtype)
    return plan, kw


def build_integrator_1d(geometry: Geometry, *, npt: int = 1000, unit: Unit = "q_nm^-1",
                        method: Method = "bbox", radial_range=None, azimuth_range=None, mask=None,
                        dummy=None, delta_dummy=None, polarization_factor: float | None = None,
                        solid_angle: bool = True, dark=None, flat=None,
                        device="cpu", dtype=torch.float32) -> Integrator1D:
    """Build the 1D integrator (workers.pipeline.IntegratorCache keeps a worker's); arguments as pyFAI's ``integrate1d_ng``.

    radial_range in ``unit``; azimuth_range (deg, pyFAI χ); mask bool/int (H, W), nonzero =
    excluded, replacing the detector's mask as in pyFAI (None: the detector's); dummy/delta_dummy
    as pyFAI (None: the detector's, cast through the frame dtype); dark/flat (H, W).
    """
    plan, kw = _prepare(geometry, (npt,), unit, method, radial_range, azimuth_range, mask, dummy,
                        delta_dummy, polarization_factor, solid_angle, dark, flat, device, dtype)
    mat, radial, _ = _build_csr(plan)
    return Integrator1D(plan, mat, radial, **kw)


def build_integrator_2d(geometry: Geometry, *, npt_rad: int = 500, npt_azim: int = 360,
                        unit: Unit = "q_nm^-1", method: Method = "bbox", radial_range=None,
                        azimuth_range=None, mask=None, dummy=None, delta_dummy=None,
                        polarization_factor: float | None = None, solid_angle: bool = True,
                        dark=None, flat=None, device="cpu", dtype=torch.float32) -> Integrator2D:
    """Build the cake (radial x χ) integrator; arguments as pyFAI's ``integrate2d_ng``."""
    plan, kw = _prepare(geometry, (npt_rad, npt_azim), unit, method, radial_range, azimuth_range,
                        mask, dummy, delta_dummy, polarization_factor, solid_angle, dark, flat,
                        device, dtype)
    mat, radial, azimuthal = _build_csr(plan)
    return Integrator2D(plan, mat, radial, azimuthal, **kw)


def integrate_reference(integrator: _Integrator, frame: np.ndarray):
    """Plain per-frame float64 reference (numpy + scipy), same maths as the batched path.

    frame (H, W) -> (I, σ) flat over bins (1D: (N,), 2D: (npt_rad·npt_azim,) radial-major).
    """
    raw = np.asarray(frame, np.float64).ravel()
    norm = integrator.norm.double().cpu().numpy().ravel()
    dark = None if integrator.dark is None else integrator.dark.double().cpu().numpy().ravel()
    valid = np.isfinite(raw) & (norm != 0)
    dummy = integrator.dummy_for(np.asarray(frame).dtype)
    if dummy is not None:
        valid &= (np.abs(raw - dummy[0]) > dummy[1]) if dummy[1] > 0 else (raw != dummy[0])
    sig = np.where(valid, raw - (0.0 if dark is None else dark), 0.0)
    var = np.where(valid, np.maximum(raw, 1.0), 0.0)
    nrm = np.where(valid, norm, 0.0)
    c = integrator.matrix
    s, v, n = c @ sig, c.multiply(c) @ var, c @ nrm
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(n != 0, s / n, integrator.empty),
                np.where(n != 0, np.sqrt(v) / n, integrator.empty))
