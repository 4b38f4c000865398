"""The GISAXS inversion of a grazing run's own (q_xy, q_z) map (workers/inversion/maps.py,
GisaxsInverter.invert_map) without the service: the fitted bins' q and exit angles against
pyFAI's pixel positions (service.sim.grazing.reference_gi_pixels), the grid-search start where
the encoder's geometry does not fit the run's, against BornAgain's truth; the run's spec from
configuration and start document (service/run_spec.py)."""
import logging
import math

import numpy as np
import pytest
import torch

from service.config import load_settings
from service.run_spec import RunSpecBuilder
from service.sim.frames import poni_dict
from service.sim.gisaxs_particles import SI_12KEV, GisaxsParticleSimulator, particle_geometry
from service.sim.grazing import reference_gi_pixels
from workers.grazing import horizon_mask
from workers.inversion.maps import InversionMap
from workers.inversion.refine import GisaxsInverter
from workers.inversion.spec import GisaxsInversionSpec, SaxsInversionSpec, Substrate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPTS = dict(polarization_factor=0.95, dummy=-1.0, delta_dummy=0.5)


def test_map_bins_one_pixel_each_sit_at_their_pixel():
    """Bins finer than the pixels hold one pixel each: its centroid is the pixel's own q_xy, q_z
    and the bin's exit angle the pixel's (pyFAI positions, PHYSICS.md formulas)."""
    ggeo = particle_geometry(shape=(24, 20), pixel=1.5e-3, incident_angle=4e-3)
    ref = reference_gi_pixels(ggeo.geometry.to_pyfai(), ggeo.incident_angle)
    above = ref["alpha_f"] > 0
    imap = InversionMap(ggeo, npt=(200, 200), mask=horizon_mask(ggeo), **OPTS)
    p = imap.points
    assert p.index.size == above.sum()                        # every pixel above the horizon, once
    order = np.lexsort((ref["q_xy"][above], ref["q_z"][above]))
    got = np.lexsort((p.q_xy, p.q_z))
    np.testing.assert_allclose(p.q_xy[got], ref["q_xy"][above][order], atol=1e-9)
    np.testing.assert_allclose(p.q_z[got], ref["q_z"][above][order], atol=1e-9)
    np.testing.assert_allclose(p.alpha_f()[got], ref["alpha_f"][above][order], atol=1e-12)


def test_grid_search_start_where_the_encoder_geometry_differs(caplog):
    """alpha_i three times the encoder's: a warning once, LM from the grid search, the
    BornAgain truth recovered."""
    pytest.importorskip("bornagain")
    from service.train.inversion import load_encoder_checkpoint
    ggeo = particle_geometry(shape=(48, 48), pixel=7.5e-4, incident_angle=10.5e-3)
    sim = GisaxsParticleSimulator(ggeo, SI_12KEV, radius=(4.0, 5.0), duration=1.0, background=2e-3, seed=3)
    times = np.array([0.0, 1.0])
    frames = torch.from_numpy(np.stack([sim.frame(t) for t in times]))
    imap = InversionMap(ggeo, npt=(128, 128), mask=horizon_mask(ggeo), **OPTS)
    inv = GisaxsInverter(load_encoder_checkpoint("gisaxs"), model="spheres_paracrystal_dwba",
                         substrate=Substrate(*SI_12KEV))
    with caplog.at_level(logging.WARNING):
        for k in range(2):
            res = inv.invert_map(imap.points, *imap(frames[k:k + 1]))
            truth = sim.truth(times[k])
            assert res.warm_start == "grid" and bool(res.converged[0])
            assert abs(float(res.params[0, 0]) / truth["radius"] - 1) < 0.01
            assert abs(float(res.params[0, 2]) / truth["distance"] - 1) < 0.01
    assert sum("grid search" in r.message for r in caplog.records) == 1


def _start(inversion, modality="gisaxs"):
    ggeo = particle_geometry(shape=(16, 16), pixel=2e-3)
    hints = {"modality": modality, "inversion": inversion}
    if modality == "gisaxs":
        hints.update(incident_angle=ggeo.incident_angle, critical_angle=2.5e-3,
                     reduction={"rod_q_xy_band": [0.2, 0.4]})
    return {"uid": "u", "geometry": poni_dict(ggeo.geometry.to_pyfai()), "scatterflow": hints}


def test_run_spec_of_a_gisaxs_inversion(caplog):
    builder = RunSpecBuilder(load_settings(None, fit={"peaks": []}, phases={"enabled": False},
                                           tiled={"enabled": False}, results={"address": None}))
    spec = builder.build(_start({"enabled": True, "substrate": {"delta": 3.16e-6, "beta": 4.2e-8},
                                 "gisaxs": {"bounds": {"radius": [2.5, 7.0]}}})).inversion
    assert isinstance(spec, GisaxsInversionSpec) and spec.model == "spheres_paracrystal_dwba"
    assert spec.substrate == Substrate(3.16e-6, 4.2e-8) and spec.bounds == (("radius", 2.5, 7.0),)
    assert spec.state is not None and spec.state["model"] == "spheres_paracrystal"    # the shipped encoder
    born = builder.build(_start({"enabled": True, "gisaxs": {"model": "spheres_paracrystal"}})).inversion
    assert born.model == "spheres_paracrystal" and born.substrate is None
    assert isinstance(builder.build(_start({"enabled": True}, "saxs")).inversion, SaxsInversionSpec)
    with caplog.at_level(logging.WARNING):          # the DWBA needs a substrate: the run goes on without inversion
        assert builder.build(_start({"enabled": True})).inversion is None
    assert "needs start.scatterflow.inversion.substrate" in caplog.text
    with pytest.raises(ValueError, match="may not name files"):
        builder.build(_start({"enabled": True, "gisaxs": {"checkpoint": "/tmp/x.pt"}}))
    with pytest.raises(ValueError, match="gisaxs.bounds|not a shape parameter"):
        builder.build(_start({"enabled": True, "gisaxs": {"bounds": {"volfraction": [0, 1]}}}))
    with pytest.raises(ValueError, match="delta"):
        builder.build(_start({"enabled": True, "substrate": {"delta": -1.0, "beta": 0.0}}))
    assert math.isclose(GisaxsInverter(None, model="spheres_paracrystal").lower[0].item(), 1.0)


def test_a_q_range_without_pixels_leaves_the_reduction(caplog):
    """A GISAXS run whose inversion q_range holds no pixel: an error logged, the frames reduced,
    no inversion rows."""
    from workers.pipeline import IntegratorCache, RunPipeline
    builder = RunSpecBuilder(load_settings(None, fit={"peaks": []}, phases={"enabled": False},
                                           tiled={"enabled": False}, results={"address": None}))
    spec = builder.build(_start({"enabled": True, "q_range": [50.0, 60.0],
                                 "gisaxs": {"model": "spheres_paracrystal"}}))
    frames = np.ones((2, 16, 16), np.int32)
    with caplog.at_level(logging.ERROR):
        out = RunPipeline(spec, "cpu", IntegratorCache()).process(np.array([1, 2]), np.zeros(2), frames)
    assert out.inversion is None and out.profiles.intensity.shape[0] == 2
    assert "no GISAXS inversion" in caplog.text


def test_map_weight_and_dark_give_the_integrator_errors():
    """MapPoints' weight and dark reproduce the integrator's Poisson errors of each bin,
    sqrt(max(I W + D, 1)) / W, with a dark image."""
    ggeo = particle_geometry(shape=(24, 20), pixel=1.5e-3)
    rng = np.random.default_rng(0)
    dark = rng.uniform(0, 5, ggeo.shape)
    frames = torch.from_numpy(rng.poisson(30.0, (2, *ggeo.shape)).astype(np.int32))
    imap = InversionMap(ggeo, npt=(10, 12), mask=horizon_mask(ggeo), dark=dark, **OPTS)
    y, s = imap(frames)
    w, d = torch.as_tensor(imap.points.weight), torch.as_tensor(imap.points.dark)
    np.testing.assert_allclose(s.numpy(), (torch.sqrt((y * w + d).clamp_min(1.0)) / w).numpy(), rtol=1e-5)


def test_inversion_map_bins_under_the_limits():
    from service.errors import LimitExceeded
    builder = RunSpecBuilder(load_settings(None, fit={"peaks": []}, phases={"enabled": False}, tiled={"enabled": False},
                                           results={"address": None}, limits={"qmap_npt": 256}))
    with pytest.raises(LimitExceeded, match="gisaxs.qmap_npt = 512 is above the ceiling limits.qmap_npt = 256"):
        builder.build(_start({"enabled": True, "gisaxs": {"model": "spheres_paracrystal", "qmap_npt": [512, 64]}}))


def test_forward_difference_jacobian_against_central():
    """GisaxsInverter's forward-difference Jacobian (BasisModel diff="forward") against the
    central one in float64, and the LM's optimum and errors with each on the same map."""
    from workers.inversion.models import BasisModel
    ggeo = particle_geometry(shape=(32, 32), pixel=1.1e-3)
    imap = InversionMap(ggeo, npt=(64, 64), mask=horizon_mask(ggeo), **OPTS)
    inv = GisaxsInverter(None, model="spheres_paracrystal_dwba", substrate=Substrate(*SI_12KEV),
                         bounds={"radius": (2.0, 8.0), "distance": (12.0, 40.0)})
    truth = torch.tensor([[4.5, 0.1, 20.0, 0.15, 1e3, 1.0]], dtype=torch.float64)
    inv._pts, _ = inv._use_map(imap.points)
    x = torch.arange(imap.points.index.size, dtype=torch.float64)
    basis = lambda xx, sh: inv._basis(xx, sh)                                                   # noqa: E731
    jac = {d: BasisModel(basis, x, inv.lower, inv.upper, 1, d).evaluate_and_jacobian(truth)[1][0]
           for d in ("central", "forward")}
    rel = (jac["forward"] - jac["central"]).norm(dim=1) / jac["central"].norm(dim=1)
    assert rel.max() < 2e-3                  # distance: the structure peak is sharp
    mu = inv._fn(x, truth)
    w = torch.as_tensor(imap.points.weight)
    y = torch.poisson((mu * w).clamp_min(0), generator=torch.Generator().manual_seed(0)) / w
    s = torch.sqrt((y * w).clamp_min(1.0)) / w
    res = {}
    for d in ("central", "forward"):
        inv.diff = d
        res[d] = inv.invert_map(imap.points, y, s)
    se = res["central"].stderr[0, :4]
    assert torch.all((res["forward"].params[0, :4] - res["central"].params[0, :4]).abs() < 1e-3 * se)
    assert torch.allclose(res["forward"].stderr[0, :4], se, rtol=1e-3)
