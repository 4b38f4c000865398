"""Peak profiles against analytic integrals/FWHM and scipy's Faddeeva/Voigt."""
import math

import numpy as np
import pytest
import torch
from scipy.special import voigt_profile, wofz

from workers.profiles import (SHAPE_PARAMS, BackgroundSpec, ModelSpec, PeakModel, PeakSpec,
                              faddeeva, peak_fwhm, profile, tch_fwhm_eta)

D = torch.float64
# tan-spaced grid from -400 to 400: dense at the peak, sparse in the Lorentzian tails
X = torch.tan(torch.linspace(-math.atan(400.0), math.atan(400.0), 100_001, dtype=D))


def _params(shape):
    return {"gaussian": [0.3, 0.7, 2.5], "lorentzian": [0.3, 0.7, 2.5],
            "pseudo_voigt": [0.3, 0.7, 2.5, 0.35], "pseudo_voigt_tch": [0.3, 0.5, 2.5, 0.4],
            "voigt": [0.3, 0.5, 2.5, 0.4]}[shape]


def _lorentz_inside(c, w, a=-400.0, b=400.0):
    """Analytic fraction of a Lorentzian (FWHM w, centre c) inside [a, b]."""
    return (math.atan(2 * (b - c) / w) - math.atan(2 * (a - c) / w)) / math.pi


@pytest.mark.parametrize("shape", list(SHAPE_PARAMS))
def test_profile_integrates_to_area(shape):
    p = torch.tensor([_params(shape)], dtype=D)
    area = torch.trapezoid(profile(shape, X, p)[0], X).item()
    c = 0.3
    if shape == "gaussian":
        expected = 2.5
    elif shape in ("lorentzian", "pseudo_voigt"):
        eta = 1.0 if shape == "lorentzian" else 0.35
        expected = 2.5 * (1 - eta + eta * _lorentz_inside(c, 0.7))
    elif shape == "pseudo_voigt_tch":
        gam, eta = (v.item() for v in tch_fwhm_eta(p[0, 1], p[0, 3])[:2])
        expected = 2.5 * (1 - eta + eta * _lorentz_inside(c, gam))
    else:   # Voigt: far tails are those of its Lorentzian component (fwhm_l)
        expected = 2.5 * _lorentz_inside(c, 0.4)
    assert area == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", list(SHAPE_PARAMS))
def test_profile_fwhm(shape):
    x = torch.linspace(-3, 3, 60_001, dtype=D)
    p = torch.tensor([_params(shape)], dtype=D)
    y = profile(shape, x, p)[0].numpy()
    xn = x.numpy()
    half = y.max() / 2
    i = np.nonzero(y >= half)[0]
    lo, hi = i[0], i[-1]        # linear interpolation of the half-maximum crossings
    xl = np.interp(half, [y[lo - 1], y[lo]], [xn[lo - 1], xn[lo]])
    xr = np.interp(half, [y[hi + 1], y[hi]], [xn[hi + 1], xn[hi]])
    fw = xr - xl
    expected = peak_fwhm(shape, p)[0].item()
    # TCH: exact by construction; Voigt: Olivero-Longbothum formula, 0.02 % accurate
    assert fw == pytest.approx(expected, rel=3e-4 if shape == "voigt" else 1e-6)
    if shape in ("gaussian", "lorentzian", "pseudo_voigt"):
        assert fw == pytest.approx(0.7, rel=1e-6)
    assert xn[int(np.argmax(y))] == pytest.approx(0.3, abs=1e-4)


def test_faddeeva_matches_scipy():
    xr = np.linspace(-40, 40, 801)
    yi = np.concatenate([[0.0], np.logspace(-8, 3, 45)])
    z = (xr[None, :] + 1j * yi[:, None]).ravel()
    w = faddeeva(torch.tensor(z)).numpy()
    ref = wofz(z)
    assert np.max(np.abs(w - ref) / np.abs(ref)) < 1e-6
    assert np.max(np.abs(w - ref) / np.abs(ref)) < 1e-11      # 32-term Weideman in float64


def test_voigt_matches_scipy_voigt_profile():
    x = np.linspace(-5, 5, 2001)
    for fg, fl in [(0.5, 0.4), (1.0, 1e-4), (1e-3, 0.8), (0.2, 2.0)]:
        sig, gam = fg / (2 * math.sqrt(2 * math.log(2))), fl / 2
        ref = 1.7 * voigt_profile(x - 0.1, sig, gam)
        ours = profile("voigt", torch.tensor(x), torch.tensor([[0.1, fg, 1.7, fl]], dtype=D))[0].numpy()
        assert np.max(np.abs(ours - ref)) / ref.max() < 1e-9


@pytest.mark.parametrize("bg", [BackgroundSpec("polynomial", 2), BackgroundSpec("power_law")])
def test_analytic_jacobian_matches_autodiff(bg):
    peaks = tuple(PeakSpec(f"p{i}", s, center=1.0 + i) for i, s in enumerate(SHAPE_PARAMS))
    model = PeakModel(ModelSpec(peaks, bg)).bind(torch.linspace(0.5, 6.0, 301, dtype=D))
    g = torch.Generator().manual_seed(0)
    p = model.guess(torch.rand(3, 301, generator=g, dtype=D) + 1.0)
    p = p + 0.01 * torch.rand(p.shape, generator=g, dtype=D)
    _, jac = model.evaluate_and_jacobian(p)
    jac = jac.transpose(1, 2)             # (B, N, P)
    auto = torch.func.vmap(torch.func.jacfwd(lambda q: model.evaluate(q[None])[0]))(p)
    assert torch.allclose(jac, auto, rtol=1e-7, atol=1e-9 * auto.abs().max())


def test_tch_eta_limits():
    g, e = tch_fwhm_eta(torch.tensor(1.0, dtype=D), torch.tensor(0.0, dtype=D))[:2]
    assert g.item() == pytest.approx(1.0) and e.item() == pytest.approx(0.0, abs=1e-12)
    g, e = tch_fwhm_eta(torch.tensor(1e-9, dtype=D), torch.tensor(1.0, dtype=D))[:2]
    assert g.item() == pytest.approx(1.0, rel=1e-6) and e.item() == pytest.approx(1.0, abs=1e-4)


def test_bad_spec_rejected():
    with pytest.raises(ValueError, match="shape"):
        PeakModel(ModelSpec((PeakSpec("a", "cauchy"),)))
    with pytest.raises(ValueError, match="-0.1"):
        PeakModel(ModelSpec((PeakSpec("a", fwhm=-0.1),)))
    with pytest.raises(ValueError, match="degree"):
        PeakModel(ModelSpec((PeakSpec("a"),), BackgroundSpec("polynomial", -1)))


@pytest.mark.parametrize("shape", list(SHAPE_PARAMS))
@pytest.mark.parametrize("scaled", [False, True])
def test_fast_jacobian_of_each_shape_matches_autograd(shape, scaled):
    """evaluate_and_jacobian (the fit's path: pseudo_voigt fused, written into a workspace)
    against torch.autograd's Jacobian of the plain evaluation, one peak + line, float64."""
    x = torch.linspace(-2.0, 3.0, 157, dtype=D)
    model = PeakModel(ModelSpec((PeakSpec("a", shape, center=0.3, fwhm=0.6),),
                                BackgroundSpec("polynomial", 1))).bind(x)
    g = torch.Generator().manual_seed(1)
    base = torch.tensor(_params(shape) + [1.0, -0.5], dtype=D)
    p = base * (1 + 0.2 * torch.rand(3, base.numel(), generator=g, dtype=D))
    scale = torch.rand(3, x.numel(), generator=g, dtype=D) + 0.5 if scaled else None
    work = torch.full((3, model.n_params + 1, x.numel()), math.nan, dtype=D)[:, :-1]   # strided, as the fit's
    f, jac = model.evaluate_and_jacobian(p, scale, out=work)
    assert jac.data_ptr() == work.data_ptr()
    for b in range(3):
        def fb(q):
            v = model.evaluate(q[None])[0]
            return v if scale is None else v * scale[b]
        auto = torch.autograd.functional.jacobian(fb, p[b])           # (N, P)
        # voigt: the analytic w'(z) = -2 z w + 2i/sqrt(pi) is exact, autograd differentiates
        # Weideman's approximation (1e-12 relative): they agree to about that
        rtol = 1e-9 if shape == "voigt" else 1e-12
        assert torch.allclose(jac[b].T, auto, rtol=rtol, atol=0.1 * rtol * auto.abs().max())
        assert torch.allclose(f[b], fb(p[b]), rtol=1e-13, atol=1e-14 * f[b].abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fast_evaluation_matches_reference(dtype, tol):
    """The fused path against the plain per-shape reference (value and derivative lists,
    stacked), several peaks of every shape and eta at its bounds."""
    x = torch.linspace(0.5, 6.0, 301, dtype=dtype)
    peaks = tuple(PeakSpec(f"p{i}", s, center=1.0 + 0.8 * i) for i, s in enumerate(SHAPE_PARAMS))
    peaks += (PeakSpec("q", "pseudo_voigt", center=5.2), PeakSpec("r", "pseudo_voigt", center=5.6))
    for bg in (BackgroundSpec("polynomial", 2), BackgroundSpec("power_law")):
        model = PeakModel(ModelSpec(peaks, bg)).bind(x)
        g = torch.Generator().manual_seed(2)
        p = model.guess(torch.rand(4, 301, generator=g, dtype=dtype) + 1.0)
        p = p + 0.01 * torch.rand(p.shape, generator=g, dtype=dtype)
        p[0, 9], p[1, 9] = 0.0, 1.0                         # the first pseudo_voigt's eta at its bounds
        p[2, 8] = 0.0                                        # and its area 0
        scale = torch.rand(4, 301, generator=g, dtype=dtype)
        for s in (None, scale):
            f, jac = model.evaluate_and_jacobian(p, s)
            fr, jr = model.evaluate_reference(p, s)
            assert jac.dtype == dtype and f.dtype == dtype
            assert ((f - fr).abs().max() / fr.abs().max()).item() < tol
            assert ((jac - jr).abs().amax(-1) / jr.abs().amax(-1).clamp_min(1e-30)).max().item() < tol


def test_jacobian_differentiable_when_parameters_require_grad():
    """A p that requires grad takes the plain (differentiable) path instead of in-place writes."""
    model = PeakModel(ModelSpec((PeakSpec("a", "pseudo_voigt", center=0.3),), BackgroundSpec("polynomial", 1)))
    bm = model.bind(torch.linspace(-2.0, 3.0, 57, dtype=D))
    p = torch.tensor([_params("pseudo_voigt") + [1.0, 0.2]], dtype=D, requires_grad=True)
    f, jac = bm.evaluate_and_jacobian(p)
    (f.sum() + jac.sum()).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    with torch.no_grad():
        f2, jac2 = bm.evaluate_and_jacobian(p)
    assert torch.allclose(jac, jac2, rtol=1e-12) and torch.allclose(f, f2, rtol=1e-12)
