"""Grazing-incidence numerics (workers/grazing.py) against independent references.

References: PHYSICS.md's GI formulas evaluated here in numpy from pyFAI's float64 pixel
positions; pyFAI 2026's fibre units (qip/qoop) and FiberIntegrator; pygix 2022 ``calc_q``;
the Ewald-sphere bound of the missing wedge derived here; the simulator's ground truth
(service/sim/grazing.py) for peak positions, the Yoneda band and orientation distributions.
"""
import math

import numpy as np
import pytest
import torch

from service.sim.azopolymer import AzoCycle, PeakStates
from service.sim.grazing import GrazingFrameSimulator
from workers.geometry import Geometry
from workers.grazing import (GrazingGeometry, build_chi_sector, build_horizontal_cut, build_qmap,
                             build_vertical_cut, build_wedge_profiles, build_yoneda_cut,
                             gi_from_positions, gi_pixels, hermans_orientation, horizon_mask,
                             q_xy_qz)
from workers.integrate import integrate_reference

AI = 3.5e-3          # incidence angle, rad
AC = 1.8e-3          # critical angle of the simulated film, rad
PX = 4 * 172e-6      # 4x4-binned Pilatus pixels for the small GIWAXS detector


def giwaxs_geometry(**kw):
    """Pilatus-300k-like landscape detector, 4x4 binned, beam near the bottom edge, at 0.15 m."""
    return Geometry(dist=0.15, poni1=0.005, poni2=0.0533, detector="Detector", pixel1=PX, pixel2=PX,
                    shape=(122, 155), **kw)


def gisaxs_geometry():
    """Fine vertical pixels (Yoneda resolved), coarse horizontal ones (rods at ±3.2 1/nm in range)."""
    return Geometry(dist=0.5, poni1=0.002, poni2=0.045, detector="Detector", pixel1=172e-6,
                    pixel2=5e-4, shape=(150, 180))


def physics_q(ai_pyfai, incident_angle, tilt_angle, sample_orientation=1):
    """PHYSICS.md formulas per pixel: lab angles from pyFAI's float64 positions, exit angles in
    the sample frame (surface rolled by τ about the beam, then pitched by αi), then q."""
    d1, d2 = np.indices(ai_pyfai.detector.shape, dtype=np.float64)   # float64 pixel indices
    z, y, x = ai_pyfai.calc_pos_zyx(d1=d1, d2=d2, use_cython=False)  # beam, up (t1), horizontal (t2)
    x, y = {1: (x, y), 6: (-y, x)}[sample_orientation]         # pyFAI EXIF orientation 6
    tth, chi = np.arctan2(np.hypot(x, y), z), np.arctan2(y, x)
    kf = np.stack([np.cos(tth), np.sin(tth) * np.cos(chi), np.sin(tth) * np.sin(chi)])
    c, s = math.cos(tilt_angle), math.sin(tilt_angle)
    roll = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    c, s = math.cos(incident_angle), math.sin(incident_angle)
    pitch = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    kx, ky, kz = np.einsum("ij,jab->iab", pitch @ roll, kf)
    alpha_f, tth_f = np.arcsin(kz), np.arctan2(ky, kx)
    k = 2e-9 * math.pi / ai_pyfai.wavelength
    qx = k * (math.cos(incident_angle) - np.cos(alpha_f) * np.cos(tth_f))
    qy = k * np.cos(alpha_f) * np.sin(tth_f)
    qz = k * (math.sin(incident_angle) + np.sin(alpha_f))
    return np.sign(qy) * np.hypot(qx, qy), qz, alpha_f, tth_f


# ---------------------------------------------------------------------------------------
# q per pixel
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tilt,orientation", [(0.0, 1), (0.026, 1), (0.01, 6)])
def test_q_per_pixel_matches_physics_formulas(tilt, orientation):
    g = giwaxs_geometry(rot1=0.01, rot2=-0.005, rot3=0.02)
    gg = GrazingGeometry(g, incident_angle=AI, tilt_angle=tilt, sample_orientation=orientation)
    qxy_ref, qz_ref, af_ref, tthf_ref = physics_q(g.to_pyfai(), AI, tilt, orientation)
    q_xy, q_z = q_xy_qz(gg)
    p = gi_pixels(gg)
    assert np.abs(q_xy.numpy() - qxy_ref).max() < 1e-9
    assert np.abs(q_z.numpy() - qz_ref).max() < 1e-9
    assert np.abs(p.alpha_f.numpy() - af_ref).max() < 1e-12
    assert np.abs(p.tth_f.numpy() - tthf_ref).max() < 1e-12
    assert q_z.numpy().max() > 20 and np.abs(q_xy.numpy()).max() > 15     # a wide GIWAXS range


@pytest.mark.parametrize("orientation", [1, 6])
def test_q_matches_pyfai_fiber_units(orientation):
    import pyFAI.units as units
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    g = giwaxs_geometry(rot1=0.01, rot2=-0.005, rot3=0.02)
    # a fresh integrator: pyFAI caches unit arrays by unit name, not by sample orientation
    ai = AzimuthalIntegrator(dist=g.dist, poni1=g.poni1, poni2=g.poni2, rot1=g.rot1, rot2=g.rot2,
                             rot3=g.rot3, wavelength=g.wavelength, detector=g.to_pyfai().detector)
    conf = dict(incident_angle=AI, tilt_angle=0.0, sample_orientation=orientation)
    qip = ai.array_from_unit(unit=units.parse_fiber_unit("qip_nm^-1", **conf), typ="center", scale=True)
    qoop = ai.array_from_unit(unit=units.parse_fiber_unit("qoop_nm^-1", **conf), typ="center", scale=True)
    chigi = ai.array_from_unit(unit=units.parse_fiber_unit("chigi_rad", **conf), typ="center", scale=True)
    p = gi_pixels(GrazingGeometry(g, incident_angle=AI, sample_orientation=orientation))
    assert np.abs(p.q_xy.numpy() - qip).max() < 1e-9
    assert np.abs(p.q_z.numpy() - qoop).max() < 1e-9
    assert np.abs(p.chi.numpy() - chigi).max() < 1e-9


def test_q_matches_pygix_with_tilt():
    pygix = pytest.importorskip("pygix")
    g = giwaxs_geometry(rot1=0.01, rot2=-0.005, rot3=0.02)
    tr = pygix.Transform(dist=g.dist, poni1=g.poni1, poni2=g.poni2, rot1=g.rot1, rot2=g.rot2,
                         rot3=g.rot3, wavelength=g.wavelength, detector=g.to_pyfai().detector)
    tr.incident_angle, tr.tilt_angle, tr.sample_orientation = math.degrees(AI), 1.5, 1
    qz_gix, qxy_gix = tr.giq_center_array(g.shape)               # pygix units: 100 1/nm
    q_xy, q_z = q_xy_qz(GrazingGeometry(g, incident_angle=AI, tilt_angle=math.radians(1.5)))
    # pygix works in float32 (2e-6 here); pyFAI's other rotation order is 3.6e-5 away
    assert np.abs(q_z.numpy() - 100 * qz_gix).max() < 5e-6
    assert np.abs(q_xy.numpy() + 100 * qxy_gix).max() < 5e-6   # pygix: q_y ∝ −t2


def test_gi_quantities_are_differentiable():
    g = giwaxs_geometry()
    pos1 = torch.tensor([0.03, 0.06, 0.08], dtype=torch.float64)
    pos2 = torch.tensor([0.01, 0.05, 0.09], dtype=torch.float64)
    params = torch.tensor(g.params, dtype=torch.float64, requires_grad=True)
    angles = torch.tensor([AI, 0.01], dtype=torch.float64, requires_grad=True)

    def f(params, angles):
        p = gi_from_positions(params, pos1, pos2, wavelength=g.wavelength, incident_angle=angles[0],
                              tilt_angle=angles[1])
        return torch.cat([p.q_xy, p.q_z, p.alpha_f])

    assert torch.autograd.gradcheck(f, (params, angles))


# ---------------------------------------------------------------------------------------
# Remapping to (q_xy, q_z)
# ---------------------------------------------------------------------------------------
def test_qmap_no_split_matches_pyfai_fiber_integrator():
    from pyFAI.integrator.fiber import FiberIntegrator

    g = giwaxs_geometry(rot1=0.01, rot2=-0.005)
    ai = g.to_pyfai()
    frame = np.random.default_rng(0).poisson(1000.0, size=g.shape).astype(np.float64)
    npt, rxy, rz = (80, 60), (-10.0, 10.0), (0.5, 20.0)
    qm = build_qmap(GrazingGeometry(g, incident_angle=AI), npt=npt, q_xy_range=rxy, q_z_range=rz,
                    method="no", polarization_factor=0.95, dtype=torch.float64)
    ours = qm(frame)
    fi = FiberIntegrator(dist=ai.dist, poni1=ai.poni1, poni2=ai.poni2, rot1=ai.rot1, rot2=ai.rot2,
                         rot3=ai.rot3, detector=ai.detector, wavelength=ai.wavelength)
    ref = fi.integrate2d_grazing_incidence(frame, npt_ip=npt[0], npt_oop=npt[1], ip_range=rxy,
                                           oop_range=rz, incident_angle=AI, tilt_angle=0.0,
                                           sample_orientation=1, method=("no", "csr", "cython"),
                                           polarization_factor=0.95)
    assert np.allclose(qm.q_xy, ref.inplane) and np.allclose(qm.q_z, ref.outofplane)
    inner = np.zeros(ref.count.shape, bool)
    inner[1:-1, 1:-1] = True     # pyFAI also puts pixels up to one bin outside the range in edge bins
    count = ours.count.numpy()
    assert np.array_equal(count[inner], ref.count[inner])
    filled = inner & (ref.count > 0)
    i_ours = ours.intensity[0].numpy()
    assert np.allclose(i_ours[filled], ref.intensity[filled], rtol=1e-6)
    assert np.isnan(i_ours[ref.count == 0]).all()                 # missing wedge: NaN, not 0
    assert (ref.count[inner] == 0).sum() > 100                     # and there is a wedge


@pytest.mark.parametrize("method", ["bbox", "no"])
def test_missing_wedge_where_theory_puts_it(method):
    g = giwaxs_geometry()
    gg = GrazingGeometry(g, incident_angle=AI)
    k = 2e-9 * math.pi / g.wavelength
    # "no": bins of >= 1.5 pixels, so that every reachable bin holds a pixel centre
    npt, rxy = ((60, 60), (-4.0, 4.0)) if method == "bbox" else ((30, 24), (-6.0, 6.0))
    qm = build_qmap(gg, npt=npt, q_xy_range=rxy, q_z_range=(4.0, 16.0), method=method)
    res = qm(np.ones(g.shape))
    count, intensity = res.count.numpy(), res.intensity[0].numpy()   # (n_qz, n_qxy)
    dxy = np.diff(qm.q_xy).mean()
    dz = np.diff(qm.q_z).mean()

    def bound(qz):      # |q_xy| min on the Ewald sphere: 2θf = 0, αf = asin(q_z/k − sin αi)
        return k * np.abs(math.cos(AI) - np.sqrt(1 - (qz / k - math.sin(AI)) ** 2))

    pix = k * PX / g.dist * (1.0 if method == "bbox" else 0.5)   # a pixel's extent (or half) in q
    lo_z, hi_z = qm.q_z - dz / 2 - pix, qm.q_z + dz / 2 + pix
    far = np.abs(qm.q_xy)[None, :] + dxy / 2                     # bin's largest |q_xy|
    near = np.abs(qm.q_xy)[None, :] - dxy / 2                    # bin's smallest |q_xy|
    empty = far < bound(lo_z)[:, None]                           # unreachable whatever its q_z
    full = near > bound(hi_z)[:, None] + pix                     # reachable everywhere, with margin
    assert empty.sum() > 50 and full.sum() > 50
    assert (count[empty] == 0).all() and np.isnan(intensity[empty]).all()   # empty, not interpolated
    assert (count[full] > 0).all() and np.isfinite(intensity[full]).all()
    # the boundary between both lies within one bin (+ a pixel) of the theoretical curve
    assert (~empty & ~full).sum() < 0.25 * count.size


@pytest.mark.parametrize("tilt", [0.0, 0.02])
def test_remap_conserves_counts_and_matches_reference(tilt):
    g = giwaxs_geometry(rot1=0.01)
    gg = GrazingGeometry(g, incident_angle=AI, tilt_angle=tilt)
    rng = np.random.default_rng(1)
    frames = rng.poisson(50.0, size=(3, *g.shape)).astype(np.float64)
    mask = np.zeros(g.shape, bool)
    mask[:, 70:74] = True
    qm = build_qmap(gg, npt=(150, 120), method="bbox", mask=mask, polarization_factor=0.95,
                    dtype=torch.float64)                     # default ranges: every pixel fits
    res = qm(frames)
    totals = frames[:, ~mask].sum(axis=1)
    assert np.allclose(res.signal.sum(dim=(1, 2)).numpy(), totals, rtol=1e-12)
    assert res.count.sum().item() == pytest.approx((~mask).sum(), rel=1e-12)
    i_ref, s_ref = integrate_reference(qm, frames[1])          # plain scipy path, float64
    assert np.allclose(res.intensity[1].numpy().ravel(), i_ref, rtol=1e-10, equal_nan=True)
    assert np.allclose(res.sigma[1].numpy().ravel(), s_ref, rtol=1e-10, equal_nan=True)


def test_gisaxs_rods_remapped_at_truth_positions():
    gg = GrazingGeometry(gisaxs_geometry(), incident_angle=AI)
    sim = GrazingFrameSimulator(gg, mode="gisaxs", critical_angle=AC, flux=50.0, seed=3)
    truth = sim.truth(5.0)
    qm = build_qmap(gg, npt=(220, 100), q_xy_range=(-5.5, 5.5), q_z_range=(0.0, 3.0),
                    polarization_factor=0.95)
    res = qm(sim.frame(5.0))
    rows = (qm.q_z > 1.0) & (qm.q_z < 2.5)                    # along the rods, away from Yoneda
    prof = np.nanmean(res.intensity[0].numpy()[rows], axis=0)
    step = qm.q_xy[1] - qm.q_xy[0]
    c = float(truth["rod_center"])
    for sign in (1.0, -1.0):
        near = np.abs(qm.q_xy - sign * c) < 0.6
        peak = qm.q_xy[near][np.argmax(prof[near])]
        assert abs(peak - sign * c) <= step
        assert prof[near].max() > 2.5 * np.nanmin(prof[near])   # a rod over the diffuse background
    # the same with a horizontal cut built on pixels directly
    cut = build_horizontal_cut(gg, q_z_band=(1.0, 2.5), npt=220, q_xy_range=(-5.5, 5.5),
                               polarization_factor=0.95)(sim.frame(5.0))
    x, y = cut.radial.numpy(), cut.intensity[0].numpy()
    near = np.abs(x - c) < 0.6
    assert abs(x[near][np.nanargmax(y[near])] - c) <= step


def test_yoneda_band_at_critical_angle():
    gg = GrazingGeometry(gisaxs_geometry(), incident_angle=AI)
    sim = GrazingFrameSimulator(gg, mode="gisaxs", critical_angle=AC, flux=200.0, seed=4)
    frame = sim.frame(5.0)
    k = 2e-9 * math.pi / gg.geometry.wavelength
    qz_yoneda = k * (math.sin(AI) + math.sin(AC))                 # αf = αc
    vcut = build_vertical_cut(gg, q_xy_band=(1.0, 1.8), both_sides=True, npt=120,
                              q_z_range=(0.0, 1.2), polarization_factor=0.95)(frame)
    z, y = vcut.radial.numpy(), vcut.intensity[0].numpy()
    pixel_qz = k * 172e-6 / gg.geometry.dist
    assert abs(z[np.nanargmax(y)] - qz_yoneda) < pixel_qz
    below = z < k * math.sin(AI) - pixel_qz                          # αf < 0 by more than a pixel
    assert np.nanmax(y[below]) < 1e-3 * np.nanmax(y)                 # the horizon's shadow
    # horizontal cuts at αf = (0.5, 1, 2, 3) αc: the one at αc (the Yoneda cut) is the brightest
    # (|t|² = 1, 3.9, 1.15, 1.06 at the band centres; band ± αc/8 and pixels smooth the cusp)
    opts = dict(npt=60, q_xy_range=(0.8, 2.0), polarization_factor=0.95)
    yon = build_yoneda_cut(gg, critical_angle=AC, half_width=AC / 8, **opts)(frame).intensity[0].numpy()
    for m in (0.5, 2.0, 3.0):
        band = [k * (math.sin(AI) + math.sin(a)) for a in (m * AC - AC / 8, m * AC + AC / 8)]
        other = build_horizontal_cut(gg, q_z_band=band, **opts)(frame).intensity[0].numpy()
        assert np.nanmedian(yon / other) > 2.0


def _pi_pi_only_cycle(pi_pi_area=(70.0, 0.0)):
    zero = PeakStates(center=(3.2, 3.2), fwhm=(0.2, 0.2), area=(0.0, 0.0), eta=0.3)
    halo = PeakStates(center=(14.0, 14.0), fwhm=(5.0, 5.0), area=(0.0, 0.0), eta=0.2)
    pp = PeakStates(center=(17.5, 17.5), fwhm=(0.9, 0.9), area=pi_pi_area, eta=0.5)
    return AzoCycle(peaks={"lamellar": zero, "pi_pi": pp, "halo": halo}, background_amplitude=0.0,
                    background_constant=0.0)


def test_sin_chi_correction_recovers_orientation_distribution():
    from scipy.integrate import quad

    gg = GrazingGeometry(giwaxs_geometry(), incident_angle=AI)
    width, iso = 0.5, 0.1
    sim = GrazingFrameSimulator(gg, _pi_pi_only_cycle(), mode="giwaxs", critical_angle=AC,
                                orientation_width=width, isotropic_fraction=iso, flux=20.0,
                                noise="none")
    frame = sim.frame(5.0)
    chi_range = (15.0, 75.0)     # clear of the missing wedge (χ < 9°) and of the Yoneda rows (χ ≈ 90°)
    opts = dict(q_band=(16.0, 19.0), npt=30, chi_range=chi_range, polarization_factor=0.95)
    chi = build_chi_sector(gg, **opts)
    corr = chi(frame).intensity[0].numpy()
    raw = build_chi_sector(gg, sin_chi_correction=False, **opts)(frame).intensity[0].numpy()
    c = np.radians(chi.radial)
    gauss = lambda x: np.exp(-0.5 * (x / width) ** 2)
    n_hemi = quad(lambda x: gauss(x) * math.sin(x), 0, math.pi / 2)[0]
    pole = lambda x: iso + (1 - iso) * gauss(x) / n_hemi                   # the truth g(χ)
    truth = pole(c) * np.sin(c)                                            # polar-angle distribution
    norm = lambda a: a / a.sum()
    assert np.abs(norm(corr) / norm(truth) - 1).max() < 0.03
    assert np.abs(norm(raw) / norm(truth) - 1).max() > 0.3                  # uncorrected does not
    lo, hi = np.radians(chi_range)
    num = quad(lambda x: pole(x) * math.sin(x) * math.cos(x) ** 2, lo, hi)[0]
    den = quad(lambda x: pole(x) * math.sin(x), lo, hi)[0]
    f_truth = 1.5 * num / den - 0.5
    assert float(hermans_orientation(chi.radial, corr)[0]) == pytest.approx(f_truth, abs=0.01)


def _peak_height(q, y, centre, half=1.2, gap=0.6):
    """Peak height above a straight line through the flanks (centre ± [gap, half] away)."""
    flank = (np.abs(q - centre) > gap) & (np.abs(q - centre) < half) & np.isfinite(y)
    line = np.polyval(np.polyfit(q[flank], y[flank], 1), q)
    core = np.abs(q - centre) < 0.2 * gap
    return np.nanmax((y - line)[core])


def test_giwaxs_wedges_show_face_on_pi_pi_and_edge_on_lamellae():
    gg = GrazingGeometry(giwaxs_geometry(), incident_angle=AI)
    sim = GrazingFrameSimulator(gg, mode="giwaxs", critical_angle=AC, flux=20.0, seed=5)
    truth = sim.truth(5.0)
    mask = sim.mask | horizon_mask(gg)
    oop, ip = build_wedge_profiles(gg, npt=400, q_range=(1.0, 21.0), mask=mask,
                                   polarization_factor=0.95)
    frame = sim.frame(5.0)
    r_oop, r_ip = oop(frame), ip(frame)
    q = r_oop.radial.numpy()
    y_oop, y_ip = r_oop.intensity[0].numpy(), r_ip.intensity[0].numpy()
    pp, lam = float(truth["pi_pi_center"]), float(truth["lamellar_center"])
    step = q[1] - q[0]
    for y, centre, half in ((y_oop, pp, 2.0), (y_ip, lam, 0.5)):   # strong peaks where the truth puts them
        near = np.abs(q - centre) < half
        assert abs(q[near][np.nanargmax(y[near])] - centre) <= 2 * step
    pp_ratio = _peak_height(q, y_oop, pp, 3.0, 1.5) / _peak_height(q, y_ip, pp, 3.0, 1.5)
    lam_ratio = _peak_height(q, y_ip, lam, 1.0, 0.5) / _peak_height(q, y_oop, lam, 1.0, 0.5)
    assert pp_ratio > 3.0          # face-on π-π: out-of-plane
    assert lam_ratio > 3.0         # edge-on lamellae: in-plane


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------
def test_bad_options_raise_value_error():
    g = giwaxs_geometry()
    gg = GrazingGeometry(g, incident_angle=AI)
    bad = [
        lambda: GrazingGeometry(g, incident_angle=-0.1),
        lambda: GrazingGeometry(g, incident_angle=AI, tilt_angle=2.0),
        lambda: GrazingGeometry(g, incident_angle=AI, sample_orientation=9),
        lambda: build_qmap(gg, method="full"),
        lambda: build_qmap(gg, npt=(10,)),
        lambda: build_qmap(gg, npt=(0, 10)),
        lambda: build_qmap(gg, q_xy_range=(1.0, 1.0)),
        lambda: build_horizontal_cut(gg, q_z_band=(2.0, 1.0)),
        lambda: build_vertical_cut(gg, q_xy_band=(-1.0, 1.0), both_sides=True),
        lambda: build_chi_sector(gg, q_band=(-1.0, 2.0)),
        lambda: build_chi_sector(gg, q_band=(40.0, 41.0)),            # no pixel there
        lambda: build_wedge_profiles(gg, in_plane=(70.0, 200.0)),
        lambda: build_yoneda_cut(gg, critical_angle=0.0),
        lambda: build_yoneda_cut(gg, critical_angle=AC, half_width=AC),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


@pytest.mark.gpu
def test_qmap_on_cuda_matches_cpu():
    gg = GrazingGeometry(giwaxs_geometry(), incident_angle=AI)
    frames = np.random.default_rng(2).poisson(20.0, size=(4, *gg.shape)).astype(np.int32)
    cpu = build_qmap(gg, npt=(100, 80), dtype=torch.float64)(frames)
    gpu = build_qmap(gg, npt=(100, 80), dtype=torch.float64, device="cuda")(torch.as_tensor(frames).cuda())
    assert torch.allclose(gpu.intensity.cpu(), cpu.intensity, rtol=1e-10, equal_nan=True)
