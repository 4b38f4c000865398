"""GISAXS in the DWBA (workers.inversion.dwba) against BornAgain 25: particles deposited in the
vacuum top layer on a Si substrate (optionally under a film), per pixel, Yoneda band included;
the Fresnel coefficients against BornAgain's specular simulation."""
import math

import numpy as np
import pytest
import torch

from workers.inversion.dwba import (cylinders_paracrystal_dwba, dwba_q, fresnel_r, spheres_hard_disk_dwba,
                                    spheres_paracrystal_dwba)
from workers.inversion.gisaxs import DetectorGrid, spheres_paracrystal
from workers.inversion.spec import Substrate

from bornagain_refs import mixture, paracrystal as _paracrystal, particles as _particles, relative_error_map as _rel_err

D = torch.float64
LAM = 0.124                                      # nm, 10 keV
SI = Substrate(4.88e-6, 7.37e-8)                 # about Si at 10 keV (Henke): alpha_c = 3.12 mrad
FILM = Substrate(4.88e-6, 7.37e-8, film_delta=3.5e-6, film_beta=5e-9, film_thickness=30.0)
U, V = (0.0, 0.02, 24), (0.0, 0.02, 40)          # exit angles 0.25-19.75 mrad, 0.5 mrad rows
GRID = DetectorGrid.regular(LAM, math.radians(0.2), U[:2], U[2], V[:2], V[2])


def _sample(ba, substrate: Substrate, layout=None):
    top = ba.Layer(ba.Vacuum())
    if layout is not None:
        top.deposit2D(layout)
    s = ba.Sample()
    s.addLayer(top)
    if substrate.film_thickness:
        s.addLayer(ba.Layer(ba.RefractiveMaterial("film", (0.5, 0.5, 0.5), substrate.film_delta, substrate.film_beta),
                            substrate.film_thickness))
    s.addLayer(ba.Layer(ba.RefractiveMaterial("substrate", (0.2, 0.2, 0.2), substrate.delta, substrate.beta)))
    return s


def _bornagain(substrate, particles, structure, alpha_i=GRID.alpha_i):
    """BornAgain's GISAXS map (H, W) on GRID at alpha_i (rad): the Gauss-Hermite size nodes as a
    Mixture in ``structure``."""
    ba = pytest.importorskip("bornagain")
    det = ba.SphericalDetector(U[2], U[0], U[1], V[2], V[0], V[1])
    sim = ba.ScatteringSimulation(ba.Beam(1.0, LAM, alpha_i), _sample(ba, substrate, structure(ba, mixture(ba, particles))),
                                  det)
    return np.asarray(sim.simulate().flatVector()).reshape(GRID.shape)


def _yoneda_rows(substrate):
    """Rows whose exit angle is within 1 mrad of the substrate's critical angle sqrt(2 delta)."""
    return np.abs(GRID.alpha_f()[:, 0].numpy() - math.sqrt(2 * substrate.delta)) < 1e-3


def _check(err, median, p99, yoneda_max, substrate):
    """Median and 99th percentile over the map, and the largest error in the Yoneda band."""
    e = err[np.isfinite(err)]
    band = err[_yoneda_rows(substrate)]
    assert np.median(e) < median and np.quantile(e, 0.99) < p99, (np.median(e), np.quantile(e, 0.99))
    assert np.isfinite(band).sum() > 50 and np.nanmax(band) < yoneda_max, np.nanmax(band)


def test_fresnel_matches_bornagain_specular():
    """|R|^2 of Si and of a 30 nm film on Si against BornAgain's SpecularSimulation (0.1-20 mrad)."""
    ba = pytest.importorskip("bornagain")
    a = np.linspace(1e-4, 0.02, 200)
    for substrate in (SI, FILM):
        scan = ba.AlphaScan(len(a), a[0], a[-1])
        scan.setWavelength(LAM)
        ref = np.asarray(ba.SpecularSimulation(scan, _sample(ba, substrate)).simulate().flatVector())
        ours = fresnel_r(2 * math.pi / LAM, torch.tensor(a), substrate).abs().numpy() ** 2
        assert np.abs(ours / ref - 1).max() < 1e-8


@pytest.mark.parametrize("alpha_i_deg", [0.2, 0.1])          # above and below alpha_c = 0.179 deg
def test_dwba_spheres_paracrystal_on_si_matches_bornagain(alpha_i_deg):
    r, pd, dist, om = 5.0, 0.12, 20.0, 3.0
    grid = DetectorGrid(LAM, math.radians(alpha_i_deg), GRID.u, GRID.v)
    ba_map = _bornagain(SI, _particles("sphere", r, pd), _paracrystal(dist, om), grid.alpha_i)
    p = torch.tensor([[r, pd, dist, om / dist, 1.0, 0.0]], dtype=D)
    # measured: median 2.3e-5 / 2.2e-5, 99th percentile 5.2e-4 / 4.3e-4, Yoneda band max 6.6e-4 / 5.5e-4
    _check(_rel_err(ba_map, spheres_paracrystal_dwba(dwba_q(grid, SI), p)), 1e-4, 1e-3, 1e-3, SI)
    # the Born model (vacuum substrate) misses the substrate's terms: off by 36 % at 0.2 deg (median)
    assert np.nanmedian(_rel_err(ba_map, spheres_paracrystal(grid.q(), p))) > 0.2


def test_dwba_cylinders_paracrystal_on_si_matches_bornagain():
    r, pd, h, dist, om = 4.0, 0.1, 6.0, 18.0, 2.5
    ba_map = _bornagain(SI, _particles("cylinder", r, pd, h), _paracrystal(dist, om))
    ours = cylinders_paracrystal_dwba(dwba_q(GRID, SI), torch.tensor([[r, pd, h, dist, om / dist, 1.0, 0.0]], dtype=D))
    # measured: median 2.8e-5, 99th percentile 5.4e-4, Yoneda band max 9.6e-4
    _check(_rel_err(ba_map, ours), 1e-4, 1e-3, 2e-3, SI)


def test_dwba_spheres_on_film_matches_bornagain():
    """Particles on a 30 nm film on Si: R at the top of the film by Parratt's recursion."""
    r, pd, dist, om = 5.0, 0.12, 20.0, 3.0
    ba_map = _bornagain(FILM, _particles("sphere", r, pd), _paracrystal(dist, om))
    ours = spheres_paracrystal_dwba(dwba_q(GRID, FILM), torch.tensor([[r, pd, dist, om / dist, 1.0, 0.0]], dtype=D))
    # measured: median 4.7e-5, 99th percentile 8.3e-4, Yoneda band (of Si) max 2.4e-3
    _check(_rel_err(ba_map, ours), 2e-4, 2e-3, 5e-3, FILM)


def test_dwba_hard_disk_on_si_matches_bornagain():
    r, cov = 5.0, 0.3
    ba_map = _bornagain(SI, _particles("sphere", r, 1e-9)[4:5], lambda ba, part: ba.Dense2D(cov / (math.pi * r * r), part))
    ours = spheres_hard_disk_dwba(dwba_q(GRID, SI), torch.tensor([[r, 1e-9, cov, 1.0, 0.0]], dtype=D))
    # measured: median 5.1e-5, 99th percentile 9.0e-4, Yoneda band max 9.8e-4
    _check(_rel_err(ba_map, ours), 2e-4, 2e-3, 2e-3, SI)


def test_gradcheck_dwba_float64():
    grid = DetectorGrid.regular(LAM, math.radians(0.2), (0.0, 0.02), 3, (0.001, 0.02), 2)
    dq = dwba_q(grid, FILM)
    ps = torch.tensor([[4.0, 0.1, 20.0, 0.15, 2.0, 0.01]], dtype=D, requires_grad=True)
    pc = torch.tensor([[4.0, 0.1, 6.0, 20.0, 0.15, 2.0, 0.01]], dtype=D, requires_grad=True)
    ph = torch.tensor([[4.0, 0.1, 0.3, 2.0, 0.01]], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: spheres_paracrystal_dwba(dq, x), (ps,))
    assert torch.autograd.gradcheck(lambda x: cylinders_paracrystal_dwba(dq, x), (pc,))
    assert torch.autograd.gradcheck(lambda x: spheres_hard_disk_dwba(dq, x), (ph,))


def test_dwba_rejects_pixels_below_horizon_and_bad_substrates():
    below = DetectorGrid.regular(LAM, math.radians(0.2), (0.0, 0.02), 3, (-0.01, 0.02), 3)
    with pytest.raises(ValueError, match="alpha_f > 0"):
        dwba_q(below, SI)
    with pytest.raises(ValueError, match="Substrate"):
        Substrate(-1e-6, 0.0)
