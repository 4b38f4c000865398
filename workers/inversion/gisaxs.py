"""Differentiable GISAXS forward model in the decoupling approximation (Born), on a detector grid.

Geometry (PHYSICS.md "Grazing incidence"): beam along +x at grazing angle alpha_i, k = 2 pi /
lambda; a flat detector perpendicular to x with tangent-plane coordinates (u, v) = (y, z) /
distance, so k_f = k (1, u, v) / sqrt(1 + u^2 + v^2) and

    q_x = k_f,x - k cos alpha_i,  q_y = k_f,y,  q_z = k_f,z + k sin alpha_i,
    q_par = sqrt(q_x^2 + q_y^2); pixel solid angle ~ (1 + u^2 + v^2)^(-3/2) (cos^3).

BornAgain 25's ``SphericalDetector(n_phi, phi_min, phi_max, n_alpha, alpha_min, alpha_max)``
bins are these (u, v) = (phi, alpha) coordinates with the cos^3 pixel factor (checked in
tests/test_inversion.py against its output).

Particles sit on the substrate (bottom at z = 0): sphere of radius r (centre at z = r),
vertical cylinder of radius r and height h (centre at h/2); amplitudes with the phase
exp(i q_z z_centre):

    F_sphere = 4 pi (sin qr - qr cos qr) / q^3,                      q = |q|
    F_cyl    = 2 pi r^2 h J1(q_par r)/(q_par r) sinc(q_z h / 2)

Size distribution: Gaussian in radius with relative width pd, by N_NODES-point Gauss-Hermite
quadrature (radii r_i = R (1 + sqrt 2 pd t_i), weights w_i / sqrt pi; pd <= 0.22 keeps r_i > 0);
or any distribution as a histogram of number fractions on fixed radius bins
(``workers.inversion.distribution.RadiusBins``: its Legendre nodes in each bin take the place of
the Hermite nodes, ``spheres_histogram_paracrystal``).

Decoupling approximation (BornAgain, PHYSICS.md): I = <|F|^2> + |<F>|^2 (S(q_par) - 1), with

* radial paracrystal (BornAgain ``RadialParacrystal`` with a Gaussian nearest-neighbour
  distance distribution of width omega, no damping): phi(q) = exp(-q^2 omega^2 / 2),
  S = Re[(1 + phi e^(iqD)) / (1 - phi e^(iqD))] = (1 - phi^2) / (1 - 2 phi cos qD + phi^2);
* hard disks, Percus-Yevick (Ripoll & Tejero, Mol. Phys. 85, 423 (1995); BornAgain
  ``Dense2D``): S = 1 / (1 - rho c(q)), rho = 4 eta / pi, eta = pi R_hd^2 n (area fraction),
  c(q) = 2 pi int_0^1 x c(x) J0(2 q R_hd x) dx, c(x) = C0 (1 + 4 eta (W2(x/2) - 1) + S2 x),
  by 48-point Gauss-Legendre quadrature.

Model: I(pixel) = i0 * Omega(pixel) * I_DA / I_DA-norm + background, where I_DA-norm = <|F(0)|^2>
(so i0 is the forward intensity of the form factor). Parameters: SPHERE_PARACRYSTAL_PARAMS.
These are the Born approximation (substrate as vacuum); particles on a real substrate (or film)
in the DWBA: ``workers.inversion.dwba``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPHERE_PARACRYSTAL_PARAMS = ("radius", "pd", "distance", "disorder", "i0", "background")
CYLINDER_PARACRYSTAL_PARAMS = ("radius", "pd", "height", "distance", "disorder", "i0", "background")
SPHERE_HARDDISK_PARAMS = ("radius", "pd", "coverage", "i0", "background")
HISTOGRAM_PARACRYSTAL_PARAMS = ("distance", "disorder", "i0", "background")
N_NODES = 9
_GH_T, _GH_W = np.polynomial.hermite.hermgauss(N_NODES)
_GL_X, _GL_W = np.polynomial.legendre.leggauss(48)


# ---------------------------------------------------------------------------------------------
# Bessel functions with first derivatives (torch.special has no backward for them)
class _J0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.special.bessel_j0(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g * torch.special.bessel_j1(x)


class _J1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.special.bessel_j1(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xs = torch.where(x.abs() < 1e-8, torch.full_like(x, 1e-8), x)
        d = torch.where(x.abs() < 1e-8, torch.full_like(x, 0.5), torch.special.bessel_j0(x) - torch.special.bessel_j1(x) / xs)
        return g * d


def bessel_j0(x: torch.Tensor) -> torch.Tensor:
    return _J0.apply(x)


def j1_over_x(x: torch.Tensor) -> torch.Tensor:
    """2 J1(x) / x, 1 at x = 0 (series below 1e-3)."""
    small = x.abs() < 1e-3
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - x * x / 8.0, 2.0 * _J1.apply(xs) / xs)


def sphere_amp(x: torch.Tensor) -> torch.Tensor:
    """3 (sin x - x cos x) / x^3, with sasmodels' series below the cut (0.1 float64, 0.7 float32)."""
    cut = 0.1 if x.dtype == torch.float64 else 0.7
    small = x.abs() < cut
    xs = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    ser = 1.0 + x2 * (-3.0 / 30.0 + x2 * (3.0 / 840.0 + x2 * (-3.0 / 45360.0)))
    return torch.where(small, ser, 3.0 * (torch.sin(xs) - xs * torch.cos(xs)) / (xs * xs * xs))


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorGrid:
    """Flat-detector pixel centres in tangent-plane coordinates: u (W,) in-plane, v (H,) exit."""
    wavelength: float          # nm
    alpha_i: float             # rad
    u: tuple[float, ...]
    v: tuple[float, ...]

    @classmethod
    def regular(cls, wavelength: float, alpha_i: float, u_range: tuple[float, float], nu: int,
                v_range: tuple[float, float], nv: int) -> "DetectorGrid":
        """Bin centres of nu x nv equal bins over the ranges (as BornAgain's detector axes)."""
        if not (wavelength > 0 and alpha_i > 0 and nu > 0 and nv > 0):
            raise ValueError(f"DetectorGrid: bad wavelength/alpha_i/sizes {wavelength}, {alpha_i}, {nu}, {nv}")
        du, dv = (u_range[1] - u_range[0]) / nu, (v_range[1] - v_range[0]) / nv
        return cls(wavelength, alpha_i, tuple(u_range[0] + du * (i + 0.5) for i in range(nu)),
                   tuple(v_range[0] + dv * (j + 0.5) for j in range(nv)))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.v), len(self.u)

    def _uvn(self):
        v, u = torch.meshgrid(torch.tensor(self.v, dtype=torch.float64), torch.tensor(self.u, dtype=torch.float64),
                              indexing="ij")
        return u, v, torch.sqrt(1.0 + u * u + v * v)

    def q(self, dtype=torch.float64, device=None):
        """q_par, q_z, solid-angle factor, each (H, W); q in 1/nm."""
        k = 2.0 * math.pi / self.wavelength
        u, v, n = self._uvn()
        qx = k / n - k * math.cos(self.alpha_i)
        qy, qz = k * u / n, k * v / n + k * math.sin(self.alpha_i)
        out = (torch.sqrt(qx * qx + qy * qy), qz, n ** -3)
        return tuple(t.to(dtype=dtype, device=device) for t in out)

    def alpha_f(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Exit angle per pixel (H, W), rad: sin alpha_f = v / sqrt(1 + u^2 + v^2) (k_f,z / k)."""
        _, v, n = self._uvn()
        return torch.asin(v / n).to(dtype=dtype, device=device)


def _nodes(radius: torch.Tensor, pd: torch.Tensor):
    """Gauss-Hermite radii (B, n) and weights (n,) of a Gaussian size distribution."""
    t = torch.as_tensor(_GH_T, dtype=radius.dtype, device=radius.device)
    w = torch.as_tensor(_GH_W / math.sqrt(math.pi), dtype=radius.dtype, device=radius.device)
    return radius[:, None] * (1.0 + math.sqrt(2.0) * pd[:, None] * t), w


def decoupling(f_re: torch.Tensor, f_im: torch.Tensor, w: torch.Tensor, s: torch.Tensor, f0: torch.Tensor):
    """I = <|F|^2> + |<F>|^2 (S - 1), normalised by <|F(0)|^2>.

    f_re, f_im: (B or 1, n, M) amplitude at the n size nodes; w (n,) or per frame (B, n);
    s (B, M); f0: (B or 1, n) F(q=0).
    """
    wb = (w if w.dim() == 2 else w[None])[:, None]                      # (B or 1, 1, n): batched products
    ff = (wb @ (f_re * f_re + f_im * f_im))[:, 0]
    mr, mi = (wb @ f_re)[:, 0], (wb @ f_im)[:, 0]
    norm = (wb[:, 0] * f0 * f0).sum(1, keepdim=True)
    return (ff + (mr * mr + mi * mi) * (s - 1.0)) / norm


def sphere_amplitudes(q_par, q_z, r):
    """Sphere amplitudes (re, im) (B, n, M) on flattened q (M,), bottom at z = 0; and F(0) (B, n)."""
    q = torch.sqrt(q_par * q_par + q_z * q_z)
    rr = r[:, :, None]
    vol = 4.0 / 3.0 * math.pi * rr ** 3
    a = vol * sphere_amp(q * rr)
    ph = q_z * rr
    return a * torch.cos(ph), a * torch.sin(ph), vol[:, :, 0]


def cylinder_amplitudes(q_par, q_z, r, h):
    """Vertical cylinder amplitudes (re, im) (B, n, M), bottom at z = 0; and F(0) (B, n)."""
    rr, hh = r[:, :, None], h[:, None, None]
    vol = math.pi * rr * rr * hh
    x = 0.5 * q_z * hh
    sinc = torch.where(x.abs() < 1e-6, 1.0 - x * x / 6.0, torch.sin(x) / torch.where(x.abs() < 1e-6, torch.ones_like(x), x))
    a = vol * j1_over_x(q_par * rr) * sinc
    return a * torch.cos(x), a * torch.sin(x), vol[:, :, 0]


def paracrystal_s(q_par: torch.Tensor, distance: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Radial paracrystal S(q_par) (B, M), Gaussian nearest-neighbour law (module docstring)."""
    d, om = distance[:, None], omega[:, None]
    x = 0.5 * (q_par * om) ** 2
    phi = torch.exp(-x)
    one_m = -torch.expm1(-x)                                    # 1 - phi, no cancellation
    sn = torch.sin(0.5 * q_par * d)
    return one_m * (1.0 + phi) / (one_m * one_m + 4.0 * phi * sn * sn)


def hard_disk_s(q_par: torch.Tensor, radius: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Percus-Yevick hard-disk S(q_par) (B, M) (Ripoll & Tejero 1995, as BornAgain Dense2D).

    radius: hard-disk radius (nm), coverage: area fraction eta in [0, 0.65).
    """
    dt, dev = q_par.dtype, q_par.device
    eta = coverage[:, None, None]
    p = 7.0 / 3.0 - 4.0 * math.sqrt(3.0) / math.pi
    den = 1.0 + eta + 3.0 * p * eta ** 2 - p * eta ** 3
    c0 = -den / (1.0 - eta) ** 3
    s2 = 3.0 * eta ** 2 / 8.0 * (8.0 * (1.0 - 2.0 * p) + (25.0 - 9.0 * p) * p * eta - (7.0 - 3.0 * p) * p * eta ** 2) / den
    x = torch.as_tensor(0.5 * (_GL_X + 1.0), dtype=dt, device=dev)          # nodes on [0, 1]
    wx = torch.as_tensor(0.5 * _GL_W, dtype=dt, device=dev)
    h = x / 2.0
    w2 = 2.0 * (torch.acos(h) - h * torch.sqrt(1.0 - h * h)) / math.pi
    cx = c0 * (1.0 + 4.0 * eta * (w2 - 1.0) + s2 * x)                      # (B, 1, L)
    arg = 2.0 * q_par[:, :, None] * radius[:, None, None] * x               # (B, M, L)
    cq = 2.0 * math.pi * (wx * x * cx * bessel_j0(arg)).sum(-1)
    return 1.0 / (1.0 - 4.0 * coverage[:, None] / math.pi * cq)


# ---------------------------------------------------------------------------------------------
def _finish(grid_q, i_da, i0, bkg):
    _, _, omega = grid_q
    H, W = omega.shape
    return (i0[:, None] * omega.reshape(1, -1) * i_da + bkg[:, None]).reshape(-1, H, W)


def _flat(grid_q, like):
    qp, qz, om = (t.to(dtype=like.dtype, device=like.device) for t in grid_q)
    return qp.reshape(-1), qz.reshape(-1), (qp, qz, om)


def _check(params, n, name):
    if params.dim() != 2 or params.shape[-1] != n:
        raise ValueError(f"{name}: params must be (B, {n}), got shape {tuple(params.shape)}")


def spheres_paracrystal(grid_q, params: torch.Tensor) -> torch.Tensor:
    """Spheres (Gaussian sizes) on a radial paracrystal, DA. grid_q: DetectorGrid.q() tuple;
    params (B, 6) = SPHERE_PARACRYSTAL_PARAMS (radius nm, pd, distance nm, disorder = omega /
    distance, i0, background). Returns (B, H, W)."""
    _check(params, 6, "spheres_paracrystal")
    qp, qz, gq = _flat(grid_q, params)
    r, pd, dist, dis, i0, bkg = params.unbind(-1)
    rn, w = _nodes(r, pd)
    fr, fi, f0 = sphere_amplitudes(qp, qz, rn)
    return _finish(gq, decoupling(fr, fi, w, paracrystal_s(qp, dist, dis * dist), f0), i0, bkg)


def cylinders_paracrystal(grid_q, params: torch.Tensor) -> torch.Tensor:
    """Vertical cylinders (Gaussian radii, fixed height) on a radial paracrystal, DA.
    params (B, 7) = CYLINDER_PARACRYSTAL_PARAMS. Returns (B, H, W)."""
    _check(params, 7, "cylinders_paracrystal")
    qp, qz, gq = _flat(grid_q, params)
    r, pd, h, dist, dis, i0, bkg = params.unbind(-1)
    rn, w = _nodes(r, pd)
    fr, fi, f0 = cylinder_amplitudes(qp, qz, rn, h)
    return _finish(gq, decoupling(fr, fi, w, paracrystal_s(qp, dist, dis * dist), f0), i0, bkg)


def spheres_hard_disk(grid_q, params: torch.Tensor) -> torch.Tensor:
    """Spheres (Gaussian sizes) with hard-disk PY interference (disk radius = mean radius), DA.
    params (B, 5) = SPHERE_HARDDISK_PARAMS (radius nm, pd, coverage, i0, background)."""
    _check(params, 5, "spheres_hard_disk")
    qp, qz, gq = _flat(grid_q, params)
    r, pd, cov, i0, bkg = params.unbind(-1)
    rn, w = _nodes(r, pd)
    fr, fi, f0 = sphere_amplitudes(qp, qz, rn)
    s = hard_disk_s(qp[None].expand(len(r), -1), r, cov)
    return _finish(gq, decoupling(fr, fi, w, s, f0), i0, bkg)


def spheres_histogram_paracrystal(grid_q, params: torch.Tensor, weights: torch.Tensor, bins) -> torch.Tensor:
    """Spheres whose radii follow a histogram on a radial paracrystal, DA. params (B, 4) =
    HISTOGRAM_PARACRYSTAL_PARAMS (distance nm, disorder = omega / distance, i0, background);
    weights (B, K): number fractions on ``bins`` (a ``distribution.RadiusBins``, K bins).
    Returns (B, H, W)."""
    _check(params, len(HISTOGRAM_PARACRYSTAL_PARAMS), "spheres_histogram_paracrystal")
    qp, qz, gq = _flat(grid_q, params)
    dist, dis, i0, bkg = params.unbind(-1)
    r, w = bins.nodes(weights.to(params))
    fr, fi, f0 = sphere_amplitudes(qp, qz, r[None])
    return _finish(gq, decoupling(fr, fi, w, paracrystal_s(qp, dist, dis * dist), f0), i0, bkg)
