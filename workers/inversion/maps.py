"""A GISAXS run's own (q_xy, q_z) map as the data of its per-frame inversion.

``InversionMap`` remaps the run's frames with ``workers.grazing.build_qmap`` and keeps
the bins that hold pixels (``MapPoints``). Two choices make the fit honest:

* pixel centres, no splitting (``method="no"``): each pixel lands in one bin, so the bins'
  Poisson errors are independent, as the LM's chi2 assumes (bbox splitting shares pixels
  between neighbouring bins and would understate the parameters' errors);
* each bin's coordinates are the weighted centroid of its pixels' q_xy and q_z, with the
  weights c * norm the bin's mean uses (I_bin = sum c raw / sum c norm, ``workers.integrate``),
  so the model evaluated there matches the bin's mean to second order in the bin's width.

Pixels below the sample horizon (alpha_f <= 0) are left out. The exit angle of a bin follows
from its q_z: sin alpha_f = q_z / k - sin alpha_i (PHYSICS.md "Grazing incidence"; k = 2 pi /
lambda, 1/nm). Bins are intensity per solid angle (the integrator divides by it): the models
are evaluated with a pixel factor of 1.

``GridResampler``: the same map averaged onto an encoder's ``DetectorGrid`` in (|q_par|, q_z)
(both signs of q_xy together), for the encoder's start only: the encoder reads shapes in q
(sizes, distances), the LM then fits the run's own bins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from workers.grazing import GrazingGeometry, build_qmap, q_xy_qz
from workers.inversion.gisaxs import DetectorGrid


@dataclass(frozen=True, eq=False)
class MapPoints:
    """The M fitted bins of a run's map (module docstring): q_xy, q_z (M,) 1/nm centroids,
    ``index`` (M,) their flat index in the (Nz, Nxy) map whose bin centres are q_xy_axis (Nxy,)
    and q_z_axis (Nz,); wavelength in nm, alpha_i in rad; ``weight`` (M,) W = sum c * norm and
    ``dark`` (M,) D = sum c * dark (counts; 0 without a dark image) of each bin, so that a bin of
    mean intensity I read I W + D counts and its Poisson standard error is
    sqrt(max(I W + D, 1)) / W (``workers.integrate``'s variance, max(raw, 1) per pixel)."""
    q_xy: np.ndarray
    q_z: np.ndarray
    index: np.ndarray
    q_xy_axis: np.ndarray
    q_z_axis: np.ndarray
    wavelength: float
    alpha_i: float
    weight: np.ndarray
    dark: np.ndarray

    def alpha_f(self) -> np.ndarray:
        """Exit angle (M,) rad: sin alpha_f = q_z / k - sin alpha_i."""
        k = 2.0 * math.pi / self.wavelength
        return np.arcsin(np.clip(self.q_z / k - math.sin(self.alpha_i), -1.0, 1.0))


def map_points(matrix, weight: np.ndarray, q_xy_px: np.ndarray, q_z_px: np.ndarray, q_xy_axis: np.ndarray,
               q_z_axis: np.ndarray, wavelength: float, alpha_i: float, q_xy_band=None,
               dark: np.ndarray | None = None) -> MapPoints:
    """MapPoints of a remapping ``matrix`` (bins, P) (scipy CSR, bins row-major (Nz, Nxy)), with
    pixel weights (P,) (the norm: 0 = masked), pixel-centre q_xy, q_z (P,) and dark counts (P,)
    (None: 0); bins with no weight, at alpha_f <= 0 or with |q_xy| outside ``q_xy_band`` (lo,
    hi) are left out."""
    w = np.asarray(matrix @ weight, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        qxy = np.asarray(matrix @ (weight * q_xy_px)) / w
        qz = np.asarray(matrix @ (weight * q_z_px)) / w
    k = 2.0 * math.pi / wavelength
    keep = (w > 0) & (qz / k - math.sin(alpha_i) > 0)
    if q_xy_band is not None:
        keep &= (np.abs(qxy) >= q_xy_band[0]) & (np.abs(qxy) <= q_xy_band[1])
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise ValueError("inversion map: no bin above the sample horizon holds pixels (q_range, q-map ranges?)")
    d = np.zeros(idx.size) if dark is None else np.asarray(matrix @ np.asarray(dark, np.float64))[idx]
    return MapPoints(qxy[idx], qz[idx], idx, np.asarray(q_xy_axis, np.float64), np.asarray(q_z_axis, np.float64),
                     float(wavelength), float(alpha_i), w[idx], d)


class InversionMap:
    """A run's map for the inversion: ``points`` (MapPoints); call on frames (B, H, W) ->
    intensity, sigma (B, M) float64 (Poisson standard errors of the bins' means)."""

    def __init__(self, ggeo: GrazingGeometry, *, npt=(64, 48), q_xy_range=None, q_z_range=None, q_xy_band=None,
                 **options):
        options["method"] = "no"                          # independent bins (module docstring)
        self.integrator = build_qmap(ggeo, npt=npt, q_xy_range=q_xy_range, q_z_range=q_z_range, **options)
        q_xy, q_z = (t.reshape(-1).numpy() for t in q_xy_qz(ggeo))
        weight = self.integrator.norm.reshape(-1).double().cpu().numpy()
        dark = options.get("dark")
        self.points = map_points(self.integrator.matrix, weight, q_xy, q_z, self.integrator.q_xy,
                                 self.integrator.q_z, ggeo.geometry.wavelength * 1e9, ggeo.incident_angle, q_xy_band,
                                 None if dark is None else np.asarray(dark, np.float64).reshape(-1))
        self._index = torch.as_tensor(self.points.index, device=self.integrator.device)

    def __call__(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.integrator(frames)
        flat = lambda t: t.reshape(t.shape[0], -1)[:, self._index].double()      # noqa: E731
        return flat(res.intensity), flat(res.sigma)


class GridResampler:
    """``points``' map resampled onto ``grid`` (module docstring): each grid pixel gets the mean
    of the run's bins (|q_xy| folded) within 0.75 cells of it in (q_par, q_z), cells the larger
    of the grid's and the map's steps per axis (so neither finer bins nor a finer grid leave
    holes); ``coverage``: the fraction of the grid's pixels that get a value."""

    def __init__(self, points: MapPoints, grid: DetectorGrid):
        from scipy.sparse import csr_matrix
        from scipy.spatial import cKDTree
        q_par, q_z, omega = (t.numpy() for t in grid.q())
        self.shape, self.omega = grid.shape, omega.reshape(-1)
        step = lambda a: float(np.median(np.abs(np.diff(a)))) if a.size > 1 else 0.0     # noqa: E731
        sx = max(step(q_par[0]), step(points.q_xy_axis))
        sz = max(step(q_z[:, 0]), step(points.q_z_axis))
        tree = cKDTree(np.stack([np.abs(points.q_xy) / sx, points.q_z / sz], 1))
        near = tree.query_ball_point(np.stack([q_par.reshape(-1) / sx, q_z.reshape(-1) / sz], 1), r=0.75)
        rows = np.repeat(np.arange(len(near)), [len(n) for n in near])
        cols = np.concatenate([np.asarray(n, np.int64) for n in near])
        self.matrix = csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(near), points.q_xy.size))
        self.coverage = float(np.mean([len(n) > 0 for n in near]))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """values (B, M) at the map's bins (NaN: none) -> (B, H, W) on the grid, times its pixel
        factor; NaN where no bin is near."""
        v = values.detach().double().cpu().numpy()
        ok = np.isfinite(v)
        num = self.matrix @ np.where(ok, v, 0.0).T
        den = self.matrix @ ok.T.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, num / den, np.nan) * self.omega[:, None]
        return torch.from_numpy(np.ascontiguousarray(out.T)).reshape(-1, *self.shape)
