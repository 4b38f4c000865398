"""workers.integrate against pyFAI's CSR Cython engine (integrate1d_ng / integrate2d_ng),
the batched path against a per-frame float64 reference, and the ``integrate`` command."""
import argparse
import logging
import warnings

import numpy as np
import pytest
import torch

from workers.geometry import Geometry
from workers.integrate import build_integrator_1d, build_integrator_2d, integrate_reference

warnings.filterwarnings("ignore", module="pyFAI")
logging.getLogger("pyFAI").setLevel(logging.ERROR)

PIL = Geometry(dist=0.2, poni1=0.02, poni2=0.03, rot1=0.05, rot2=-0.04, rot3=0.3,
               detector="Pilatus100k", wavelength=1e-10)
GEN = Geometry(dist=0.08, poni1=0.006, poni2=-0.002, rot1=-0.1, rot2=0.08, rot3=-0.5,
               detector="Detector", pixel1=1.5e-4, pixel2=1.2e-4, shape=(120, 140),
               orientation=2, wavelength=1.5e-10)


def _frame(geo, rng, dtype=np.int32, level=200.0):
    """Poisson frame with a ring pattern; masked pixels set to -1 as a Pilatus writes them."""
    r = np.hypot(*np.indices(geo.shape) - np.array(geo.shape)[:, None, None] / 3)
    lam = level * (1 + 0.8 * np.cos(r / 4.0) ** 2)
    f = rng.poisson(lam).astype(dtype)
    if np.issubdtype(dtype, np.signedinteger) or np.issubdtype(dtype, np.floating):
        f[geo.detector_mask()] = -1
    return f


def _compare(ours_i, ours_s, ref, count, radial=None, ref_radial=None):
    if radial is not None:
        np.testing.assert_allclose(radial, ref_radial, rtol=1e-6)
    ok = (count > 3) & (ref.intensity != 0)
    assert ok.sum() > 10
    rel = np.abs(ours_i[ok] - ref.intensity[ok]) / np.abs(ref.intensity[ok])
    assert np.median(rel) < 5e-3 and rel.max() < 2e-2, (np.median(rel), rel.max())
    rs = np.abs(ours_s[ok] - ref.sigma[ok]) / np.abs(ref.sigma[ok])
    assert rs.max() < 5e-2, rs.max()


CASES = {
    "pilatus-q-tilted": (PIL, "q_nm^-1", {}),
    "generic-2th-dark-flat-pol": (GEN, "2th_deg", {"polarization_factor": 0.95, "dark": "dark",
                                                   "flat": "flat"}),
    "pilatus-qA-mask-sector-range": (PIL, "q_A^-1", {"mask": "mask", "azimuth_range": (-130, -70),
                                                     "radial_range": (0.3, 1.8)}),
}


@pytest.mark.parametrize("method", ["no", "bbox", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_1d_matches_pyfai(case, method):
    geo, unit, opts = CASES[case]
    rng = np.random.default_rng(1)
    frame = _frame(geo, rng)
    kw = dict(opts)
    if kw.get("dark") == "dark":
        kw["dark"] = rng.uniform(0, 20, geo.shape)
        kw["flat"] = rng.uniform(0.8, 1.2, geo.shape)
    if kw.get("mask") == "mask":
        mask = np.zeros(geo.shape, np.int8)
        mask[60:90, 100:200] = 1           # user mask replaces the detector mask (pyFAI rule);
        kw["mask"] = mask                  # the -1 gap pixels are then caught by the dummy
    npt = 150
    integ = build_integrator_1d(geo, npt=npt, unit=unit, method=method, **kw)
    res = integ(frame)
    ai = geo.to_pyfai()
    ref = ai.integrate1d_ng(frame, npt, unit=unit, method=(method, "csr", "cython"),
                            error_model="poisson", **kw)
    _compare(res.intensity[0].numpy(), res.sigma[0].numpy(), ref, ref.count,
             integ.radial, ref.radial)
    assert res.unit == unit and res.intensity.shape == (1, npt)


@pytest.mark.parametrize("method", ["bbox", "full"])
def test_cake_matches_pyfai(method):
    geo = PIL
    frame = _frame(geo, np.random.default_rng(2), level=2000.0)
    integ = build_integrator_2d(geo, npt_rad=60, npt_azim=36, unit="q_nm^-1", method=method,
                                polarization_factor=0.9)
    res = integ(frame)
    ref = geo.to_pyfai().integrate2d_ng(frame, 60, 36, unit="q_nm^-1", method=(method, "csr", "cython"),
                                        error_model="poisson", polarization_factor=0.9)
    np.testing.assert_allclose(integ.radial, ref.radial, rtol=1e-6)
    np.testing.assert_allclose(integ.azimuthal, ref.azimuthal, rtol=1e-6, atol=1e-9)
    assert res.intensity.shape == (1, 36, 60)
    _compare(res.intensity[0].numpy(), res.sigma[0].numpy(), ref, ref.count)


def test_dummies_follow_frame_dtype_like_pyfai():
    """uint32 frames with 2**32-1 gap pixels (Eiger style): pyFAI casts the detector dummy (-2)
    through the dtype; with a user mask (replacing the detector one) they must still drop out."""
    geo = PIL
    frame = _frame(geo, np.random.default_rng(3), dtype=np.uint32)
    frame[geo.detector_mask()] = np.uint32(2**32 - 1)
    frame[10, 20:40] = np.uint32(2**32 - 2)
    mask = np.zeros(geo.shape, bool)
    integ = build_integrator_1d(geo, npt=120, method="bbox", mask=mask)
    res = integ(frame)
    ref = geo.to_pyfai().integrate1d_ng(frame, 120, method=("bbox", "csr", "cython"),
                                        error_model="poisson", mask=mask)
    _compare(res.intensity[0].numpy(), res.sigma[0].numpy(), ref, ref.count)
    assert res.intensity.max() < 1e4     # no 4e9 dummies leaked in


def test_nan_pixels_and_user_dummy():
    geo = GEN
    frame = _frame(geo, np.random.default_rng(4), dtype=np.float32)
    frame[5:9, 5:50] = np.nan
    frame[50, :] = -7.0
    integ = build_integrator_1d(geo, npt=80, method="bbox", dummy=-7.0, delta_dummy=0.5)
    res = integ(frame)
    ref = geo.to_pyfai().integrate1d_ng(frame, 80, method=("bbox", "csr", "cython"),
                                        error_model="poisson", dummy=-7.0, delta_dummy=0.5)
    _compare(res.intensity[0].numpy(), res.sigma[0].numpy(), ref, ref.count)


@pytest.mark.parametrize("method", ["no", "bbox", "full"])
def test_batched_matches_per_frame_reference_float64(method):
    geo = PIL
    rng = np.random.default_rng(5)
    frames = np.stack([_frame(geo, rng, dtype=np.int32, level=lv) for lv in (5.0, 50.0, 500.0)])
    frames[1, 30:40, 100:120] = -2          # dynamic dummies in one frame only
    dark = rng.uniform(0, 3, geo.shape)
    integ = build_integrator_1d(geo, npt=100, method=method, dark=dark, polarization_factor=0.5,
                                dtype=torch.float64)
    batched = integ(torch.from_numpy(frames))
    for k in range(frames.shape[0]):
        ri, rs = integrate_reference(integ, frames[k])
        np.testing.assert_allclose(batched.intensity[k].numpy(), ri, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched.sigma[k].numpy(), rs, rtol=1e-10, atol=1e-12)
        single = integ(frames[k])            # (H, W) numpy input, batch of one
        np.testing.assert_allclose(single.intensity[0].numpy(), ri, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.float32])
def test_one_pass_validity_check_matches_reference(dtype):
    """The CPU min/max shortcut (gap dummies only -> no per-pixel masks, signal = raw) must give
    the per-frame float64 reference, and one dummy or NaN in a counted pixel of one frame must
    send the batch down the per-pixel path, still matching the reference."""
    geo = PIL
    rng = np.random.default_rng(8)
    frames = np.stack([_frame(geo, rng, dtype=dtype, level=lv) for lv in (3.0, 30.0, 300.0)])
    gap = np.uint32(2**32 - 1) if dtype == np.uint32 else -1
    frames[:, geo.detector_mask()] = gap                        # static gaps: every frame
    integ = build_integrator_1d(geo, npt=100, method="bbox", dtype=torch.float64,
                                **({"dummy": -1.0, "delta_dummy": 0.5} if dtype != np.uint32 else {}))
    bad = frames.copy()
    bad[1, 40, 50:53] = gap if dtype != np.float32 else np.nan  # counted pixels, one frame
    for batch, shortcut in ((frames, True), (bad, False)):
        src = batch.copy()
        _, _, _, valid = integ._preprocessed(torch.from_numpy(batch))
        assert (valid is None) == shortcut
        res = integ(torch.from_numpy(batch))
        np.testing.assert_array_equal(batch, src)               # input frames untouched
        for k in range(batch.shape[0]):
            ri, rs = integrate_reference(integ, batch[k])
            np.testing.assert_allclose(res.intensity[k].numpy(), ri, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(res.sigma[k].numpy(), rs, rtol=1e-10, atol=1e-12)
    img = integ.corrected(frames)[2].numpy()
    mask = geo.detector_mask()
    assert np.isnan(img[mask]).all()
    norm = integ.norm.numpy().reshape(geo.shape)
    np.testing.assert_allclose(img[~mask], frames[2][~mask] / norm[~mask], rtol=1e-12)


def test_float32_uint16_input_close_to_float64():
    geo = GEN
    frame = _frame(geo, np.random.default_rng(6), dtype=np.uint16)
    i32 = build_integrator_1d(geo, npt=90, method="full")(frame).intensity.numpy()
    i64 = build_integrator_1d(geo, npt=90, method="full", dtype=torch.float64)(frame).intensity.numpy()
    np.testing.assert_allclose(i32, i64, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(unit="r_mm"), "unit"), (dict(method="pseudo"), "method"), (dict(npt=0), "bins"),
    (dict(polarization_factor=2.0), "polarization"), (dict(radial_range=(1.0, 1.0)), "radial_range"),
    (dict(mask=np.zeros((3, 3))), "mask"), (dict(dtype=torch.int32), "dtype"),
])
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_integrator_1d(GEN, **{"npt": 10, **kwargs})


def test_bad_frame_shape_rejected():
    integ = build_integrator_1d(GEN, npt=10)
    with pytest.raises(ValueError, match="frames"):
        integ(np.zeros((5, 5)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    frames = np.stack([_frame(PIL, np.random.default_rng(k)) for k in range(4)])
    cpu = build_integrator_1d(PIL, npt=200, method="bbox", dtype=torch.float64)(frames)
    gpu = build_integrator_1d(PIL, npt=200, method="bbox", dtype=torch.float64, device="cuda")(frames)
    np.testing.assert_allclose(gpu.intensity.cpu().numpy(), cpu.intensity.numpy(), rtol=1e-9)
    np.testing.assert_allclose(gpu.sigma.cpu().numpy(), cpu.sigma.numpy(), rtol=1e-9)


# -- the ``scatterflow integrate`` command -------------------------------------------------
def _cli():
    from service.commands import integrate as cmd

    parser = argparse.ArgumentParser(prog="scatterflow")
    cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser, cmd


def test_cli_npy_stack_matches_pyfai(tmp_path):
    parser, cmd = _cli()
    poni = tmp_path / "geo.poni"
    GEN.to_poni(poni)
    rng = np.random.default_rng(7)
    frames = np.stack([_frame(GEN, rng, dtype=np.int32) for _ in range(5)])
    np.save(tmp_path / "frames.npy", frames)
    out = tmp_path / "out.npz"
    args = parser.parse_args(["integrate", str(tmp_path / "frames.npy"), "--poni", str(poni),
                              "--npt", "70", "--unit", "2th_deg", "--method", "bbox",
                              "--polarization", "0.9", "--batch", "2", "--device", "cpu",
                              "-o", str(out)])
    assert cmd.run(args) == 0
    data = np.load(out)
    assert data["I"].shape == (5, 70) and data["sigma"].shape == (5, 70) and str(data["unit"]) == "2th_deg"
    assert (tmp_path / "out.png").stat().st_size > 1000
    ai = GEN.to_pyfai()
    for k in (0, 4):
        ref = ai.integrate1d_ng(frames[k], 70, unit="2th_deg", method=("bbox", "csr", "cython"),
                                error_model="poisson", polarization_factor=0.9)
        _compare(data["I"][k], data["sigma"][k], ref, ref.count, data["q"], ref.radial)


def test_cli_hdf5_dataset_and_errors(tmp_path):
    import h5py

    parser, cmd = _cli()
    poni = tmp_path / "geo.poni"
    GEN.to_poni(poni)
    frames = np.stack([_frame(GEN, np.random.default_rng(8), dtype=np.uint16) for _ in range(3)])
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5["/entry/data/data"] = frames
    out = tmp_path / "h5.npz"
    args = parser.parse_args(["integrate", f"{tmp_path / 'f.h5'}::/entry/data/data", "--poni",
                              str(poni), "--npt", "50", "--radial-range", "5", "40", "-o", str(out)])
    assert cmd.run(args) == 0
    data = np.load(out)
    assert data["I"].shape == (3, 50) and 5 < data["q"][0] < data["q"][-1] < 40
    bad = parser.parse_args(["integrate", str(tmp_path / "missing.npy"), "--poni", str(poni),
                             "-o", str(out)])
    assert cmd.run(bad) == 2
    np.save(tmp_path / "wrong.npy", np.zeros((4, 4)))
    assert cmd.run(parser.parse_args(["integrate", str(tmp_path / "wrong.npy"), "--poni", str(poni),
                                      "-o", str(out)])) == 2
