"""GrazingFrameSimulator (service/sim/grazing.py): geometry, Fresnel/Yoneda factor, horizon,
orientation normalisation and the AzoCycle kinetics, against closed forms and an independent
reduction (workers.grazing, itself tested against pyFAI/pygix in test_grazing.py)."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import erf

from service.sim.azopolymer import AzoCycle, PeakStates, flatten_truth
from service.sim.grazing import (GrazingFrameSimulator, default_grazing_geometry,
                                 fresnel_transmission, orientation_weight)
from workers.geometry import Geometry
from workers.grazing import (GrazingGeometry, build_horizontal_cut, build_wedge_profiles, gi_pixels,
                             horizon_mask)

AI, AC = 3.5e-3, 1.8e-3
PX = 4 * 172e-6


def small_giwaxs(**kw):
    g = Geometry(dist=0.15, poni1=0.005, poni2=0.0533, detector="Detector", pixel1=PX, pixel2=PX,
                 shape=(122, 155), **kw)
    return g


def test_simulator_q_matches_workers_grazing():
    g = small_giwaxs(rot1=0.01, rot2=-0.004, rot3=0.01)
    gg = GrazingGeometry(g, incident_angle=AI, tilt_angle=0.02)
    sim = GrazingFrameSimulator(gg, mode="giwaxs", critical_angle=AC)
    p = gi_pixels(gg)
    for name in ("q_xy", "q_z", "q", "chi", "alpha_f", "tth_f"):
        assert np.abs(sim.pixels[name] - getattr(p, name).numpy()).max() < 1e-9, name


def test_horizon_shadow():
    g = small_giwaxs()                                    # no detector rotation
    gg = GrazingGeometry(g, incident_angle=AI)
    sim = GrazingFrameSimulator(gg, mode="giwaxs", critical_angle=AC, noise="none")
    lam = sim.expected(5.0)
    t1 = (np.arange(g.shape[0]) + 0.5) * g.pixel1 - g.poni1          # height above the beam, m
    shadow = t1 <= g.dist * math.tan(AI)                              # exit ray below the surface
    assert shadow.sum() >= 3 and (~shadow).sum() > 100
    assert (lam[shadow] == 0).all()
    assert (lam[~shadow] > 0).all()
    assert np.array_equal(horizon_mask(gg)[:, 0], shadow)


def test_fresnel_transmission_closed_forms_and_yoneda_maximum():
    a = np.linspace(1e-5, 8e-3, 4001)
    s = np.sin(a)
    below = s < math.sin(AC)
    closed = np.where(below, 4 * s ** 2 / AC ** 2,
                      4 * s ** 2 / (s + np.sqrt(np.clip(s ** 2 - AC ** 2, 0, None))) ** 2)
    assert np.allclose(fresnel_transmission(a, AC, 0.0), closed, rtol=1e-9)
    assert fresnel_transmission(np.array([0.0, -1e-3]), AC, 0.0).tolist() == [0.0, 0.0]
    fine = np.linspace(0.5 * AC, 1.5 * AC, 20001)
    peak = fine[np.argmax(fresnel_transmission(fine, AC, 2e-9))]
    assert abs(peak / AC - 1) < 0.01                                   # Yoneda at αf ≈ αc


@pytest.mark.parametrize("axis", ["normal", "plane"])
def test_orientation_weight_hemisphere_normalised(axis):
    g = lambda c: float(orientation_weight(np.array([c]), axis=axis, width=0.2, isotropic_fraction=0.1)[0])
    assert quad(lambda c: g(c) * math.sin(c), 0, math.pi / 2, limit=200)[0] == pytest.approx(1.0, rel=1e-6)
    peak_at = 0.0 if axis == "normal" else math.pi / 2
    assert g(peak_at) > 10 * g(math.pi / 2 - peak_at)


def _cycle(pi_pi_area, background=0.0):
    """Only a π-π ring (fixed centre and width, area 70·x or 0) over a constant halo."""
    zero = PeakStates(center=(3.2, 3.2), fwhm=(0.2, 0.2), area=(0.0, 0.0), eta=0.3)
    halo = PeakStates(center=(14.0, 14.0), fwhm=(5.0, 5.0), area=(85.0, 85.0), eta=0.2)
    pp = PeakStates(center=(17.5, 17.5), fwhm=(0.9, 0.9), area=pi_pi_area, eta=0.5)
    return AzoCycle(peaks={"lamellar": zero, "pi_pi": pp, "halo": halo},
                    background_amplitude=background, background_constant=0.0)


def test_crystalline_fraction_follows_azocycle():
    gg = GrazingGeometry(small_giwaxs(), incident_angle=AI)
    opts = dict(mode="giwaxs", critical_angle=AC, flux=50.0, noise="none")
    sim = GrazingFrameSimulator(gg, _cycle((70.0, 0.0)), **opts)
    halo_only = GrazingFrameSimulator(gg, _cycle((0.0, 0.0)), **opts).frame(0.0)
    oop, _ = build_wedge_profiles(gg, npt=200, q_range=(11.0, 21.0), mask=horizon_mask(gg),
                                  polarization_factor=0.95)
    halo = oop(halo_only).intensity[0]
    times = np.array([5.0, 15.0, 25.0, 39.0, 50.0])              # dark, UV, UV, UV, visible
    x = sim.cycle.crystallinity(times)
    assert x[0] == 1.0 and x[3] < 0.2
    peak = np.array([float(torch.nansum(oop(sim.frame(t)).intensity[0] - halo)) for t in times])
    assert np.allclose(peak / peak[0], x, atol=1e-3)           # π-π area 70 x (noiseless counts)


def test_gisaxs_rod_area_matches_truth():
    g = Geometry(dist=0.5, poni1=0.002, poni2=0.045, detector="Detector", pixel1=172e-6,
                 pixel2=5e-4, shape=(150, 180))
    gg = GrazingGeometry(g, incident_angle=AI)
    cycle = AzoCycle(background_amplitude=0.0, background_constant=0.0)       # rods only
    sim = GrazingFrameSimulator(gg, cycle, mode="gisaxs", critical_angle=AC, flux=50.0,
                                noise="none", rod_decay=2.0)
    truth = sim.truth(5.0)
    band = (1.45, 1.55)
    cut = build_horizontal_cut(gg, q_z_band=band, npt=440, q_xy_range=(-5.5, 5.5),
                               polarization_factor=0.95)(sim.frame(5.0))
    x, y = cut.radial.numpy(), cut.intensity[0].numpy()
    c, fwhm, eta = float(truth["rod_center"]), float(truth["rod_fwhm"]), float(truth["lamellar_eta"])
    qz, half = 0.5 * sum(band), 0.6
    s = math.sin(math.asin(qz / gg.k - math.sin(AI)))                  # sin αf at the band centre
    trans = 4 * s * s / (s + math.sqrt(s * s - AC * AC)) ** 2          # |t(αf)|² above αc
    rod = 1.0 / (1.0 + (qz / 2.0) ** 2)
    inside = (eta * 2 / math.pi * math.atan(half / (fwhm / 2))          # pV area within ± half
              + (1 - eta) * erf(half * 2 * math.sqrt(math.log(2)) / fwhm))
    for sign in (1.0, -1.0):
        near = np.abs(x - sign * c) < half
        area = np.nansum(y[near]) * (x[1] - x[0])
        assert area == pytest.approx(float(truth["rod_area"]) * trans * rod * inside, rel=0.01)


def test_truth_columns_and_default_frames():
    sim = GrazingFrameSimulator(mode="gisaxs", flux=2.0, seed=1)
    tr = sim.truth(np.array([5.0, 30.0]))
    base = flatten_truth(sim.cycle.truth(np.array([5.0, 30.0])), scale=2.0)
    for key in ("lamellar_center", "lamellar_area", "pi_pi_area", "crystallinity"):
        assert np.array_equal(tr[key], base[key])
    assert np.allclose(tr["rod_area"], 0.5 * base["lamellar_area"])
    assert np.allclose(tr["yoneda_qz"], 2e-9 * math.pi / 1e-10 * (math.sin(AI) + math.sin(AC)))
    frame = sim.frame(5.0)
    assert frame.shape == (619, 487) and frame.dtype == np.int32
    assert (frame[sim.mask] == -1).all() and frame.max() > 100
    assert default_grazing_geometry("giwaxs").shape == (487, 619)


def test_bad_options_raise_value_error():
    gg = GrazingGeometry(small_giwaxs(), incident_angle=AI)
    bad = [dict(mode="saxs"), dict(flux=0.0), dict(critical_angle=-1e-3), dict(beta=-1.0),
           dict(isotropic_fraction=1.5), dict(noise="gaussian"), dict(orientation_width=0.0),
           dict(polarization_factor=2.0)]
    for kw in bad:
        with pytest.raises(ValueError):
            GrazingFrameSimulator(gg, **kw)
    with pytest.raises(ValueError):
        GrazingFrameSimulator(GrazingGeometry(small_giwaxs(), incident_angle=AI, sample_orientation=2))
    with pytest.raises(ValueError):
        default_grazing_geometry("saxs")
