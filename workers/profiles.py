"""Area-normalised peak profiles, backgrounds and the compiled peak model.

Every profile is parameterised by its centre (1/nm), a width (FWHM, 1/nm), its area
(integrated intensity, intensity x 1/nm) and, where needed, a shape parameter:

===================  ========================================  =========================
shape                parameters (in this order)                 formula
===================  ========================================  =========================
gaussian             center, fwhm, area                         A sqrt(4 ln2/pi)/w exp(-4 ln2 d^2/w^2)
lorentzian           center, fwhm, area                         A (2/(pi w)) / (1 + 4 d^2/w^2)
pseudo_voigt         center, fwhm, area, eta                    eta L + (1 - eta) G, shared FWHM
pseudo_voigt_tch     center, fwhm_g, area, fwhm_l               Thompson, Cox & Hastings,
                                                                J. Appl. Cryst. 20, 79 (1987)
voigt                center, fwhm_g, area, fwhm_l               A Re w(z) / (s sqrt(2 pi)),
                                                                z = (d + i g) / (s sqrt 2),
                                                                s = fwhm_g/(2 sqrt(2 ln2)), g = fwhm_l/2
===================  ========================================  =========================

with d = x - center. The Faddeeva function w(z) is Weideman's rational approximation
(SIAM J. Numer. Anal. 31, 1497 (1994)) with 32 terms: |error| / |w| < 1e-12 in the upper half
plane, differentiable, on the tensors' device. Its derivative is analytic: w'(z) = -2 z w + 2i/sqrt(pi).

Backgrounds: polynomial sum_k b_k u^k in the reduced coordinate u = (x - x0) / xs (x0, xs: centre
and half-width of the fitted range, for conditioning), or power law A (x/x0)^-n + c.

All functions return values and analytic Jacobians; ``PeakModel.evaluate`` is a plain
differentiable function, so ``torch.func.jacfwd`` serves as the general fallback
(``jacobian="autodiff"``).
"""
from __future__ import annotations

import math
import numpy as np
import torch

from workers.specs import SHAPE_PARAMS, BackgroundSpec, ModelSpec, PeakSpec, Shape, validate_model_spec  # noqa: F401

WIDTH_PARAMS = ("fwhm", "fwhm_g", "fwhm_l")

_LN2 = math.log(2.0)
_GK = math.sqrt(4.0 * _LN2 / math.pi)          # Gaussian normalisation for FWHM = 1
_G4 = 4.0 * _LN2
_SQPI = math.sqrt(math.pi)
_S_OF_FG = 1.0 / (2.0 * math.sqrt(2.0 * _LN2))  # sigma = fwhm_g * _S_OF_FG
_TCH = (1.0, 2.69269, 2.42843, 4.47163, 0.07842, 1.0)
_ETA = (1.36603, -0.47719, 0.11116)


# --------------------------------------------------------------------------------------------
# Faddeeva function
def _weideman_coefficients(n: int = 32) -> tuple[np.ndarray, float]:
    """Coefficients a_n and L of Weideman's (1994) rational approximation of w(z)."""
    m = 2 * n
    k = np.arange(-m + 1, m)
    L = math.sqrt(n / math.sqrt(2.0))
    t = L * np.tan(k * np.pi / m / 2.0)
    f = np.concatenate([[0.0], np.exp(-t ** 2) * (L ** 2 + t ** 2)])
    a = np.real(np.fft.fft(np.fft.fftshift(f))) / (2 * m)
    return np.flipud(a[1:n + 1]).copy(), L


_WEIDEMAN_A, _WEIDEMAN_L = _weideman_coefficients(32)


def faddeeva(z: torch.Tensor) -> torch.Tensor:
    """Faddeeva w(z) = exp(-z^2) erfc(-iz) for Im z >= 0 (complex tensor, any shape).

    Weideman (1994): w(z) ~ 2 P(Z) / (L - iz)^2 + 1 / (sqrt(pi) (L - iz)), Z = (L + iz)/(L - iz),
    P a degree-31 polynomial. Differentiable by autograd (complex) and analytically via
    ``faddeeva_derivative``.
    """
    L = _WEIDEMAN_L
    iz = 1j * z
    den = L - iz
    Z = (L + iz) / den
    p = torch.zeros_like(z)
    for a in _WEIDEMAN_A:
        p = p * Z + float(a)
    return 2.0 * p / (den * den) + (1.0 / _SQPI) / den


def faddeeva_derivative(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w'(z) = -2 z w(z) + 2i / sqrt(pi)."""
    return -2.0 * z * w + (2j / _SQPI)


# --------------------------------------------------------------------------------------------
# Profiles. Each takes x (N,) and parameter columns (B, 1) and returns (value (B, N), derivs)
# with derivs a list of (B, N) tensors d value / d param in parameter order (None if jac=False).
# ``scale`` (B, N), optional, multiplies value and derivatives (the fit passes 1/sigma).
def gaussian(x, c, w, a, scale=None, jac=True):
    """Area-normalised Gaussian A sqrt(4 ln2/pi)/w exp(-4 ln2 (x-c)^2/w^2)."""
    iw = 1.0 / w
    u = (x - c) * iw
    g1 = (_GK * iw) * torch.exp(-_G4 * u * u)
    if scale is not None:
        g1 = g1 * scale
    g = a * g1
    if not jac:
        return g, None
    gu = g * u
    return g, [gu * (2.0 * _G4 * iw), (2.0 * _G4 * gu * u - g) * iw, g1]


def lorentzian(x, c, w, a, scale=None, jac=True):
    """Area-normalised Lorentzian A (2/(pi w)) / (1 + 4 (x-c)^2/w^2)."""
    d = x - c
    d2 = 4.0 * d * d
    iden = 1.0 / (w * w + d2)
    l1 = ((2.0 / math.pi) * w) * iden
    if scale is not None:
        l1 = l1 * scale
    l = a * l1
    if not jac:
        return l, None
    li = l * iden
    return l, [8.0 * li * d, li * (d2 - w * w) / w, l1]


def pseudo_voigt(x, c, w, a, eta, scale=None, jac=True):
    """eta L + (1 - eta) G with a shared FWHM w; derivs (c, w, area, eta)."""
    g, jg = gaussian(x, c, w, a, scale, jac)
    l, jl = lorentzian(x, c, w, a, scale, jac)
    v = g + eta * (l - g)
    if not jac:
        return v, None
    return v, [jg[k] + eta * (jl[k] - jg[k]) for k in range(3)] + [l - g]


_SQG4 = math.sqrt(_G4)


def pseudo_voigt_into(x, c, w, a, eta, scale, f, jo):
    """Fused pseudo_voigt with its Jacobian, written in place: the fit's fast path.

    x (N,); c, w, a, eta (B, 1), or (B, K, 1) for K peaks at once; scale (B, N) or (B, 1, N) or
    None; f (B, N) += value * scale (summed over the K peaks); jo (B, 4, N) or (B, K, 4, N) (a
    view into the model Jacobian) = d value / d (c, w, area, eta) * scale.
    One pass shares the intermediates (``pseudo_voigt`` is the plain reference): with
    s = sqrt(4 ln2) (x - c)/w, h = s^2, R = 1/(h + ln2), G = GK/w e^-h, L = (2/(pi w)) ln2 R:
      d/dA = (1 - eta) G + eta L,  d/deta = A (L - G),
      d/dc = s 2 sqrt(4 ln2)/w [Ag + Al R],  d/dw = (1/w) [Ag (2h - 1) + Al (1 - 2 ln2 R)],
    with Ag = A (1 - eta) G, Al = A eta L: 18 elementwise passes over (B, K, N), one per peak into f.
    """
    iw = 1.0 / w
    k = _SQG4 * iw
    s = torch.addcmul(-c * k, x, k)                              # sqrt(4 ln2) (x - c) / w
    hn = torch.addcmul(x.new_zeros(()), s, s, value=-1.0)        # -h
    e = torch.exp(hn)
    t = torch.sub(hn, 0.25 * _G4)                                # -1/R
    if scale is not None:
        e.mul_(scale)
        r2n = torch.div(scale, t)                                # -R (times scale)
    else:
        r2n = t.reciprocal()
    rr = torch.div(r2n, t)                                       # R^2 (times scale)
    gk, cl = _GK * iw, (0.5 * _G4 / math.pi) * iw                # G = gk e, L = cl R
    cg, cll = a * (1.0 - eta) * gk, a * eta * cl                 # Ag = cg e, Al = cll R
    jc, jw, ja, je = jo.unbind(-2)
    torch.mul(e, (1.0 - eta) * gk, out=ja)
    ja.addcmul_(r2n, -eta * cl)
    if ja.dim() == f.dim():
        f.addcmul_(ja, a)
    else:
        for i in range(ja.shape[1]):
            f.addcmul_(ja[:, i], a[:, i])
    torch.mul(r2n, -a * cl, out=je)
    je.addcmul_(e, -a * gk)
    torch.mul(e, (2.0 * _SQG4) * iw * cg, out=jc)
    jc.addcmul_(rr, (2.0 * _SQG4) * iw * cll)
    jc.mul_(s)
    torch.mul(e, -iw * cg, out=jw)
    jw.addcmul_(hn, jw, value=2.0)                               # (1 - 2h) e (-cg / w)
    jw.addcmul_(r2n, -iw * cll)
    jw.addcmul_(rr, (-0.5 * _G4) * iw * cll)


def tch_fwhm_eta(fg, fl):
    """Thompson-Cox-Hastings total FWHM and mixing eta, with their derivatives.

    Returns (gamma, eta, dgamma/dfg, dgamma/dfl, deta/dfg, deta/dfl).
    """
    c0, c1, c2, c3, c4, c5 = _TCH
    q = (c0 * fg ** 5 + c1 * fg ** 4 * fl + c2 * fg ** 3 * fl ** 2 + c3 * fg ** 2 * fl ** 3
         + c4 * fg * fl ** 4 + c5 * fl ** 5)
    dq_g = (5 * c0 * fg ** 4 + 4 * c1 * fg ** 3 * fl + 3 * c2 * fg ** 2 * fl ** 2
            + 2 * c3 * fg * fl ** 3 + c4 * fl ** 4)
    dq_l = (c1 * fg ** 4 + 2 * c2 * fg ** 3 * fl + 3 * c3 * fg ** 2 * fl ** 2
            + 4 * c4 * fg * fl ** 3 + 5 * c5 * fl ** 4)
    gam = q ** 0.2
    den = 5.0 * gam ** 4
    dgam_g, dgam_l = dq_g / den, dq_l / den
    rho = fl / gam
    e1, e2, e3 = _ETA
    eta = e1 * rho + e2 * rho ** 2 + e3 * rho ** 3
    deta_drho = e1 + 2 * e2 * rho + 3 * e3 * rho ** 2
    drho_g = -fl / gam ** 2 * dgam_g
    drho_l = 1.0 / gam - fl / gam ** 2 * dgam_l
    return gam, eta, dgam_g, dgam_l, deta_drho * drho_g, deta_drho * drho_l


def pseudo_voigt_tch(x, c, fg, a, fl, scale=None, jac=True):
    """TCH pseudo-Voigt; params (c, fwhm_g, area, fwhm_l), chain rule through Gamma and eta."""
    gam, eta, dgg, dgl, deg, del_ = tch_fwhm_eta(fg, fl)
    v, j = pseudo_voigt(x, c, gam, a, eta, scale, jac)
    if not jac:
        return v, None
    return v, [j[0], j[1] * dgg + j[3] * deg, j[2], j[1] * dgl + j[3] * del_]


def voigt(x, c, fg, a, fl, scale=None, jac=True):
    """Voigt profile V = A Re w(z) / (s sqrt(2 pi)); params (c, fwhm_g, area, fwhm_l).

    z = (x - c + i g) / (s sqrt 2), s = fwhm_g / (2 sqrt(2 ln 2)), g = fwhm_l / 2.
    Derivatives from w'(z) = -2 z w + 2i/sqrt(pi).
    """
    s = fg * _S_OF_FG
    k = 1.0 / (s * math.sqrt(2.0))
    re = (x - c) * k
    z = torch.complex(re, (0.5 * fl * k).expand_as(re))
    w = faddeeva(z)
    norm = 1.0 / (s * math.sqrt(2.0 * math.pi))
    if scale is not None:
        norm = norm * scale
    v1 = w.real * norm
    v = a * v1
    if not jac:
        return v, None
    wp = faddeeva_derivative(z, w)
    an = a * norm
    dc = -an * wp.real * k
    dfl = -an * wp.imag * k * 0.5            # Re(w' i k / 2) = -Im(w') k / 2
    dfg = (-an * (wp * z).real / s - v / s) * _S_OF_FG    # dz/ds = -z/s
    return v, [dc, dfg, v1, dfl]


def voigt_fwhm(fg, fl):
    """Olivero & Longbothum (1977) Voigt FWHM (0.02 % accuracy) and derivatives."""
    r = torch.sqrt(0.2166 * fl * fl + fg * fg)
    return 0.5346 * fl + r, fg / r, 0.5346 + 0.2166 * fl / r

PROFILE_FUNCS = {
    "gaussian": gaussian,
    "lorentzian": lorentzian,
    "pseudo_voigt": pseudo_voigt,
    "pseudo_voigt_tch": pseudo_voigt_tch,
    "voigt": voigt,
}


def profile(shape: str, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Evaluate one profile: x (N,), params (B, n_par) -> (B, N)."""
    cols = [params[:, i:i + 1] for i in range(params.shape[1])]
    return PROFILE_FUNCS[shape](x, *cols, jac=False)[0]


def peak_fwhm(shape: str, params: torch.Tensor) -> torch.Tensor:
    """Total FWHM (1/nm) of peaks params (..., n_par)."""
    if shape in ("gaussian", "lorentzian", "pseudo_voigt"):
        return params[..., 1]
    if shape == "pseudo_voigt_tch":
        return tch_fwhm_eta(params[..., 1], params[..., 3])[0]
    return voigt_fwhm(params[..., 1], params[..., 3])[0]


# --------------------------------------------------------------------------------------------
# Compiled model
_ETA_HEIGHT = {"gaussian": _GK, "lorentzian": 2.0 / math.pi}   # peak height x FWHM / area


class PeakModel:
    """A ModelSpec compiled to a flat parameter vector.

    Layout: each peak's parameters in ``SHAPE_PARAMS`` order, peaks in spec order, then the
    background (polynomial b0..bd, or power law amplitude, exponent, constant).
    ``fix_eta=True`` keeps pseudo_voigt's eta at PeakSpec.eta (not fitted).
    """

    def __init__(self, spec: ModelSpec, *, fix_eta: bool = False):
        validate_model_spec(spec)
        self.spec = spec
        names, slices, free, reg = [], [], [], []
        i = 0
        for pk in spec.peaks:
            pn = SHAPE_PARAMS[pk.shape]
            slices.append(slice(i, i + len(pn)))
            for j, n in enumerate(pn):
                names.append(f"{pk.name}.{n}")
                free.append(not (fix_eta and n == "eta"))
                if n == "center" or n in WIDTH_PARAMS:
                    reg.append(i + j)
            i += len(pn)
        bg = spec.background
        bn = ([f"background.b{k}" for k in range(bg.degree + 1)] if bg.kind == "polynomial"
              else ["background.amplitude", "background.exponent", "background.constant"])
        self.bg_slice = slice(i, i + len(bn))
        self.names = tuple(names + bn)
        self.free = tuple(free + [True] * len(bn))
        self.peak_slices = tuple(slices)
        self.reg_index = tuple(reg)       # parameters the temporal penalty acts on
        self.n_params = len(self.names)

    def bind(self, x: torch.Tensor) -> "BoundModel":
        """Fix the radial grid x (N,), 1/nm (ascending) and return the evaluable model."""
        return BoundModel(self, x)


class BoundModel:
    """A PeakModel on a fixed grid x (N,). Bounds: (P,) tensors, +-inf where unbounded."""

    def __init__(self, model: PeakModel, x: torch.Tensor):
        if x.dim() != 1 or x.numel() < model.n_params + 1:
            raise ValueError(f"x must be 1D with more than {model.n_params} points, got shape {tuple(x.shape)}")
        self.model, self.x = model, x
        xn = x.detach().cpu().double().numpy()
        xmin, xmax = float(xn.min()), float(xn.max())
        self.x0, self.xs = 0.5 * (xmin + xmax), max(0.5 * (xmax - xmin), 1e-12)
        dx = float(np.median(np.abs(np.diff(xn)))) if xn.size > 1 else 1.0
        self.dx = dx
        bg = model.spec.background
        if bg.kind == "polynomial":
            u = (x - self.x0) / self.xs
            self.vander = torch.stack([u ** k for k in range(bg.degree + 1)], dim=-1)   # (N, d+1)
        else:
            self.xr = x / self.x0
            self.logxr = torch.log(self.xr)
        lo, hi = [], []
        span = xmax - xmin
        for pk in model.spec.peaks:
            for n in SHAPE_PARAMS[pk.shape]:
                if n == "center":
                    lo.append(max(pk.center_min, xmin) if pk.center_min is not None else xmin)
                    hi.append(min(pk.center_max, xmax) if pk.center_max is not None else xmax)
                elif n in ("fwhm", "fwhm_g"):
                    lo.append(pk.fwhm_min if pk.fwhm_min is not None else 0.05 * dx)
                    hi.append(pk.fwhm_max if pk.fwhm_max is not None else span)
                elif n == "fwhm_l":
                    lo.append(0.0)
                    hi.append(pk.fwhm_max if pk.fwhm_max is not None else span)
                elif n == "area":
                    lo.append(0.0); hi.append(math.inf)
                elif n == "eta":
                    lo.append(0.0); hi.append(1.0)
        if bg.kind == "polynomial":
            lo += [-math.inf] * (bg.degree + 1); hi += [math.inf] * (bg.degree + 1)
        else:
            lo += [0.0, -math.inf, -math.inf]; hi += [math.inf] * 3
        kw = dict(dtype=x.dtype, device=x.device)
        self.lower, self.upper = torch.tensor(lo, **kw), torch.tensor(hi, **kw)
        self.free = torch.tensor(model.free, device=x.device)
        self.n_params = model.n_params
        # (shape, parameter slice, number of peaks): consecutive pseudo_voigt peaks are evaluated
        # together by evaluate_and_jacobian, every other peak alone
        groups = []
        for pk, sl in zip(model.spec.peaks, model.peak_slices):
            if pk.shape == "pseudo_voigt" and groups and groups[-1][0] == "pseudo_voigt":
                groups[-1] = ("pseudo_voigt", slice(groups[-1][1].start, sl.stop), groups[-1][2] + 1)
            else:
                groups.append((pk.shape, sl, 1))
        self._groups = tuple(groups)

    # ---- evaluation
    def evaluate_and_jacobian(self, p: torch.Tensor, scale: torch.Tensor | None = None,
                              jac: bool = True, *, out: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """p (B, P) -> model (B, N) and analytic Jacobian d model / d p laid out (B, P, N).

        scale (B, N), optional, multiplies both (the fit passes the weights 1/sigma).
        out (B, P, N), optional: the Jacobian is written there and returned (a workspace the
        fit reuses across iterations). jac=False is the plain differentiable evaluation.
        """
        if not jac:
            return self._evaluate_plain(p, scale), None
        if torch.is_grad_enabled() and (p.requires_grad or (scale is not None and scale.requires_grad)):
            f, j = self.evaluate_reference(p, scale)        # in-place writes do not differentiate
            return f, (j if out is None else out.copy_(j))
        B, N = p.shape[0], self.x.shape[0]
        jo = torch.empty(B, self.n_params, N, dtype=p.dtype, device=p.device) if out is None else out
        bs = self.model.bg_slice
        if self.model.spec.background.kind == "polynomial":
            f = p[:, bs] @ self.vander.T
            if scale is None:
                jo[:, bs].copy_(self.vander.T)
            else:
                f.mul_(scale)
                torch.mul(self.vander.T, scale[:, None, :], out=jo[:, bs])
        else:
            f, jb = self._background(p[:, bs], scale, True)
            for k, col in enumerate(jb):
                jo[:, bs.start + k].copy_(col)
        for shape, sl, n in self._groups:
            if shape == "pseudo_voigt":      # n peaks in one pass: params (B, n, 4), jo (B, n, 4, N)
                q = p[:, sl].unflatten(1, (n, 4))
                pseudo_voigt_into(self.x, *(q[..., i:i + 1] for i in range(4)),
                                  None if scale is None else scale[:, None], f, jo[:, sl].unflatten(1, (n, 4)))
                continue
            v, j = PROFILE_FUNCS[shape](self.x, *(p[:, i:i + 1] for i in range(sl.start, sl.stop)),
                                        scale=scale, jac=True)
            f.add_(v)
            for k, col in enumerate(j):
                jo[:, sl.start + k].copy_(col)
        return f, jo

    def _evaluate_plain(self, p, scale=None):
        f = None
        for pk, sl in zip(self.model.spec.peaks, self.model.peak_slices):
            cols = [p[:, i:i + 1] for i in range(sl.start, sl.stop)]
            v, _ = PROFILE_FUNCS[pk.shape](self.x, *cols, scale=scale, jac=False)
            f = v if f is None else f + v
        b, _ = self._background(p[:, self.model.bg_slice], scale, False)
        return b if f is None else f + b

    def evaluate_reference(self, p: torch.Tensor, scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain reference of evaluate_and_jacobian: per-shape value and derivative lists,
        stacked (STYLE rule 7; tests compare the two in float64)."""
        f, cols_all = None, []
        for pk, sl in zip(self.model.spec.peaks, self.model.peak_slices):
            cols = [p[:, i:i + 1] for i in range(sl.start, sl.stop)]
            v, j = PROFILE_FUNCS[pk.shape](self.x, *cols, scale=scale, jac=True)
            f = v if f is None else f + v
            cols_all += j
        b, jb = self._background(p[:, self.model.bg_slice], scale, True)
        f = b if f is None else f + b
        return f, torch.stack(cols_all + jb, dim=1)

    def evaluate(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, P) -> model (B, N); plain differentiable function (used with jacfwd)."""
        return self.evaluate_and_jacobian(p, jac=False)[0]

    def _background(self, pb, scale, jac):
        B = pb.shape[0]
        if self.model.spec.background.kind == "polynomial":
            f = pb @ self.vander.T
            if scale is not None:
                f = f * scale
            if not jac:
                return f, None
            vt = self.vander.T.expand(B, -1, -1)
            return f, list((vt * scale[:, None, :] if scale is not None else vt).unbind(1))
        amp, n, c = pb[:, 0:1], pb[:, 1:2], pb[:, 2:3]
        pw = torch.exp(-n * self.logxr)
        if scale is not None:
            pw1 = pw * scale
            f = amp * pw1 + c * scale
        else:
            pw1, f = pw, amp * pw + c
        if not jac:
            return f, None
        one = scale if scale is not None else torch.ones_like(pw)
        return f, [pw1, -amp * self.logxr * pw1, one.expand_as(pw1)]

    # ---- initial guesses
    def _edge_background(self, y: torch.Tensor) -> torch.Tensor:
        """Straight line through the medians of the outer 5 % on each side: (B, N)."""
        N = y.shape[-1]
        k = max(3, N // 20)
        yl, yr = y[:, :k].median(dim=1).values, y[:, -k:].median(dim=1).values
        xl, xr = self.x[:k].mean(), self.x[-k:].mean()
        slope = (yr - yl) / (xr - xl)
        return yl[:, None] + slope[:, None] * (self.x - xl), yl, yr, slope

    def guess(self, y: torch.Tensor, *, search: bool = False) -> torch.Tensor:
        """Initial parameters (B, P) from the PeakSpecs; areas left None estimated from y (B, N).

        search=True re-seeds the centres by a peak search: the argmax of the 3-point smoothed,
        background-subtracted data inside [center_min, center_max] (or centre +- 2 FWHM).
        """
        B = y.shape[0]
        y = torch.nan_to_num(y)
        line, yl, yr, slope = self._edge_background(y)
        resid = y - line
        sm = torch.nn.functional.avg_pool1d(resid[:, None], 3, stride=1, padding=1,
                                            count_include_pad=False)[:, 0]
        p = torch.zeros(B, self.n_params, dtype=self.x.dtype, device=self.x.device)
        for pk, sl in zip(self.model.spec.peaks, self.model.peak_slices):
            c = torch.full((B,), pk.center, dtype=self.x.dtype, device=self.x.device)
            lo = pk.center_min if pk.center_min is not None else pk.center - 2 * pk.fwhm
            hi = pk.center_max if pk.center_max is not None else pk.center + 2 * pk.fwhm
            inwin = (self.x >= lo) & (self.x <= hi)
            near = inwin if search else (self.x >= pk.center - pk.fwhm) & (self.x <= pk.center + pk.fwhm)
            if not bool(near.any()):
                near = inwin if bool(inwin.any()) else torch.ones_like(inwin)
            masked = torch.where(near, sm, torch.full_like(sm, -math.inf))
            h, idx = masked.max(dim=1)
            if search:
                c = self.x[idx]
            h = h.clamp_min(0.0)
            eta = pk.eta
            if pk.shape == "pseudo_voigt":
                hk = eta * _ETA_HEIGHT["lorentzian"] + (1 - eta) * _ETA_HEIGHT["gaussian"]
            else:
                hk = _ETA_HEIGHT.get(pk.shape, 0.8)
            area = h * pk.fwhm / hk if pk.area is None else torch.full_like(h, pk.area)
            cols = {"center": c, "fwhm": torch.full_like(c, pk.fwhm), "area": area,
                    "eta": torch.full_like(c, eta), "fwhm_g": torch.full_like(c, 0.8 * pk.fwhm),
                    "fwhm_l": torch.full_like(c, 0.3 * pk.fwhm)}
            for j, n in enumerate(SHAPE_PARAMS[pk.shape]):
                p[:, sl.start + j] = cols[n]
        bg = self.model.spec.background
        if bg.kind == "polynomial":
            p[:, self.model.bg_slice.start] = yl + slope * (self.x0 - self.x[: max(3, y.shape[-1] // 20)].mean())
            if bg.degree >= 1:
                p[:, self.model.bg_slice.start + 1] = slope * self.xs
        else:
            c0 = 0.5 * torch.minimum(yl, yr)
            xl = self.x[: max(3, y.shape[-1] // 20)].mean()
            p[:, self.model.bg_slice] = torch.stack(((yl - c0).clamp_min(0) * xl / self.x0,
                                               torch.ones_like(yl), c0), dim=-1)
        return self.clip(p)

    def clip(self, p: torch.Tensor) -> torch.Tensor:
        """Clamp p (B, P) into the bounds, a hair inside finite ones."""
        lo, hi = self.lower, self.upper
        span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
        eps = 1e-6 * span
        return torch.minimum(torch.maximum(p, lo + eps), hi - eps)

    # ---- reporting
    def summarize(self, p: torch.Tensor, cov: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per peak: center, fwhm (total), area, eta and standard errors (delta method).

        p (B, P), cov (B, P, P). eta: 0 Gaussian, 1 Lorentzian, fitted (pseudo_voigt), TCH eta
        (pseudo_voigt_tch; also reported for voigt as its pseudo-Voigt equivalent).
        """
        out = []
        var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0)
        for pk, sl in zip(self.model.spec.peaks, self.model.peak_slices):
            i0 = sl.start
            d = {"center": p[:, i0], "center_err": var[:, i0].sqrt(),
                 "area": p[:, i0 + 2], "area_err": var[:, i0 + 2].sqrt()}
            if pk.shape in ("gaussian", "lorentzian", "pseudo_voigt"):
                d["fwhm"], d["fwhm_err"] = p[:, i0 + 1], var[:, i0 + 1].sqrt()
                d["eta"] = (p[:, i0 + 3] if pk.shape == "pseudo_voigt" else
                            torch.full_like(p[:, i0], 0.0 if pk.shape == "gaussian" else 1.0))
            else:
                fg, fl = p[:, i0 + 1], p[:, i0 + 3]
                gam, eta, dgg, dgl, _, _ = tch_fwhm_eta(fg, fl)
                if pk.shape == "voigt":
                    gam, dgg, dgl = voigt_fwhm(fg, fl)
                g = torch.stack((dgg, dgl), -1)
                ix = torch.tensor([i0 + 1, i0 + 3], device=p.device)
                sub = cov[:, ix][:, :, ix]
                d["fwhm"] = gam
                d["fwhm_err"] = torch.einsum("bi,bij,bj->b", g, sub, g).clamp_min(0).sqrt()
                d["eta"] = eta
            out.append(d)
        return out


def resample_profile(q: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                     grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A profile on q (N,) increasing, 1/nm, resampled at `grid` (M,): linear interpolation
    between the two neighbouring points, I = (1-t) I_i + t I_(i+1), with independent errors
    propagated, sigma^2 = (1-t)^2 sigma_i^2 + t^2 sigma_(i+1)^2. Outside [q_0, q_(N-1)] (no
    extrapolation) and next to a NaN point both are NaN, which fits weight 0. Returns float64."""
    q = np.asarray(q, np.float64)
    grid = np.asarray(grid, np.float64)
    intensity, sigma = np.asarray(intensity, np.float64), np.asarray(sigma, np.float64)
    i = np.clip(np.searchsorted(q, grid, side="right") - 1, 0, len(q) - 2)
    t = (grid - q[i]) / (q[i + 1] - q[i])
    out_i = (1 - t) * intensity[i] + t * intensity[i + 1]
    out_s = np.sqrt((1 - t) ** 2 * sigma[i] ** 2 + t ** 2 * sigma[i + 1] ** 2)
    outside = (grid < q[0]) | (grid > q[-1])
    out_i[outside] = np.nan
    out_s[outside] = np.nan
    return out_i, out_s
