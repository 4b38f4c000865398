"""Background subtraction against simulated truth (many seeds, batched) and silx's SNIP."""
import math

import numpy as np
import pytest
import torch

from workers.background import robust_background, snip, subtract_measured

D = torch.float64
LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gauss(x, c, fwhm, area):
    return area * math.sqrt(4 * LN2 / math.pi) / fwhm * np.exp(-4 * LN2 * (x - c) ** 2 / fwhm ** 2)


# ------------------------------------------------------------------------------------------
# measured background
Q_SAXS = np.linspace(0.1, 10.0, 400)
EMPTY = 2000 * np.exp(-Q_SAXS / 3) + 100                 # empty cell / solvent, smooth
SIGNAL = 5000 * np.exp(-(Q_SAXS * 3.0) ** 2 / 3)         # Guinier, Rg = 3 nm: zero beyond q ~ 2


def test_auto_scale_recovers_scale_and_sigma_propagates():
    """Poisson-like noise, 4000 frames: fitted s unbiased, its error right, pulls of I_c have std 1."""
    B, s_true = 4000, 0.85
    rng = np.random.default_rng(0)
    lam_s = s_true * EMPTY + SIGNAL
    sb, ss = np.sqrt(EMPTY), np.sqrt(lam_s)                # Gaussian noise with the Poisson variance
    ib = EMPTY + sb * rng.standard_normal((B, Q_SAXS.size))
    i_s = lam_s + ss * rng.standard_normal((B, Q_SAXS.size))
    r = subtract_measured(torch.tensor(i_s), torch.tensor(ss).expand(B, -1), torch.tensor(ib),
                          torch.tensor(sb).expand(B, -1), scale="auto", q=torch.tensor(Q_SAXS), q_range=(9.5, 10.0))
    sc, se = r.scale.numpy(), r.scale_err.numpy()
    assert abs(sc.mean() - s_true) < 4 * se.mean() / math.sqrt(B)             # unbiased (noisy regressor)
    assert 0.93 < sc.std() / se.mean() < 1.07                                  # reported error is right
    pull = (r.intensity.numpy() - SIGNAL) / r.sigma.numpy()
    region = Q_SAXS < 6.0                                                      # outside the fit range
    assert abs(pull[:, region].mean()) < 0.02
    assert 0.98 < pull[:, region].std() < 1.02
    # at low q var(s) I_bg^2 matters: leaving it out makes the pulls too wide there
    low = Q_SAXS < 0.5
    assert 0.97 < pull[:, low].std() < 1.03
    no_vs = np.sqrt(ss ** 2 + sc[:, None] ** 2 * sb ** 2)
    assert ((r.intensity.numpy() - SIGNAL) / no_vs)[:, low].std() > 1.07


def test_transmission_scale_recovers_signal_exactly_and_sigma_matches_monte_carlo():
    """Measured I_s = T_s (S + E), I_bg = T_bg E (per I0 and time): (I_s - T_s/T_bg I_bg)/T_s = S."""
    t_s, t_b, d = 0.42, 0.81, 0.15
    i_s, i_b = t_s * (SIGNAL + EMPTY), t_b * EMPTY
    s_s, s_b = np.sqrt(i_s), np.sqrt(i_b)
    one = subtract_measured(torch.tensor(i_s)[None], torch.tensor(s_s)[None], torch.tensor(i_b),
                            torch.tensor(s_b), transmission=(t_s, t_b), thickness=d)
    np.testing.assert_allclose(one.intensity[0].numpy(), SIGNAL / d, rtol=1e-12, atol=1e-9)
    assert abs(float(one.scale[0]) - t_s / t_b) < 1e-15
    rng = np.random.default_rng(1)
    B = 3000
    ys = i_s + s_s * rng.standard_normal((B, Q_SAXS.size))
    yb = i_b + s_b * rng.standard_normal((B, Q_SAXS.size))
    r = subtract_measured(torch.tensor(ys), torch.tensor(s_s).expand(B, -1), torch.tensor(yb),
                          torch.tensor(s_b).expand(B, -1), transmission=(t_s, t_b), thickness=d)
    ratio = r.intensity.numpy().std(0) / r.sigma[0].numpy()
    assert np.all(np.abs(ratio - 1) < 0.08) and abs(ratio.mean() - 1) < 0.01


def test_given_scale_and_shapes():
    y = torch.full((3, 5), 10.0, dtype=D)
    r = subtract_measured(y, torch.ones_like(y), torch.full((5,), 4.0, dtype=D), torch.full((5,), 2.0, dtype=D),
                          scale=torch.tensor([0.5, 1.0, 2.0], dtype=D))
    np.testing.assert_allclose(r.intensity[:, 0].numpy(), [8.0, 6.0, 2.0])
    np.testing.assert_allclose(r.sigma[:, 0].numpy(), np.sqrt([1 + 1.0, 1 + 4.0, 1 + 16.0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale="fit"), "scale"),
    (dict(scale=1.0, transmission=(0.5, 0.9)), "either"),
    (dict(scale="auto"), "q_range"),
    (dict(scale="auto", q_range=(5.0, 1.0), q=torch.linspace(0, 10, 20, dtype=D)), "q_range"),
    (dict(scale="auto", q_range=(50.0, 60.0), q=torch.linspace(0, 10, 20, dtype=D)), "q_range"),
    (dict(scale=-2.0), "scale"),
    (dict(transmission=(1.5, 0.9)), "transmission"),
    (dict(thickness=0.0), "thickness"),
])
def test_measured_bad_options_raise(kwargs, match):
    y = torch.ones(2, 20, dtype=D)
    with pytest.raises(ValueError, match=match):
        subtract_measured(y, y, torch.ones(20, dtype=D), None, **kwargs)


# ------------------------------------------------------------------------------------------
# smooth backgrounds under peaks
Q = np.linspace(10.0, 20.0, 500)                          # dx = 0.02 1/nm
PEAKS = _gauss(Q, 12.5, 0.3, 300) + _gauss(Q, 15.0, 0.4, 600) + _gauss(Q, 17.5, 0.25, 200)
UNDER = PEAKS > 0.05 * PEAKS.max()


def _np_snip(v, m, decreasing):
    """Plain loop of the clipping filter (Morháč et al. 1997 increasing / 2008 decreasing windows)."""
    v = v.copy()
    for p in (range(m, 0, -1) if decreasing else range(1, m + 1)):
        w = v.copy()
        for i in range(p, len(v) - p):
            w[i] = min(v[i], 0.5 * (v[i - p] + v[i + p]))
        v = w
    return v


def test_snip_matches_silx_and_plain_loop():
    silx_filters = pytest.importorskip("silx.math.fit.filters")
    rng = np.random.default_rng(2)
    y = rng.poisson(200 * np.exp(-(Q - 10) / 4) + 50 + PEAKS, size=(3, Q.size)).astype(float)
    lls = np.log(np.log(np.sqrt(y + 1) + 1) + 1)
    inv = lambda v: (np.exp(np.exp(v) - 1) - 1) ** 2 - 1                   # noqa: E731
    got = snip(torch.tensor(y), 30).numpy()
    got_raw = snip(torch.tensor(y), 30, use_lls=False).numpy()
    got_inc = snip(torch.tensor(y), 30, decreasing=False).numpy()
    for b in range(3):
        np.testing.assert_allclose(got[b], inv(silx_filters.snip1d(lls[b], 30)), rtol=1e-10)
        np.testing.assert_allclose(got_raw[b], silx_filters.snip1d(y[b], 30), rtol=1e-12)
        np.testing.assert_allclose(got_inc[b], inv(_np_snip(lls[b], 30, decreasing=False)), rtol=1e-10)


def test_snip_recovers_smooth_background_under_peaks():
    bg = 400 * np.exp(-(Q - 10) / 4) + 100 + 20 * np.sin(Q / 3)
    y = np.random.default_rng(0).poisson(bg + PEAKS, size=(32, Q.size)).astype(float)
    b = snip(torch.tensor(y), 30, smooth_half_width=5).numpy()
    rel = (b - bg) / bg
    inner = slice(60, -60)                                  # the first/last m points are not clipped
    assert abs(rel[:, inner].mean()) < 0.04                 # measured -0.02
    assert abs(rel[:, UNDER].mean()) < 0.04                 # measured -0.01
    assert np.abs(rel[:, inner]).max() < 0.12               # measured 0.08
    # without smoothing the clipping follows the noise floor: biased low by ~2 sigma
    raw = (snip(torch.tensor(y), 30).numpy() - bg) / np.sqrt(bg)
    assert raw[:, inner].mean() < -1.0


def test_snip_handles_nan_and_rejects_bad_width():
    y = torch.tensor(np.tile(100 + PEAKS, (2, 1)))
    y[0, 250] = math.nan
    b = snip(y, 30)
    assert bool(torch.isfinite(b[0, 240:260]).all())
    with pytest.raises(ValueError, match="half_width"):
        snip(y, 0)
    with pytest.raises(ValueError, match="half_width"):
        snip(y, 300)
    with pytest.raises(ValueError, match="smooth_half_width"):
        snip(y, 10, smooth_half_width=-1)


def test_robust_polynomial_recovers_background_and_its_error():
    u = (Q - 15.0) / 5.0
    bg = 300 + 80 * u - 60 * u ** 2 + 40 * u ** 3                            # cubic in q
    B = 64
    y = np.random.default_rng(3).poisson(bg + PEAKS, size=(B, Q.size)).astype(float)
    r = robust_background(torch.tensor(Q), torch.tensor(y), torch.tensor(np.sqrt(np.maximum(y, 1))), degree=3)
    assert bool(r.converged.all()) and int(r.n_iter.max()) < 15
    d = r.background.numpy() - bg
    assert np.abs(d / bg).max() < 0.08                        # measured 0.069 (at the ends)
    assert np.abs(d / np.sqrt(bg)).max() < 1.2                # within 1.2 sigma of one point; measured 0.81
    assert -0.15 < (d / np.sqrt(bg)).mean() < 0.0           # truncation bias ~ -0.055 sigma per point
    ratio = d.std(0).mean() / r.sigma.numpy().mean()          # Monte Carlo scatter vs reported sigma
    assert 0.9 < ratio < 1.3                                  # measured 1.18: the kept set varies too
    assert r.used.numpy()[:, UNDER].mean() < 0.2              # the peaks were excluded
    assert r.used.numpy()[:, ~UNDER].mean() > 0.9


def test_robust_power_law_recovers_exponent():
    bg = 5000 * (Q / 10) ** -3.0 + 80
    B = 32
    y = np.random.default_rng(1).poisson(bg + PEAKS, size=(B, Q.size)).astype(float)
    r = robust_background(torch.tensor(Q), torch.tensor(y), None, kind="power_law")   # sigma from the data
    assert bool(r.converged.all())
    assert abs(float(r.params[:, 1].mean()) - 3.0) < 0.05
    assert np.abs(r.background.numpy() / bg - 1).max() < 0.03


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="spline"), "kind"), (dict(degree=9), "degree"), (dict(threshold=0.0), "threshold"),
    (dict(max_iter=0), "max_iter"),
])
def test_robust_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        robust_background(torch.tensor(Q), torch.ones(1, Q.size, dtype=D), **kwargs)
    with pytest.raises(ValueError, match="x > 0"):
        robust_background(torch.tensor(Q) - 15, torch.ones(1, Q.size, dtype=D), kind="power_law")


@pytest.mark.gpu
def test_cuda_float32_matches_cpu_float64():
    y = torch.tensor(np.random.default_rng(4).poisson(300 + PEAKS, size=(4, Q.size)).astype(float))
    x = torch.tensor(Q)
    yc, xc = y.to("cuda", torch.float32), x.to("cuda", torch.float32)
    np.testing.assert_allclose(snip(yc, 30, smooth_half_width=5).cpu().double().numpy(),
                               snip(y, 30, smooth_half_width=5).numpy(), rtol=1e-4)
    ref = robust_background(x, y, y.clamp_min(1).sqrt(), degree=3)
    got = robust_background(xc, yc, yc.clamp_min(1).sqrt(), degree=3)
    np.testing.assert_allclose(got.background.cpu().double().numpy(), ref.background.numpy(), rtol=1e-3)
