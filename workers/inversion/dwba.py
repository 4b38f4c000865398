"""GISAXS of particles on a substrate in the distorted-wave Born approximation (DWBA), decoupling
approximation, on a ``workers.inversion.gisaxs.DetectorGrid``.

Sample (``workers.inversion.spec.Substrate``): vacuum above a substrate of refractive index
n_s = 1 - delta + i beta, optionally with one film (n_f, thickness d) on it; the particles sit
in the vacuum on the top surface (bottom at z = 0, as in ``workers.inversion.gisaxs``).

Wavevectors (BornAgain's conventions, ``FormFactorDWBA::evaluate``): q = k_i - k_f and
F(q) = int_particle exp(i q.r) d^3r (particle at its position); with a = k sin alpha_i and
b = k sin alpha_f (1/nm; k = 2 pi / lambda, alpha_f per pixel: ``DetectorGrid.alpha_f``) the
incident wave in the vacuum has k_z = -a (transmitted, amplitude T_i = 1) and +a (reflected,
R_i), the time-reversed exit wave k_z = +b (T_f = 1) and -b (R_f); the four terms (Rauscher et
al., PRB 52, 16855 (1995); Renaud, Lazzari & Leroy, Surf. Sci. Rep. 64, 255 (2009)):

    F_DWBA(q_par) = F(q_par, -a - b) + R_i F(q_par, a - b) + R_f F(q_par, b - a)
                    + R_i R_f F(q_par, a + b)
                  = F1* + R_i F2* + R_f F2 + R_i R_f F1,
    F1 = F(q_par, a + b),  F2 = F(q_par, b - a),

by F(-q) = F(q)* (real scattering density) and F depending on |q_par| only (axially symmetric
particles): two form-factor evaluations per pixel for the four terms.

T_i = T_f = 1 because the particles are in the vacuum above the surface, where the downward
wave is the incident one (1 + R is the field at the surface, the transmission into the layer
below). Checked per pixel against BornAgain 25 (tests/test_gisaxs_dwba.py); the conjugate
convention (q = k_f - k_i with the same R) is off by up to 60x near the Yoneda band there.

Fresnel coefficients (Parratt, Phys. Rev. 95, 359 (1954)): k_z,j = k sqrt(n_j^2 - cos^2 alpha)
(principal root, Im >= 0), r_jk = (k_z,j - k_z,k) / (k_z,j + k_z,k); substrate alone R = r_01;
with the film (layer 1, thickness d, on substrate 2), at the top of the film:

    R = (r_01 + r_12 e^{2 i k_z,1 d}) / (1 + r_01 r_12 e^{2 i k_z,1 d}).

Decoupling approximation as ``gisaxs.decoupling`` with the DWBA amplitudes:
I = <|F_DWBA|^2> + |<F_DWBA>|^2 (S(q_par) - 1), q_par (the same for the four terms) as the Born
model's. With R = 0 (a vacuum substrate) this is the Born model.
Normalisation as the Born models (by <|F(0)|^2> of the bare form factor), so i0 keeps its meaning.
Sizes as the Born models: Gaussian (Gauss-Hermite nodes) or a histogram on fixed radius bins
(``spheres_histogram_paracrystal_dwba``; ``workers.inversion.distribution``).
Pixels need alpha_f > 0 (above the sample horizon).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.inversion.gisaxs import (HISTOGRAM_PARACRYSTAL_PARAMS, DetectorGrid, _check, _nodes, cylinder_amplitudes,
                                      decoupling, hard_disk_s, paracrystal_s, sphere_amplitudes)
from workers.inversion.spec import Substrate


def _kz(k: float, delta: float, beta: float, cos_a: torch.Tensor) -> torch.Tensor:
    n = complex(1.0 - delta, beta)
    return k * torch.sqrt(n * n - (cos_a * cos_a).to(torch.complex128))


def fresnel_r(k: float, alpha: torch.Tensor, substrate: Substrate) -> torch.Tensor:
    """Reflection coefficient (complex128, shape of alpha) of the substrate's (or its film's) top
    surface for a wave from the vacuum at glancing angle alpha (rad); k in 1/nm. Module docstring."""
    cos_a = torch.cos(alpha.to(torch.float64))
    kz0 = k * torch.sin(alpha.to(torch.float64)).to(torch.complex128)
    kzs = _kz(k, substrate.delta, substrate.beta, cos_a)
    if substrate.film_thickness == 0:
        return (kz0 - kzs) / (kz0 + kzs)
    kz1 = _kz(k, substrate.film_delta, substrate.film_beta, cos_a)
    r01, r12 = (kz0 - kz1) / (kz0 + kz1), (kz1 - kzs) / (kz1 + kzs)
    e = torch.exp(2j * kz1 * substrate.film_thickness)
    return (r01 + r12 * e) / (1.0 + r01 * r12 * e)


@dataclass(frozen=True)
class DwbaQ:
    """A grid's pixels for the DWBA on one substrate (``dwba_q``; module docstring)."""
    q_par: torch.Tensor      # (H, W) 1/nm
    q_sum: torch.Tensor      # (H, W) a + b, 1/nm
    q_diff: torch.Tensor     # (H, W) b - a, 1/nm
    r_i: torch.Tensor        # () complex: R(alpha_i)
    r_f: torch.Tensor        # (H, W) complex: R(alpha_f)
    omega: torch.Tensor      # (H, W) pixel solid-angle factor

    def to(self, dtype: torch.dtype, device=None) -> "DwbaQ":
        """Real tensors in dtype, the coefficients in its complex type."""
        cdt = torch.promote_types(dtype, torch.complex64)
        return DwbaQ(*(t.to(dtype=cdt if t.is_complex() else dtype, device=device) for t in
                       (self.q_par, self.q_sum, self.q_diff, self.r_i, self.r_f, self.omega)))


def dwba_q(grid: DetectorGrid, substrate: Substrate, dtype=torch.float64, device=None) -> DwbaQ:
    """The DWBA terms of ``grid``'s pixels on ``substrate`` (module docstring); build once per
    grid and substrate (the Fresnel coefficients do not depend on the particles)."""
    q_par, _, omega = grid.q()
    return dwba_points(q_par, grid.alpha_f(), grid.wavelength, grid.alpha_i, substrate, omega, dtype, device)


def dwba_points(q_par: torch.Tensor, alpha_f: torch.Tensor, wavelength: float, alpha_i: float,
                substrate: Substrate, omega: torch.Tensor | None = None, dtype=torch.float64, device=None) -> DwbaQ:
    """The DWBA terms of any points (H, W): in-plane |q_par| (1/nm) and exit angle alpha_f (rad,
    > 0) at incidence alpha_i (rad), wavelength in nm; omega: the pixel factor (None: 1, as for
    a map of intensity per solid angle). E.g. a grazing run's (q_xy, q_z) bins, with
    sin alpha_f = q_z / k - sin alpha_i."""
    alpha_f = alpha_f.to(torch.float64)
    if not bool((alpha_f > 0).all()):
        raise ValueError("dwba_q: every pixel needs alpha_f > 0 (above the sample horizon)")
    k = 2.0 * math.pi / wavelength
    a, b = k * math.sin(alpha_i), k * torch.sin(alpha_f)
    r_i = fresnel_r(k, torch.tensor(alpha_i, dtype=torch.float64), substrate)
    omega = torch.ones_like(alpha_f) if omega is None else omega
    return DwbaQ(q_par.to(torch.float64).abs(), a + b, b - a, r_i, fresnel_r(k, alpha_f, substrate),
                 omega.to(torch.float64)).to(dtype, device)


def dwba_amplitudes(amplitudes, dq: DwbaQ, *shape):
    """F_DWBA as (re, im) (B, n, M), M = H W pixels, and F(0) (B, n) (module docstring).
    amplitudes(q_par (2 M,), q_z (2 M,), *shape) -> (re, im, F(0)): a Born amplitude of ``gisaxs``."""
    qp = dq.q_par.reshape(-1)
    M = qp.shape[0]
    fr, fi, f0 = amplitudes(torch.cat([qp, qp]), torch.cat([dq.q_sum.reshape(-1), dq.q_diff.reshape(-1)]), *shape)
    f = torch.complex(fr, fi)
    f1, f2 = f[..., :M], f[..., M:]
    r_i, r_f = dq.r_i, dq.r_f.reshape(-1)
    out = f1.conj() + r_i * f2.conj() + r_f * f2 + r_i * r_f * f1
    return out.real, out.imag, f0


def _finish(dq: DwbaQ, i_da, i0, bkg):
    H, W = dq.omega.shape
    return (i0[:, None] * dq.omega.reshape(1, -1) * i_da + bkg[:, None]).reshape(-1, H, W)


def spheres_paracrystal_dwba(dq: DwbaQ, params: torch.Tensor) -> torch.Tensor:
    """``gisaxs.spheres_paracrystal`` in the DWBA: params (B, 6) = SPHERE_PARACRYSTAL_PARAMS.
    Returns (B, H, W)."""
    _check(params, 6, "spheres_paracrystal_dwba")
    dq = dq.to(params.dtype, params.device)
    r, pd, dist, dis, i0, bkg = params.unbind(-1)
    rn, w = _nodes(r, pd)
    fr, fi, f0 = dwba_amplitudes(sphere_amplitudes, dq, rn)
    s = paracrystal_s(dq.q_par.reshape(-1), dist, dis * dist)
    return _finish(dq, decoupling(fr, fi, w, s, f0), i0, bkg)


def cylinders_paracrystal_dwba(dq: DwbaQ, params: torch.Tensor) -> torch.Tensor:
    """``gisaxs.cylinders_paracrystal`` in the DWBA: params (B, 7) = CYLINDER_PARACRYSTAL_PARAMS."""
    _check(params, 7, "cylinders_paracrystal_dwba")
    dq = dq.to(params.dtype, params.device)
    r, pd, h, dist, dis, i0, bkg = params.unbind(-1)
    rn, w = _nodes(r, pd)
    fr, fi, f0 = dwba_amplitudes(cylinder_amplitudes, dq, rn, h)
    s = paracrystal_s(dq.q_par.reshape(-1), dist, dis * dist)
    return _finish(dq, decoupling(fr, fi, w, s, f0), i0, bkg)


def spheres_hard_disk_dwba(dq: DwbaQ, params: torch.Tensor) -> torch.Tensor:
    """``gisaxs.spheres_hard_disk`` in the DWBA: params (B, 5) = SPHERE_HARDDISK_PARAMS."""
    _check(params, 5, "spheres_hard_disk_dwba")
    dq = dq.to(params.dtype, params.device)
    r, pd, cov, i0, bkg = params.unbind(-1)
    rn, w = _nodes(r, pd)
    fr, fi, f0 = dwba_amplitudes(sphere_amplitudes, dq, rn)
    s = hard_disk_s(dq.q_par.reshape(1, -1).expand(len(r), -1), r, cov)
    return _finish(dq, decoupling(fr, fi, w, s, f0), i0, bkg)


def spheres_histogram_paracrystal_dwba(dq: DwbaQ, params: torch.Tensor, weights: torch.Tensor, bins) -> torch.Tensor:
    """``gisaxs.spheres_histogram_paracrystal`` in the DWBA: params (B, 4) =
    HISTOGRAM_PARACRYSTAL_PARAMS, weights (B, K) number fractions on ``bins``. Returns (B, H, W)."""
    _check(params, len(HISTOGRAM_PARACRYSTAL_PARAMS), "spheres_histogram_paracrystal_dwba")
    dq = dq.to(params.dtype, params.device)
    dist, dis, i0, bkg = params.unbind(-1)
    r, w = bins.nodes(weights.to(params))
    fr, fi, f0 = dwba_amplitudes(sphere_amplitudes, dq, r[None])
    s = paracrystal_s(dq.q_par.reshape(-1), dist, dis * dist)
    return _finish(dq, decoupling(fr, fi, w, s, f0), i0, bkg)
