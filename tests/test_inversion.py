"""SAXS/GISAXS forward models against sasmodels and BornAgain; encoder + LM inversion on held-out
sasmodels data; calibrated LM errors; gradients by gradcheck."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.inversion.encoder import ParamBounds, log_grid, profile_features
from workers.inversion.gisaxs import DetectorGrid, cylinders_paracrystal, spheres_hard_disk, spheres_paracrystal
from workers.inversion.refine import AmplitudeModel, SaxsInverter, inversion_rows, linear_amplitudes, refine
from workers.inversion.saxs import guinier, porod, sphere_hs, sphere_schulz_form, sphere_schulz_form_reference

from bornagain_refs import mixture, paracrystal as _paracrystal, particles as _particles, relative_error_map

D = torch.float64
MODELS = Path(__file__).resolve().parents[1] / "service" / "models"


# ---------------------------------------------------------------------------------------------
# sasmodels references (q in 1/A there, radius in A; ours 1/nm and nm)
def _sas(name):
    from sasmodels.core import load_model
    return load_model(name, dtype="double")


def _sas_sphere_hs(q, r, pd, phi, i0, bkg, n_pd=80):
    """sasmodels sphere@hardsphere (Schulz, P*S, R_eff = mean radius) scaled so that its dilute
    forward intensity is i0 (from sasmodels' own sphere at q = 1e-7 1/A)."""
    from sasmodels.direct_model import call_kernel
    poly = dict(radius=10 * r, radius_pd=pd, radius_pd_type="schulz", radius_pd_n=n_pd, radius_pd_nsigma=8,
                sld=2.0, sld_solvent=1.0, background=0.0)
    unit = call_kernel(_sas("sphere").make_kernel([np.array([1e-7])]), dict(poly, scale=1.0))[0]
    k = _sas("sphere@hardsphere").make_kernel([q / 10.0])
    return call_kernel(k, dict(poly, scale=i0 / (phi * unit), background=bkg, volfraction=phi,
                               radius_effective_mode=1, structure_factor_mode=0))


@pytest.mark.parametrize("r,pd,phi", [(5.0, 0.05, 0.1), (10.0, 0.1, 0.3), (2.0, 0.2, 0.4), (20.0, 0.02, 0.2),
                                      (25.0, 0.3, 0.01)])
def test_sphere_hs_matches_sasmodels(r, pd, phi):
    q = np.geomspace(0.02, 5.0, 300)
    ours = sphere_hs(torch.tensor(q), torch.tensor([[r, pd, phi, 7.0, 0.01]], dtype=D))[0].numpy()
    # sasmodels' default Schulz sum (80 radii over +-8 sigma) is exact while q sigma_R < 8
    ref80 = _sas_sphere_hs(q, r, pd, phi, 7.0, 0.01, n_pd=80)
    ok = q * r * pd < 8.0
    assert np.abs(ours[ok] / ref80[ok] - 1).max() < 1e-3
    # with 400 radii sasmodels converges over the whole range (remaining: its +-8 sigma cut)
    ref400 = _sas_sphere_hs(q, r, pd, phi, 7.0, 0.01, n_pd=400)
    assert np.abs(ours / ref400 - 1).max() < 1e-3


def test_sasmodels_80_point_sum_aliases_where_stated():
    """Docstring claim: beyond q sigma_R ~ 8 sasmodels' 80-point sum departs from the integral."""
    q = np.array([2.12])                       # q sigma = 2.12 * 25 * 0.3 = 15.9
    ours = sphere_hs(torch.tensor(q), torch.tensor([[25.0, 0.3, 0.01, 1.0, 0.0]], dtype=D))[0].numpy()
    assert abs(_sas_sphere_hs(q, 25.0, 0.3, 0.01, 1.0, 0.0, 80)[0] / ours[0] - 1) > 0.1
    assert abs(_sas_sphere_hs(q, 25.0, 0.3, 0.01, 1.0, 0.0, 400)[0] / ours[0] - 1) < 1e-3


def test_guinier_and_porod_match_sasmodels():
    from sasmodels.direct_model import call_kernel
    q = np.geomspace(0.05, 3.0, 50)
    g = call_kernel(_sas("guinier").make_kernel([q / 10]), dict(scale=3.0, background=0.1, rg=40.0))
    ours = guinier(torch.tensor(q), torch.tensor([[3.0, 4.0, 0.1]], dtype=D))[0].numpy()
    assert np.abs(ours / g - 1).max() < 1e-12
    pr = call_kernel(_sas("porod").make_kernel([q / 10]), dict(scale=2e-6, background=0.2))
    ours = porod(torch.tensor(q), torch.tensor([[2e-6 * 1e4, 0.2]], dtype=D))[0].numpy()   # (q/10)^-4 = 1e4 q^-4
    assert np.abs(ours / pr - 1).max() < 1e-12


def test_schulz_form_matches_dense_sum_and_is_one_at_zero():
    q = torch.cat([torch.zeros(1, dtype=D), torch.logspace(-3, math.log10(3.0), 200, dtype=D)])
    ours = sphere_schulz_form(q, torch.tensor([8.0], dtype=D), torch.tensor([0.15], dtype=D))[0]
    ref = sphere_schulz_form_reference(q, 8.0, 0.15)
    assert ours[0] == pytest.approx(1.0, abs=1e-14)
    assert ((ours - ref).abs() / ref).max() < 1e-6


def test_gradcheck_saxs_float64():
    q = torch.tensor([0.0, 0.01, 0.05, 0.3, 1.0, 2.5], dtype=D)     # both sides of the series cut
    p = torch.tensor([[5.0, 0.1, 0.2, 3.0, 0.1], [12.0, 0.25, 0.001, 1.0, 0.0]], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sphere_hs(q, x), (p,))


def test_gradcheck_gisaxs_float64():
    grid = DetectorGrid.regular(0.1, math.radians(0.2), (0.0, 0.02), 3, (0.0, 0.04), 2)
    gq = grid.q()
    ps = torch.tensor([[4.0, 0.1, 20.0, 0.15, 2.0, 0.01]], dtype=D, requires_grad=True)
    pc = torch.tensor([[4.0, 0.1, 6.0, 20.0, 0.15, 2.0, 0.01]], dtype=D, requires_grad=True)
    ph = torch.tensor([[4.0, 0.1, 0.3, 2.0, 0.01]], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: spheres_paracrystal(gq, x), (ps,))
    assert torch.autograd.gradcheck(lambda x: cylinders_paracrystal(gq, x), (pc,))
    assert torch.autograd.gradcheck(lambda x: spheres_hard_disk(gq, x), (ph,))


# ---------------------------------------------------------------------------------------------
# BornAgain (Born approximation: particles on a vacuum substrate, particle delta 1e-10)
GRID = DetectorGrid.regular(0.1, math.radians(0.2), (0.0, 0.02), 32, (0.0, 0.04), 16)


def _bornagain(particles, structure):
    ba = pytest.importorskip("bornagain")
    vac = ba.Vacuum()
    top = ba.Layer(vac)
    top.deposit2D(structure(ba, mixture(ba, particles)))
    s = ba.Sample()
    s.addLayer(top)
    s.addLayer(ba.Layer(vac))
    det = ba.SphericalDetector(32, 0.0, 0.02, 16, 0.0, 0.04)
    res = ba.ScatteringSimulation(ba.Beam(1.0, GRID.wavelength, GRID.alpha_i), s, det).simulate()
    return np.asarray(res.flatVector()).reshape(GRID.shape)


def _rel_err(ba_map, ours):
    """Per-pixel relative errors where our map exceeds 1e-3 of its maximum (bornagain_refs)."""
    err = relative_error_map(ba_map, ours)
    return err[np.isfinite(err)]


def test_gisaxs_spheres_paracrystal_matches_bornagain():
    pytest.importorskip("bornagain")
    r, pd, dist, om = 5.0, 0.12, 20.0, 3.0
    ba_map = _bornagain(_particles("sphere", r, pd), _paracrystal(dist, om))
    err = _rel_err(ba_map, spheres_paracrystal(GRID.q(), torch.tensor([[r, pd, dist, om / dist, 1.0, 0.0]], dtype=D)))
    assert err.max() < 2e-3 and np.median(err) < 2e-4


def test_gisaxs_cylinders_paracrystal_matches_bornagain():
    pytest.importorskip("bornagain")
    r, pd, h, dist, om = 4.0, 0.1, 6.0, 18.0, 2.5
    ba_map = _bornagain(_particles("cylinder", r, pd, h), _paracrystal(dist, om))
    ours = cylinders_paracrystal(GRID.q(), torch.tensor([[r, pd, h, dist, om / dist, 1.0, 0.0]], dtype=D))
    err = _rel_err(ba_map, ours)
    assert err.max() < 2e-3 and np.median(err) < 2e-4


def test_gisaxs_hard_disk_matches_bornagain():
    pytest.importorskip("bornagain")
    r, cov = 5.0, 0.3
    ba_map = _bornagain(_particles("sphere", r, 1e-9)[4:5], lambda ba, part: ba.Dense2D(cov / (math.pi * r * r), part))
    err = _rel_err(ba_map, spheres_hard_disk(GRID.q(), torch.tensor([[r, 1e-9, cov, 1.0, 0.0]], dtype=D)))
    # our 48-point Gauss-Legendre c(q) vs BornAgain's adaptive integral: <= 5e-3 measured 3.5e-3
    assert err.max() < 5e-3 and np.median(err) < 1e-3


# ---------------------------------------------------------------------------------------------
# encoder, features, refinement
def test_param_bounds_map_into_interval_and_reject_bad_bounds():
    b = ParamBounds(("r", "p"), (2.0, 0.0), (20.0, 0.5), (True, False))
    u = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]], dtype=D)
    p = b.from_unit(u)
    assert torch.allclose(p[0], torch.tensor([2.0, 0.0], dtype=D)) and torch.allclose(p[1], torch.tensor([20.0, 0.5], dtype=D))
    assert p[2, 0].item() == pytest.approx(math.sqrt(40.0))     # geometric middle for log scaling
    assert torch.allclose(b.to_unit(p), u)
    with pytest.raises(ValueError, match="lo=3"):
        ParamBounds(("r",), (3.0,), (1.0,), (False,))
    with pytest.raises(ValueError, match="log"):
        ParamBounds(("r",), (0.0,), (1.0,), (True,))


def test_profile_features_bin_mean_and_mask():
    grid = log_grid(0.1, 1.0, 16)
    q = torch.linspace(0.2, 0.6, 400, dtype=D)
    y = (q ** -2)[None].repeat(2, 1)
    f = profile_features(grid, q, y, 0.01 * y)
    # cells: geometric midpoints of the grid; valid = cells holding data points
    edges = np.sqrt(grid.numpy()[1:] * grid.numpy()[:-1])
    cell = np.digitize(q.numpy(), edges)
    filled = np.isin(np.arange(16), cell)
    assert np.array_equal(f[0, 2].numpy() > 0, filled)
    # channel 0 = (log10 I - mean over valid cells) / 2, log10 I averaged per cell
    means = np.array([np.log10(y[0].numpy()[cell == i]).mean() for i in range(16) if filled[i]])
    np.testing.assert_allclose(f[0, 0][torch.tensor(filled)].numpy(), (means - means.mean()) / 2, atol=1e-6)
    # channel 1 = (log10 relative error of the cell mean + 2) / 2
    counts = np.array([(cell == i).sum() for i in range(16) if filled[i]])
    np.testing.assert_allclose(f[0, 1][torch.tensor(filled)].numpy(), (np.log10(0.01 / np.sqrt(counts)) + 2) / 2,
                               atol=1e-6)


def test_hard_sphere_py_matches_high_precision_formula():
    """PHYSICS.md's G(X) form evaluated with 50 digits (mpmath) vs our float64 S(q)."""
    import mpmath as mp

    from workers.inversion.saxs import hard_sphere_py
    mp.mp.dps = 50

    def s_ref(x, phi):
        x, phi = mp.mpf(x), mp.mpf(phi)
        a = (1 + 2 * phi) ** 2 / (1 - phi) ** 4
        b = -6 * phi * (1 + phi / 2) ** 2 / (1 - phi) ** 4
        g = phi * a / 2
        gx = (a * (mp.sin(x) - x * mp.cos(x)) / x ** 2 + b * (2 * x * mp.sin(x) + (2 - x ** 2) * mp.cos(x) - 2) / x ** 3
              + g * (-x ** 4 * mp.cos(x) + 4 * ((3 * x ** 2 - 6) * mp.cos(x) + (x ** 3 - 6 * x) * mp.sin(x) + 6)) / x ** 5)
        return float(1 / (1 + 24 * phi * gx / x))
    xs = [1e-3, 0.04, 0.3, 0.99, 1.01, 4.0, 30.0]
    for phi in (0.05, 0.3, 0.45):
        ours = hard_sphere_py(torch.tensor(xs, dtype=D) / 2, torch.ones(1, dtype=D), torch.tensor([phi], dtype=D))[0]
        ref = torch.tensor([s_ref(x, phi) for x in xs], dtype=D)
        assert ((ours - ref).abs() / ref).max() < 1e-12


def test_linear_amplitudes_match_weighted_lstsq():
    rng = np.random.default_rng(0)
    shape = rng.uniform(0.1, 2.0, (3, 50))
    s = rng.uniform(0.5, 2.0, (3, 50))
    y = 4.0 * shape + 0.7 + rng.normal(0, 0.1, (3, 50))
    a, b = linear_amplitudes(torch.tensor(shape), torch.tensor(y), torch.tensor(s))
    for i in range(3):
        A = np.stack([shape[i], np.ones(50)], 1) / s[i, :, None]
        ref = np.linalg.lstsq(A, y[i] / s[i], rcond=None)[0]
        assert a[i].item() == pytest.approx(ref[0], rel=1e-10) and b[i].item() == pytest.approx(ref[1], rel=1e-9)


def test_amplitude_model_jacobian_matches_autodiff():
    q = torch.logspace(math.log10(0.04), math.log10(4.0), 60, dtype=D)
    lo, hi = torch.tensor([2, 0.02, 0, 0, 0.0], dtype=D), torch.tensor([25, 0.3, 0.4, math.inf, math.inf], dtype=D)
    p = torch.tensor([[7.0, 0.12, 0.25, 50.0, 0.3], [15.0, 0.05, 0.05, 5.0, 0.01]], dtype=D)
    _, jac = AmplitudeModel(sphere_hs, q, lo, hi).evaluate_and_jacobian(p)
    ad = torch.func.vmap(torch.func.jacfwd(lambda x: sphere_hs(q, x[None])[0]))(p).transpose(1, 2)
    assert ((jac - ad).abs().amax(-1) / ad.abs().amax(-1)).max() < 1e-4


def _noisy_sasmodels(n, seed, n_pd=300):
    rng = np.random.default_rng(seed)
    q = np.linspace(0.04, 4.5, 300)
    p = np.stack([np.exp(rng.uniform(math.log(2.5), math.log(20.0), n)), rng.uniform(0.04, 0.28, n),
                  rng.uniform(0.02, 0.38, n), 10 ** rng.uniform(1, 3, n), np.zeros(n)], 1)
    p[:, 4] = p[:, 3] * 10 ** rng.uniform(-4, -2, n)
    clean = np.stack([_sas_sphere_hs(q, *row, n_pd=n_pd) for row in p])
    sigma = np.sqrt(clean * p[:, 3:4] / 10 ** rng.uniform(4.5, 6.5, (n, 1)))
    return q, clean + sigma * rng.standard_normal(clean.shape), sigma, p


def test_lm_standard_errors_are_calibrated():
    """Pulls (fit - truth) / stderr over 64 noisy sasmodels frames, LM started 10 % off the truth."""
    q, y, s, truth = _noisy_sasmodels(64, 1)
    lo = torch.tensor([2.0, 0.02, 0.0, 0.0, 0.0], dtype=D)
    hi = torch.tensor([25.0, 0.3, 0.4, math.inf, math.inf], dtype=D)
    start = torch.tensor(truth) * torch.tensor([1.1, 0.9, 1.1, 0.9, 1.2], dtype=D)
    res = refine(sphere_hs, torch.tensor(q), torch.tensor(y), torch.tensor(s), start, lo, hi)
    assert bool(res.converged.all())
    pulls = ((res.params - torch.tensor(truth)) / res.stderr)[:, :4].numpy()
    std = pulls.std(0)
    assert np.all((std > 0.7) & (std < 1.4)), std
    assert np.abs(pulls.mean(0)).max() < 0.5


@pytest.mark.skipif(not (MODELS / "saxs_encoder.pt").exists(), reason="no shipped SAXS encoder")
def test_shipped_saxs_encoder_and_refinement_recover_radius():
    from service.train.inversion import load_encoder_checkpoint
    inv = SaxsInverter(load_encoder_checkpoint("saxs"))
    q, y, s, truth = _noisy_sasmodels(32, 2)
    res = inv(q, y, s)
    lo, hi = inv.lower.numpy(), inv.upper.numpy()
    for p in (res.encoder.numpy(), res.params.numpy()):
        assert np.all((p >= lo) & (p <= hi))
    enc_rel = np.abs(res.encoder[:, 0].numpy() / truth[:, 0] - 1)
    lm_rel = np.abs(res.params[:, 0].numpy() / truth[:, 0] - 1)
    assert np.median(enc_rel) < 0.05 and enc_rel.max() < 0.25          # measured: median 1.4 %
    assert np.median(lm_rel) < 0.005 and lm_rel.max() < 0.03            # measured: median 0.04 %
    assert res.converged.float().mean() >= 0.9
    # encoder input from a profile with a bad point and a shorter range stays in bounds
    y2 = y[:4, 20:250].copy()
    y2[:, 5] = np.nan
    r2 = inv(q[20:250], y2, s[:4, 20:250], refine_fit=False)
    assert np.all((r2.params.numpy() >= lo) & (r2.params.numpy() <= hi))
    rows = inversion_rows(res, np.arange(32), np.zeros(32))
    assert set(rows) >= {"seq_num", "radius", "radius_err", "radius_encoder", "chi2", "converged"}
    assert all(len(v) == 32 for v in rows.values())


@pytest.mark.skipif(not (MODELS / "gisaxs_encoder.pt").exists(), reason="no shipped GISAXS encoder")
def test_shipped_gisaxs_encoder_on_bornagain_maps():
    pytest.importorskip("bornagain")
    from service.train.inversion import bornagain_spheres_paracrystal, load_encoder_checkpoint
    from workers.inversion.refine import GisaxsInverter
    inv = GisaxsInverter(load_encoder_checkpoint("gisaxs"))
    rng = np.random.default_rng(5)
    truth = np.array([[3.0, 0.08, 20.0, 0.1], [6.0, 0.15, 30.0, 0.2]])
    maps = np.stack([bornagain_spheres_paracrystal(r, pd, d, g * d) for r, pd, d, g in truth])
    maps = 100 * maps / maps.max((1, 2), keepdims=True) + 1e-3
    sigma = np.sqrt(maps * 100 / 1e5)
    res = inv(maps + sigma * rng.standard_normal(maps.shape), sigma)
    lo, hi = inv.lower.numpy(), inv.upper.numpy()
    assert np.all((res.params.numpy() >= lo) & (res.params.numpy() <= hi))
    assert np.abs(res.params[:, 0].numpy() / truth[:, 0] - 1).max() < 0.05
    assert np.abs(res.params[:, 2].numpy() / truth[:, 2] - 1).max() < 0.05


def test_train_run_rejects_bad_options(tmp_path):
    import argparse

    from service.train.inversion import add_arguments, run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["saxs", "--n-train", "10", "--data-dir", str(tmp_path)])
    assert run(args) == 2
    args = parser.parse_args(["saxs", "--physics-weight", "-1", "--data-dir", str(tmp_path)])
    assert run(args) == 2
