"""PNG images for the dashboard: a raw detector frame and a grazing-incidence (q_xy, q_z) map.

matplotlib is imported on first use, so importing this module stays light. Bad input is a
ValueError (the REST routes answer 422).
"""
from __future__ import annotations

import io
import math

import numpy as np


def render_frame_png(frame: np.ndarray, *, size: int = 320, log: bool = True) -> bytes:
    """A detector frame (rows, cols), counts, as a PNG no larger than `size` pixels a side.

    Pixels < 0 or non-finite (module gaps, dummies) are masked; blocks of f x f pixels,
    f = ceil(max(rows, cols) / size), are averaged over their valid pixels. Colour: viridis
    over the 1st-99.8th percentile of log10(1 + counts) (or counts), masked blocks grey.
    ValueError unless the frame is a 2D image (or one such image, shape (1, rows, cols)).
    """
    import matplotlib
    from matplotlib.image import imsave

    a = np.asarray(frame, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"frame of shape {a.shape} is not a 2D image")
    valid = np.isfinite(a) & (a >= 0)
    f = max(1, math.ceil(max(a.shape) / size))
    if f > 1:
        a, valid = _block_mean(a, valid, f)
    img = np.log10(1.0 + np.where(valid, a, 0.0)) if log else np.where(valid, a, 0.0)
    lo, hi = _colour_range(img, valid)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#555555")
    buf = io.BytesIO()
    imsave(buf, np.ma.masked_array(img, ~valid), cmap=cmap, vmin=lo, vmax=hi, format="png")
    return buf.getvalue()


def render_qmap_png(q_xy, q_z, image, *, size: int = 480, log: bool = True) -> bytes:
    """A (q_xy, q_z) map as a PNG ``size`` pixels wide with axes in 1/nm.

    q_xy: (Nxy,), q_z: (Nz,), 1/nm, evenly spaced; image: (Nz, Nxy). Colour: viridis over the
    1st-99.8th percentile of log10(I) (I > 0) or I; NaN (missing wedge, no pixel) grey.
    ValueError when the map does not match its axes or has fewer than 2 bins along one.
    """
    import matplotlib
    from matplotlib.figure import Figure

    a = np.asarray(image, dtype=np.float64)
    x, z = np.asarray(q_xy, np.float64), np.asarray(q_z, np.float64)
    if a.ndim != 2 or a.shape != (z.size, x.size) or min(a.shape) < 2:
        raise ValueError(f"q-map of shape {a.shape} does not match its axes")
    with np.errstate(divide="ignore", invalid="ignore"):
        img = np.where(a > 0, np.log10(a), np.nan) if log else a
    valid = np.isfinite(img)
    lo, hi = _colour_range(img, valid)
    dx, dz = (x[-1] - x[0]) / (x.size - 1), (z[-1] - z[0]) / (z.size - 1)
    fig = Figure(figsize=(size / 100, 0.8 * size / 100), dpi=100)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#888888")
    im = ax.imshow(np.ma.masked_invalid(img), origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                   extent=(x[0] - dx / 2, x[-1] + dx / 2, z[0] - dz / 2, z[-1] + dz / 2), interpolation="nearest")
    ax.set_xlabel("q_xy (1/nm)")
    ax.set_ylabel("q_z (1/nm)")
    fig.colorbar(im, ax=ax, label="log10 I" if log else "I")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _block_mean(a: np.ndarray, valid: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of the valid pixels of f x f blocks (edges padded), and which blocks have any."""
    h, w = (-(-a.shape[0] // f)) * f, (-(-a.shape[1] // f)) * f
    pa = np.zeros((h, w))
    pv = np.zeros((h, w))
    pa[:a.shape[0], :a.shape[1]] = np.where(valid, a, 0.0)
    pv[:a.shape[0], :a.shape[1]] = valid
    s = pa.reshape(h // f, f, w // f, f).sum(axis=(1, 3))
    n = pv.reshape(h // f, f, w // f, f).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / n, n > 0


def _colour_range(img: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """The 1st and 99.8th percentiles of the valid values ((0, 1) if none), hi > lo."""
    lo, hi = np.percentile(img[valid], [1.0, 99.8]) if valid.any() else (0.0, 1.0)
    return lo, (hi if hi > lo else lo + 1.0)
