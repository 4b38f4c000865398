"""Differentiable SAXS forward models, batched over parameter sets: params (B, P) -> I (B, N).

q in 1/nm, lengths in nm. Formulas: PHYSICS.md "SAXS models" (sasmodels ``sphere``,
``hardsphere``, ``guinier``, ``porod``, ``doc/guide/pd/polydispersity.rst``).

Sphere with Schulz polydispersity, analytic average (no quadrature)
------------------------------------------------------------------
Number distribution of radii: Schulz = Gamma(k, theta) with k = 1/p^2, theta = R/k (mean R,
relative width p = sigma_R/R); PHYSICS.md's z = k - 1. The form-factor amplitude of a sphere is
V Phi(qr) = 4 pi (sin qr - qr cos qr) / q^3, so

    <V^2 Phi^2> = 16 pi^2 / q^6 <(sin x - x cos x)^2>,   x = q r
    (sin x - x cos x)^2 = 1/2 - cos(2x)/2 - x sin 2x + x^2/2 + x^2 cos(2x)/2

and every average follows from the Gamma characteristic function,
E[r^n exp(i t r)] = theta^n (k)_n (1 - i t theta)^-(k+n) with t = 2q ((k)_n: rising factorial;
Kotlarchyk & Chen, J. Chem. Phys. 79, 2461 (1983)). The sum cancels to O(x^6) at small q, so
it is evaluated in float64 whatever the input dtype, and below q R = TAYLOR_CUT by the moment
series sum_m c_m q^(2m-6) <r^2m> instead. The normalised form factor is
P(q) = <V^2 Phi^2>(q) / <V^2>, P(0) = 1.

sasmodels instead sums over 80 equally spaced radii within +-8 sigma (``weights.py``,
SchulzDispersion defaults ``npts=80, nsigmas=8``, weights normalised). That sum equals the
integral while the node spacing 0.2 sigma resolves cos(2 q r): for q sigma_R <~ 8; beyond that
sasmodels aliases (e.g. R = 25 nm, p = 0.3 at q > 1 1/nm), this model does not.

Hard-sphere structure factor: Percus-Yevick (sasmodels ``hardsphere.c``, X = 2 q R_eff; a 7-term
series below X = 1 instead of sasmodels' 3 terms below 0.05), with R_eff = <r> = R (sasmodels
``radius_effective_mode=1``: number-weighted mean radius) and the volume fraction phi.

``sphere_hs``: I(q) = i0 P(q) S(q; R, phi) + background, parameters SPHERE_HS_PARAMS. It is
sasmodels ``sphere@hardsphere`` (structure_factor_mode 0 = P*S, radius_effective_mode 1) with
i0 = scale * volfraction * 1e-4 * drho^2 * <V^2>/<V> (V in A^3, drho in 1e-6/A^2, I in 1/cm):
the dilute forward intensity.

Models for samples hard spheres cannot describe (issue 28), each a sum of basis functions with
non-negative linear amplitudes plus a background:

``powerlaw_spheres``: I(q) = i0 P(q; R, pd) + power_scale q^-power + background: dilute Schulz
spheres (no S(q)) and a low-q power law (aggregates, large-scale interfaces). It is sasmodels
``power_law+sphere`` with A_scale = power_scale 10^-power (q in 1/A there) and B_scale =
i0 / (1e-4 drho^2 <V^2>/<V>).

``unified_level``: one Beaucage level (Beaucage, J. Appl. Cryst. 28, 717 (1995), eq. 10 with k = 1):
I(q) = G exp(-q^2 Rg^2 / 3) + B [erf(q Rg / sqrt 6)^3 / q]^P + background. It is sasmodels
``unified_power_Rg`` with level = 1, G the same, B(1/nm units) = B(sasmodels) 10^P.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

SPHERE_HS_PARAMS = ("radius", "pd", "volfraction", "i0", "background")
GUINIER_PARAMS = ("i0", "rg", "background")
POROD_PARAMS = ("porod_constant", "background")
POWERLAW_SPHERES_PARAMS = ("radius", "pd", "power", "i0", "power_scale", "background")
UNIFIED_LEVEL_PARAMS = ("rg", "power", "G", "B", "background")

TAYLOR_CUT = 0.3          # q R below which the moment series replaces the analytic average
_N_TAYLOR = 9             # terms m = 3 .. 3 + _N_TAYLOR - 1 of (sin x - x cos x)^2 = sum c_m x^2m


def _series_coefficients(n_terms: int) -> list[float]:
    """c_m, m = 3.., of (sin x - x cos x)^2 = sum_m c_m x^(2m), exact rationals then float.

    sin x - x cos x = sum_{j>=1} (-1)^(j+1) 2j / (2j+1)! x^(2j+1).
    """
    a = {j: Fraction((-1) ** (j + 1) * 2 * j, math.factorial(2 * j + 1)) for j in range(1, n_terms + 2)}
    out = []
    for m in range(3, 3 + n_terms):          # x^(2m) = x^(2i+1) x^(2j+1), i + j = m - 1
        out.append(float(sum(a[i] * a[m - 1 - i] for i in range(1, m - 1))))
    return out


_C = _series_coefficients(_N_TAYLOR)


def _check(q: torch.Tensor, params: torch.Tensor, n_params: int, name: str) -> None:
    if q.dim() != 1:
        raise ValueError(f"{name}: q must be (N,), got shape {tuple(q.shape)}")
    if params.dim() != 2 or params.shape[-1] != n_params:
        raise ValueError(f"{name}: params must be (B, {n_params}), got shape {tuple(params.shape)}")


def _rising(k: torch.Tensor, n: int) -> torch.Tensor:
    """(k)_n = k (k+1) ... (k+n-1)."""
    out = torch.ones_like(k)
    for j in range(n):
        out = out * (k + j)
    return out


def schulz_moment(radius: torch.Tensor, pd: torch.Tensor, n: int) -> torch.Tensor:
    """<r^n> of the Schulz distribution with mean ``radius`` and relative width ``pd``."""
    k = 1.0 / (pd * pd)
    return (radius / k) ** n * _rising(k, n)


def sphere_schulz_form(q: torch.Tensor, radius: torch.Tensor, pd: torch.Tensor) -> torch.Tensor:
    """Normalised form factor P(q) = <V^2 Phi^2(q r)> / <V^2> of Schulz-distributed spheres.

    q: (N,) 1/nm; radius, pd: (B,) nm and relative width, pd > 0. Returns (B, N), P(0) = 1.
    Computed in float64, returned in the dtype of ``radius``.
    """
    dt = radius.dtype
    q64, r, p = q.to(torch.float64), radius.to(torch.float64)[:, None], pd.to(torch.float64)[:, None]
    k = 1.0 / (p * p)
    th = r / k
    m6 = schulz_moment(r, p, 6)
    small = q64 * r < TAYLOR_CUT
    # moment series: <(sin x - x cos x)^2> / q^6 = sum_i c_i (q^2)^i <r^(6+2i)>, Horner in q^2
    q2 = torch.where(small, q64 * q64, torch.zeros_like(q64))
    mom = [m6]
    for i in range(1, len(_C)):
        n = 4 + 2 * i
        mom.append(mom[-1] * th * th * (k + n) * (k + n + 1))
    ser = torch.zeros_like(q2)
    for c, mo in zip(reversed(_C), reversed(mom)):
        ser = ser * q2 + c * mo
    # analytic average through the characteristic function at t = 2q
    qa = torch.where(small, TAYLOR_CUT / r, q64)
    # 1/(1 - i a) = c e^(i phi), a = 2 q theta, c = (1 + a^2)^(-1/2), phi = atan(a); real arithmetic
    a = 2.0 * qa * th
    c2 = 1.0 / (1.0 + a * a)
    phi = torch.atan(a)
    mag = torch.exp(0.5 * k * torch.log(c2))                        # |E[exp(itr)]|
    re_e0 = mag * torch.cos(k * phi)                                 # Re E[exp(itr)]
    im_e1 = (th * k) * mag * torch.sqrt(c2) * torch.sin((k + 1) * phi)           # Im E[r exp(itr)]
    re_e2 = (th * th * k * (k + 1)) * mag * c2 * torch.cos((k + 2) * phi)       # Re E[r^2 exp(itr)]
    m2 = th * th * k * (k + 1)
    avg = 0.5 - 0.5 * re_e0 - qa * im_e1 + 0.5 * qa * qa * (m2 + re_e2)
    qa2 = qa * qa
    ana = avg / (qa2 * qa2 * qa2)
    out = 9.0 * torch.where(small, ser, ana) / m6
    return out.to(dt)


# 24 FF / X^2 = sum_k (a_k A + b_k B + g_k G) X^(2k): series of the three bracketed terms of
# hardsphere.c (computed with sympy; the first three are sasmodels' own Taylor coefficients)
_PY_SERIES = ((8.0, 6.0, 4.0), (-4 / 5, -2 / 3, -1 / 2), (1 / 35, 1 / 40, 1 / 50), (-1 / 1890, -1 / 2100, -1 / 2520),
              (1 / 166320, 1 / 181440, 1 / 211680), (-1 / 21621600, -1 / 23284800, -1 / 26611200),
              (1 / 3891888000, 1 / 4151347200, 1 / 4670265600))
PY_SERIES_CUT = 1.0       # X below which the series (to X^12, truncation < 1e-13) is used


def hard_sphere_py(q: torch.Tensor, r_eff: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Percus-Yevick hard-sphere S(q) (sasmodels hardsphere.c). q (N,), r_eff, phi (B,) -> (B, N).

    X = 2 q R_eff. Below X = PY_SERIES_CUT a 7-term series replaces the closed form, whose
    cancellation (relative error ~ eps / X^6) sasmodels limits with a 3-term series below
    X = 0.05; here values and gradients stay accurate to ~1e-13 for all X (float64).
    """
    f = phi[:, None]
    d = 1.0 / (1.0 - f) ** 2
    a = ((1.0 + 2.0 * f) * d) ** 2
    b = -6.0 * f * ((1.0 + 0.5 * f) * d) ** 2
    g = 0.5 * f * a
    x = (2.0 * q[None, :] * r_eff[:, None]).abs()
    small = x < PY_SERIES_CUT
    xs = torch.where(small, x, torch.zeros_like(x))
    x2 = xs * xs
    ser = torch.zeros_like(x2)
    for ca, cb, cg in reversed(_PY_SERIES):
        ser = ser * x2 + (ca * a + cb * b + cg * g)
    s_small = 1.0 / (1.0 + f * ser)
    xl = torch.where(small, torch.full_like(x, 2.0), x)
    x2 = xl * xl
    x4 = x2 * x2
    s, c = torch.sin(xl), torch.cos(xl)
    ff = ((g * ((4.0 * x2 - 24.0) * xl * s - (x4 - 12.0 * x2 + 24.0) * c + 24.0) / x2
           + b * (2.0 * xl * s - (x2 - 2.0) * c - 2.0)) / xl + a * (s - xl * c)) / xl
    s_large = 1.0 / (1.0 + 24.0 * f * ff / x2)
    return torch.where(small, s_small, s_large)


def sphere_hs(q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """I(q) = i0 P(q; R, pd) S_PY(q; R, phi) + background.

    q: (N,) 1/nm; params: (B, 5) = SPHERE_HS_PARAMS (radius nm, pd, volfraction, i0, background).
    Returns (B, N) in the units of i0.
    """
    _check(q, params, 5, "sphere_hs")
    r, pd, phi, i0, bkg = params.unbind(-1)
    form = sphere_schulz_form(q, r, pd)
    return i0[:, None] * form * hard_sphere_py(q, r, phi) + bkg[:, None]


def guinier(q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """I = i0 exp(-q^2 Rg^2 / 3) + background; params (B, 3) = GUINIER_PARAMS (Rg in nm)."""
    _check(q, params, 3, "guinier")
    i0, rg, bkg = params.unbind(-1)
    return i0[:, None] * torch.exp(-(q[None, :] * rg[:, None]) ** 2 / 3.0) + bkg[:, None]


def porod(q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """I = C / q^4 + background; params (B, 2) = POROD_PARAMS (C in intensity x nm^-4)."""
    _check(q, params, 2, "porod")
    c, bkg = params.unbind(-1)
    return c[:, None] / q[None, :] ** 4 + bkg[:, None]


def powerlaw_spheres_basis(q: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Basis of ``powerlaw_spheres``: shape (B, 3) = (radius nm, pd, power) -> (B, 2, N) =
    (P(q; R, pd), q^-power); q (N,) 1/nm, q > 0."""
    r, pd, m = shape.unbind(-1)
    form = sphere_schulz_form(q, r, pd)
    law = torch.exp(-m[:, None] * torch.log(q.to(shape.dtype))[None, :])
    return torch.stack([form, law], 1)


def powerlaw_spheres(q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """I = i0 P(q; R, pd) + power_scale q^-power + background; params (B, 6) = POWERLAW_SPHERES_PARAMS
    (radius nm, pd, power, i0, power_scale in intensity x nm^-power, background)."""
    _check(q, params, 6, "powerlaw_spheres")
    basis = powerlaw_spheres_basis(q, params[:, :3])
    return (params[:, 3:5, None] * basis).sum(1) + params[:, 5:6]


def unified_level_basis(q: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Basis of ``unified_level``: shape (B, 2) = (Rg nm, P) -> (B, 2, N) =
    (exp(-q^2 Rg^2 / 3), [erf(q Rg / sqrt 6)^3 / q]^P); q (N,) 1/nm, q > 0."""
    rg, m = shape.unbind(-1)
    x = q.to(shape.dtype)[None, :] * rg[:, None]
    guinier_term = torch.exp(-x * x / 3.0)
    qs = 3.0 * torch.log(torch.erf(x / math.sqrt(6.0)).clamp_min(1e-300)) - torch.log(q.to(shape.dtype))[None, :]
    return torch.stack([guinier_term, torch.exp(m[:, None] * qs)], 1)


def unified_level(q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One Beaucage level: I = G exp(-q^2 Rg^2/3) + B [erf(q Rg/sqrt 6)^3 / q]^P + background;
    params (B, 5) = UNIFIED_LEVEL_PARAMS (Rg nm, P, G, B in intensity x nm^-P, background)."""
    _check(q, params, 5, "unified_level")
    basis = unified_level_basis(q, params[:, :2])
    return (params[:, 2:4, None] * basis).sum(1) + params[:, 4:5]


# ---------------------------------------------------------------------------------------------
def sphere_schulz_form_reference(q: torch.Tensor, radius: float, pd: float, n: int = 4001,
                                 nsigma: float = 12.0) -> torch.Tensor:
    """Plain reference (STYLE rule 7): P(q) by a dense Riemann sum over the Schulz pdf, float64."""
    k = 1.0 / pd ** 2
    r = torch.linspace(max(1e-9, radius * (1 - nsigma * pd)), radius * (1 + nsigma * pd), n, dtype=torch.float64)
    logw = (k - 1) * torch.log(r / radius) - k * r / radius
    w = torch.exp(logw - logw.max())
    x = q.to(torch.float64)[:, None] * r[None, :]
    amp = torch.where(x < 1e-3, 1.0 - x * x / 10.0, 3.0 * (torch.sin(x) - x * torch.cos(x)) / x.clamp_min(1e-3) ** 3)
    v2 = r ** 6
    return (w * v2 * amp * amp).sum(-1) / (w * v2).sum()
