"""workers.geometry against pyFAI (float64 2θ/χ/q, PONI files, masks) and gradient checks."""
import logging
import warnings

import numpy as np
import pytest
import torch

from workers.geometry import Geometry, pixel_positions, q_from_tth, tth_chi

warnings.filterwarnings("ignore", module="pyFAI")
logging.getLogger("pyFAI").setLevel(logging.ERROR)

TILTED = dict(dist=0.12, poni1=0.004, poni2=0.007, rot1=0.05, rot2=-0.04, rot3=0.3,
              wavelength=0.9e-10, detector="Detector", pixel1=1e-4, pixel2=1.2e-4, shape=(40, 50))


@pytest.mark.parametrize("orientation", [1, 2, 3, 4])
def test_tth_chi_q_match_pyfai_float64(orientation):
    g = Geometry(**TILTED, orientation=orientation)
    ai = g.to_pyfai()
    d1, d2 = np.indices(g.shape, dtype=np.float64)
    p1, p2, p3 = pixel_positions(g)
    tth, chi = tth_chi(torch.tensor(g.params, dtype=torch.float64), p1, p2, p3)
    np.testing.assert_allclose(tth.numpy(), ai.tth(d1, d2), rtol=0, atol=1e-9)
    np.testing.assert_allclose(chi.numpy(), ai.chi(d1, d2), rtol=0, atol=1e-9)
    q = q_from_tth(tth, g.wavelength)
    np.testing.assert_allclose(q.numpy(), ai.qFunction(d1, d2), rtol=1e-9)
    assert chi.max() - chi.min() > 1.0   # PONI near the detector: a wide range of azimuths


def test_named_detector_positions_and_tth():
    g = Geometry(dist=0.3, poni1=0.02, poni2=0.03, rot1=0.02, detector="Pilatus100k")
    ai = g.to_pyfai()
    p1, p2, p3 = pixel_positions(g)
    tth, _ = tth_chi(torch.tensor(g.params, dtype=torch.float64), p1, p2, p3)
    d1, d2 = np.indices(g.shape, dtype=np.float64)
    np.testing.assert_allclose(tth.numpy(), ai.tth(d1, d2), atol=1e-9, rtol=0)


def test_gradcheck_on_params():
    g = Geometry(**TILTED)
    p1, p2, p3 = pixel_positions(g)
    p1, p2 = p1[::7, ::9].contiguous(), p2[::7, ::9].contiguous()
    params = torch.tensor(g.params, dtype=torch.float64, requires_grad=True)

    def f(par):
        tth, chi = tth_chi(par, p1, p2)
        return torch.cat([tth.ravel(), chi.ravel(), q_from_tth(tth, g.wavelength).ravel() * 1e-2])

    assert torch.autograd.gradcheck(f, (params,), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_finite_difference_against_pyfai():
    """d(2θ)/d(dist) from autograd equals a central difference of pyFAI's own 2θ."""
    g = Geometry(**TILTED)
    p1, p2, p3 = pixel_positions(g)
    params = torch.tensor(g.params, dtype=torch.float64, requires_grad=True)
    tth, _ = tth_chi(params, p1, p2)
    tth.sum().backward()
    h = 1e-6
    d1, d2 = np.indices(g.shape, dtype=np.float64)
    up = g.with_params(np.add(g.params, [h, 0, 0, 0, 0, 0])).to_pyfai().tth(d1, d2).sum()
    dn = g.with_params(np.add(g.params, [-h, 0, 0, 0, 0, 0])).to_pyfai().tth(d1, d2).sum()
    np.testing.assert_allclose(params.grad[0].item(), (up - dn) / (2 * h), rtol=1e-5)


def test_poni_roundtrip_with_orientation(tmp_path):
    import pyFAI
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = pyFAI.detector_factory("Pilatus300k", config={"orientation": 2})
    ai = AzimuthalIntegrator(dist=0.21, poni1=0.051, poni2=0.042, rot1=0.011, rot2=-0.02,
                             rot3=0.031, detector=det, wavelength=1.2e-10)
    src = tmp_path / "pyfai.poni"
    ai.write(str(src))
    g = Geometry.from_poni(src)
    assert g.detector == "Pilatus300k" and g.orientation == 2 and g.shape == (619, 487)
    assert g.params == pytest.approx((0.21, 0.051, 0.042, 0.011, -0.02, 0.031), abs=1e-12)
    assert g.wavelength == pytest.approx(1.2e-10)
    out = tmp_path / "ours.poni"
    g.to_poni(out)
    text = out.read_text()
    assert "poni_version: 2.1" in text and '"orientation": 2' in text
    back = pyFAI.load(str(out))
    assert int(back.detector.orientation) == 2
    np.testing.assert_allclose(back.param[:6], ai.param[:6], atol=1e-12)
    assert Geometry.from_pyfai(back) == g


def test_detector_mask_is_pyfai_mask():
    g = Geometry(dist=0.2, poni1=0.05, poni2=0.04, detector="Pilatus300k")
    m = g.detector_mask()
    import pyFAI

    ref = pyFAI.detector_factory("Pilatus300k").mask.astype(bool)
    assert m.dtype == bool and m.shape == (619, 487)
    np.testing.assert_array_equal(m, ref)
    assert m.sum() > 10000   # module gaps
    assert not Geometry(**TILTED).detector_mask().any()


def test_bad_values_rejected():
    with pytest.raises(ValueError, match="dist"):
        Geometry(dist=-1.0, poni1=0, poni2=0)
    with pytest.raises(ValueError, match="NoSuchDetector"):
        Geometry(dist=0.1, poni1=0, poni2=0, detector="NoSuchDetector")
    with pytest.raises(ValueError, match="orientation"):
        Geometry(dist=0.1, poni1=0, poni2=0, orientation=7)
    with pytest.raises(ValueError, match="pixel1"):
        Geometry(dist=0.1, poni1=0, poni2=0, detector="Detector")
