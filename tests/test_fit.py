"""Batched LM against lmfit, the reference loop, simulated truth and scipy's Voigt."""
import math

import numpy as np
import pytest
import torch
from scipy.special import voigt_profile

from workers.fit import fit_batch, fit_reference
from workers.profiles import BackgroundSpec, ModelSpec, PeakModel, PeakSpec

D = torch.float64
Q = np.linspace(14.0, 20.0, 400)


def _pv_counts(rng, n, center=17.0, fwhm=0.5, area=400.0, eta=0.4, bg=(50.0, -2.0)):
    """Poisson counts of an lmfit-convention pseudo-Voigt + line; numpy only (independent)."""
    g = math.sqrt(4 * math.log(2) / math.pi) / fwhm * np.exp(-4 * math.log(2) * (Q - center) ** 2 / fwhm ** 2)
    lor = (2 / (math.pi * fwhm)) / (1 + 4 * (Q - center) ** 2 / fwhm ** 2)
    lam = area * (eta * lor + (1 - eta) * g) + bg[0] + bg[1] * (Q - 17.0)
    y = rng.poisson(lam, size=(n, Q.size)).astype(float)
    return y, np.sqrt(np.maximum(y, 1.0))


SPEC = ModelSpec((PeakSpec("p", "pseudo_voigt", center=17.1, fwhm=0.45, center_min=16.0, center_max=18.0),),
                 BackgroundSpec("polynomial", 1))


def _fit(y, s, spec=SPEC, **kw):
    m = PeakModel(spec)
    x = torch.tensor(Q)
    yt, st = torch.tensor(y), torch.tensor(s)
    return m, fit_batch(m, x, yt, st, m.bind(x).guess(yt), **kw)


def test_batch_matches_reference_loop_float64():
    y, s = _pv_counts(np.random.default_rng(1), 6)
    y = y + np.random.default_rng(11).poisson(150 * np.exp(-4 * math.log(2) * (Q - 15.0) ** 2 / 0.3 ** 2),
                                               size=y.shape)
    s = np.sqrt(np.maximum(y, 1))
    spec = ModelSpec(SPEC.peaks + (PeakSpec("g", "gaussian", center=15.0, fwhm=0.3),), BackgroundSpec("polynomial", 2))
    m, res = _fit(y, s, spec)
    x = torch.tensor(Q)
    ref = fit_reference(m, x, torch.tensor(y), torch.tensor(s), m.bind(x).guess(torch.tensor(y)))
    assert torch.equal(res.n_iter, ref.n_iter)
    assert torch.equal(res.converged, ref.converged)
    assert ((res.params - ref.params).abs() / ref.stderr).max() < 1e-8
    assert torch.allclose(res.stderr, ref.stderr, rtol=1e-7)
    assert torch.allclose(res.chi2_red, ref.chi2_red, rtol=1e-10)


def test_matches_lmfit_parameters_and_stderr():
    lmfit = pytest.importorskip("lmfit")
    from lmfit.models import LinearModel, PseudoVoigtModel
    y, s = _pv_counts(np.random.default_rng(2), 12)
    m, res = _fit(y, s)
    assert bool(res.converged.all())
    mod = PseudoVoigtModel(prefix="p_") + LinearModel(prefix="b_")
    bm = m.bind(torch.tensor(Q))
    for i in range(len(y)):
        pars = mod.make_params(p_center=17.1, p_sigma=0.225, p_amplitude=300, p_fraction=0.5,
                               b_intercept=50, b_slope=0)
        pars["p_center"].set(min=16.0, max=18.0)
        pars["p_sigma"].set(min=float(bm.lower[1]) / 2, max=float(bm.upper[1]) / 2)
        pars["p_amplitude"].set(min=0)
        pars["p_fraction"].set(min=0, max=1)
        out = mod.fit(y[i], pars, x=Q, weights=1 / s[i])
        ours = res.params[i].numpy()
        se = res.stderr[i].numpy()
        ref = [out.params["p_center"], out.params["p_fwhm"], out.params["p_amplitude"], out.params["p_fraction"]]
        for k, pr in enumerate(ref):
            assert abs(ours[k] - pr.value) < 0.02 * se[k], (k, ours[k], pr.value, se[k])
            assert se[k] == pytest.approx(pr.stderr, rel=0.05)
        assert res.chi2_red[i].item() == pytest.approx(out.redchi, rel=1e-5)
    assert lmfit.__version__


def test_per_frame_errors_calibrated():
    """std of (fit - truth) / stderr close to 1 over 300 independent frames."""
    y, s = _pv_counts(np.random.default_rng(3), 300)
    _, res = _fit(y, s)
    z_c = (res.params[:, 0].numpy() - 17.0) / res.stderr[:, 0].numpy()
    z_w = (res.params[:, 1].numpy() - 0.5) / res.stderr[:, 1].numpy()
    assert 0.85 < z_c.std() < 1.15 and abs(z_c.mean()) < 0.25
    assert 0.85 < z_w.std() < 1.15


def test_voigt_fit_recovers_scipy_voigt_truth_and_autodiff_agrees():
    rng = np.random.default_rng(4)
    fg, fl, c, a = 0.35, 0.25, 17.05, 500.0
    sig = fg / (2 * math.sqrt(2 * math.log(2)))
    lam = a * voigt_profile(Q - c, sig, fl / 2) + 30.0
    y = rng.poisson(lam, size=(20, Q.size)).astype(float)
    s = np.sqrt(np.maximum(y, 1))
    spec = ModelSpec((PeakSpec("v", "voigt", center=17.0, fwhm=0.4, center_min=16.5, center_max=17.5),),
                     BackgroundSpec("polynomial", 0))
    m, res = _fit(y, s, spec)
    assert bool(res.converged.all())
    z = (res.params[:, :4].numpy() - [c, fg, a, fl]) / res.stderr[:, :4].numpy()
    assert np.abs(z).max() < 4.5 and np.abs(z.mean(0)).max() < 1.2
    x = torch.tensor(Q)
    auto = fit_batch(m, x, torch.tensor(y[:4]), torch.tensor(s[:4]), m.bind(x).guess(torch.tensor(y[:4])),
                     jacobian="autodiff")
    assert ((auto.params - res.params[:4]).abs() / res.stderr[:4]).max() < 1e-6


def test_power_law_background_with_gaussian():
    rng = np.random.default_rng(5)
    q = np.linspace(0.5, 5.0, 300)
    lam = 800.0 * (q / 2.75) ** -2.5 + 20.0 + 300.0 * math.sqrt(4 * math.log(2) / math.pi) / 0.3 \
        * np.exp(-4 * math.log(2) * (q - 3.0) ** 2 / 0.3 ** 2)
    y = rng.poisson(lam, size=(10, q.size)).astype(float)
    spec = ModelSpec((PeakSpec("g", "gaussian", center=3.1, fwhm=0.25, center_min=2.5, center_max=3.5),),
                     BackgroundSpec("power_law"))
    m = PeakModel(spec)
    x = torch.tensor(q)
    bm = m.bind(x)
    p0 = torch.tensor([3.1, 0.25, 250.0, 700.0, 2.3, 15.0], dtype=D).expand(10, -1)
    assert bm.n_params == 6
    res = fit_batch(m, x, torch.tensor(y), torch.tensor(np.sqrt(np.maximum(y, 1))), p0)
    assert bool(res.converged.all())
    z = (res.params.numpy() - [3.0, 0.3, 300.0, 800.0, 2.5, 20.0]) / res.stderr.numpy()
    assert np.abs(z).max() < 4.5


def test_lbfgs_and_adam_reach_the_lm_optimum():
    y, s = _pv_counts(np.random.default_rng(6), 4)
    m, lm = _fit(y, s)
    x = torch.tensor(Q)
    start = lm.params * torch.tensor([1.0005, 1.05, 1.05, 1.1, 1.01, 1.0], dtype=D)
    lb = fit_batch(m, x, torch.tensor(y), torch.tensor(s), start, method="lbfgs", max_iter=200)
    assert ((lb.params - lm.params).abs() / lm.stderr).max() < 0.05
    assert torch.allclose(lb.stderr, lm.stderr, rtol=0.02)
    ad = fit_batch(m, x, torch.tensor(y), torch.tensor(s), start, method="adam", max_iter=300, lr=0.1)
    assert ((ad.params - lm.params).abs() / lm.stderr).max() < 0.5


def test_fixed_eta_and_masked_points():
    y, s = _pv_counts(np.random.default_rng(7), 3)
    m = PeakModel(SPEC, fix_eta=True)
    x = torch.tensor(Q)
    yt, st = torch.tensor(y), torch.tensor(s)
    p0 = m.bind(x).guess(yt)
    res = fit_batch(m, x, yt, st, p0)
    assert torch.all(res.params[:, 3] == p0[:, 3]) and torch.all(res.stderr[:, 3] == 0)
    # NaN intensities / non-positive sigma give weight 0: same as dropping those points
    y2, s2 = yt.clone(), st.clone()
    y2[:, 50:60] = math.nan
    s2[:, 100:110] = 0.0
    keep = torch.ones(Q.size, dtype=torch.bool)
    keep[50:60] = keep[100:110] = False
    a = fit_batch(m, x, y2, s2, p0)
    b = fit_batch(PeakModel(SPEC, fix_eta=True).bind(x[keep]), x[keep], yt[:, keep], st[:, keep], p0)
    assert b.params.shape == a.params.shape
    # the bound model of the subset has other polynomial reduced coordinates: compare peaks only
    assert torch.allclose(a.params[:, :3], b.params[:, :3], rtol=1e-6)
    assert torch.allclose(a.stderr[:, :3], b.stderr[:, :3], rtol=1e-4)


def test_float32_batch_close_to_float64():
    y, s = _pv_counts(np.random.default_rng(8), 32)
    m, r64 = _fit(y, s)
    x = torch.tensor(Q, dtype=torch.float32)
    r32 = fit_batch(m, x, torch.tensor(y, dtype=torch.float32), torch.tensor(s, dtype=torch.float32),
                    r64.params.float() * 1.001)
    assert bool(r32.converged.all())
    assert ((r32.params.double() - r64.params).abs() / r64.stderr).max() < 0.1


@pytest.mark.parametrize("kw,match", [({"method": "newton"}, "newton"), ({"max_iter": 0}, "max_iter"),
                                      ({"jacobian": "numeric"}, "numeric"), ({"ftol": -1.0}, "ftol")])
def test_bad_options_rejected(kw, match):
    y, s = _pv_counts(np.random.default_rng(9), 1)
    with pytest.raises(ValueError, match=match):
        _fit(y, s, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    y, s = _pv_counts(np.random.default_rng(10), 64)
    m, cpu = _fit(y, s)
    x = torch.tensor(Q, device="cuda")
    yt, st = torch.tensor(y, device="cuda"), torch.tensor(s, device="cuda")
    gpu = fit_batch(m, x, yt, st, m.bind(x).guess(yt))
    assert gpu.params.device.type == "cuda" and bool(gpu.converged.all())
    assert ((gpu.params.cpu() - cpu.params).abs() / cpu.stderr).max() < 1e-3
    assert torch.allclose(gpu.stderr.cpu(), cpu.stderr, rtol=1e-3)


def test_inverse_of_a_nan_matrix_is_nan_with_two_threads():
    """torch.linalg.inv_ex raises (MKL, > 1 thread) on a NaN in a 240 x 240 matrix, the size of a
    window fit's Hessian; spd_inverse returns NaN for that matrix and the others' inverses."""
    from workers.fit import spd_inverse
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(1)
        m = rng.normal(size=(5, 240, 240))
        a = torch.as_tensor(m @ m.transpose(0, 2, 1) + 240 * np.eye(240))
        a[3, 2, 2] = math.nan
        a[1, 5, 5] = -1.0e6                          # not positive definite
        inv, bad = spd_inverse(a)
    finally:
        torch.set_num_threads(threads)
    assert bad.tolist() == [False, True, False, True, False]
    assert torch.isnan(inv[3]).all() and torch.isnan(inv[1]).all()
    np.testing.assert_allclose(inv[0].numpy(), np.linalg.inv(a[0].numpy()), rtol=1e-10, atol=1e-14)


def test_covariance_leaves_out_parameters_the_data_do_not_determine():
    """A normal matrix with a zero column (a peak of zero area: its centre does not enter the
    model) and one whose column is so weak that the parameter's error exceeds its bound span:
    both flagged, their rows and columns NaN; the rest is the inverse of the determined block."""
    from workers.fit import covariance
    rng = np.random.default_rng(2)
    j = rng.normal(size=(50, 4))
    j[:, 1] = 0.0                                      # no data on parameter 1
    j[:, 3] *= 1e-4                                    # parameter 3: error ~1e4 > its span of 10
    a = torch.tensor(j.T @ j)[None]
    lower, upper = torch.tensor([0.0, 0.0, -math.inf, 0.0], dtype=D), torch.tensor([1.0, 1.0, math.inf, 10.0], dtype=D)
    free = torch.ones(4, dtype=torch.bool)
    cov, ident = covariance(a, free, torch.tensor([2.0], dtype=D), lower, upper)
    assert ident.tolist() == [[True, False, True, False]]
    kept = [0, 2]
    ref = 2.0 * np.linalg.inv(j[:, kept].T @ j[:, kept])
    np.testing.assert_allclose(cov[0][kept][:, kept].numpy(), ref, rtol=1e-10)
    assert torch.isnan(cov[0, 1]).all() and torch.isnan(cov[0, :, 3]).all()


# three pseudo-Voigt peaks + a line (the benchmark's model) on Q, numpy only (independent)
PV3 = ((15.0, 0.40, 200.0, 0.3), (17.0, 0.55, 300.0, 0.6), (18.6, 0.30, 100.0, 0.5))
PV3_TRUTH = np.array([v for pk in PV3 for v in pk] + [100.0, 10.0])
PV3_SPEC = ModelSpec(tuple(PeakSpec(f"p{i}", "pseudo_voigt", center=c, fwhm=w) for i, (c, w, _, _) in enumerate(PV3)),
                     BackgroundSpec("polynomial", 1))


def _pv3(x, *p):
    """lmfit-convention pseudo-Voigts + b0 + b1 u, u = (x - 17) / 3 (the model's reduced coordinate)."""
    out = p[12] + p[13] * (x - 17.0) / 3.0
    for k in range(3):
        c, w, a, eta = p[4 * k:4 * k + 4]
        g = math.sqrt(4 * math.log(2) / math.pi) / w * np.exp(-4 * math.log(2) * (x - c) ** 2 / w ** 2)
        lor = (2 / (math.pi * w)) / (1 + 4 * (x - c) ** 2 / w ** 2)
        out = out + a * (eta * lor + (1 - eta) * g)
    return out


def test_noise_free_three_peaks_reach_the_analytic_values():
    """Exact data: the optimum is the truth, which Gauss-Newton reaches to rounding."""
    y = np.stack([_pv3(Q, *PV3_TRUTH)] * 2)
    p0 = np.stack([PV3_TRUTH * 1.003, PV3_TRUTH * 0.997])
    res = fit_batch(PeakModel(PV3_SPEC), torch.tensor(Q), torch.tensor(y), torch.tensor(np.sqrt(y)), torch.tensor(p0))
    assert np.abs(res.params.numpy() / PV3_TRUTH - 1).max() < 1e-10


def test_three_peaks_match_curve_fit_and_autodiff_jacobian():
    """The fused analytic Jacobian against the autodiff one (same LM: same iterations, results
    to 1e-10 relative) and both against scipy curve_fit's optimum on the same data."""
    from scipy.optimize import curve_fit
    y = np.random.default_rng(5).poisson(_pv3(Q, *PV3_TRUTH), size=(3, Q.size)).astype(float)
    s = np.sqrt(np.maximum(y, 1.0))
    args = (PeakModel(PV3_SPEC), torch.tensor(Q), torch.tensor(y), torch.tensor(s), torch.tensor(PV3_TRUTH * 1.01))
    kw = dict(ftol=1e-12, gtol=1e-10, max_iter=100)
    res = fit_batch(*args, **kw)
    auto = fit_batch(*args, jacobian="autodiff", **kw)
    assert bool(res.converged.all())
    assert torch.equal(res.n_iter, auto.n_iter)
    for name in ("params", "stderr", "chi2_red"):
        a, b = getattr(res, name), getattr(auto, name)
        assert ((a - b).abs() / b.abs()).max() < 1e-10, name
    for i in range(len(y)):
        p, cov = curve_fit(_pv3, Q, y[i], p0=PV3_TRUTH * 1.01, sigma=s[i], ftol=1e-14, xtol=1e-14, gtol=1e-14)
        se = np.sqrt(np.diag(cov))
        assert (np.abs(res.params[i].numpy() - p) / se).max() < 1e-4      # both within tolerance of the optimum
        assert res.stderr[i].numpy() == pytest.approx(se, rel=1e-5)
