"""Corrected 2D frame snapshots: `Integrator1D.corrected` against pyFAI's own preprocessing
(`pyFAI.engines.preproc.preproc` on `ai.solidAngleArray`, `ai.polarization`, dark, flat, mask,
dummies), the worker's choice of frames and block averaging against a numpy reference, the hub
handing them on, and the Tiled round trip (real embedded server, fresh client) into the report.
"""
from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import torch

from workers.geometry import Geometry
from workers.integrate import build_integrator_1d

SHAPE = (60, 70)
GEN = Geometry(dist=0.08, poni1=0.004, poni2=0.005, rot1=-0.1, rot2=0.08, rot3=-0.5,
               detector="Detector", pixel1=1.5e-4, pixel2=1.2e-4, shape=SHAPE, wavelength=1e-10)
POL = 0.95


def detector_inputs(rng):
    """(mask, dark, flat, frames (3, H, W) float32) with gaps (-1), NaN, a zero flat pixel and
    a fully masked 3x3 block aligned to the binning grid."""
    mask = np.zeros(SHAPE, bool)
    mask[9:12, 30:33] = True                  # binning 3: the all-masked block (3, 10)
    mask[:, 5] = True
    dark = rng.uniform(0.0, 3.0, SHAPE)
    flat = rng.uniform(0.8, 1.2, SHAPE).astype(np.float32)   # the integrator keeps flat in float32 as pyFAI
    flat[40, 40] = 0.0                        # zero normalisation: invalid, not inf
    frames = rng.poisson(200.0, (3,) + SHAPE).astype(np.float32)
    frames[:, 20, :] = -1                     # module gap: the dummy
    frames[1, 7, 9] = np.nan
    frames[2, 50:52, 60:62] = -1.2            # within delta_dummy of the dummy
    return mask, dark, flat, frames


def pyfai_corrected(frame, mask, dark, flat):
    """pyFAI's per-pixel correction (raw − dark) / (flat·Ω·P), invalid pixels NaN, float64."""
    from pyFAI.engines.preproc import preproc

    ai = GEN.to_pyfai()
    sa = ai.solidAngleArray(SHAPE, True)      # as pyFAI's integrate1d_ng (correctSolidAngle=True)
    pol = ai.polarization(SHAPE, factor=POL)
    res = preproc(np.asarray(frame, np.float64), dark=dark, flat=flat, solidangle=sa,
                  polarization=pol, mask=mask.copy(), dummy=-1.0, delta_dummy=0.5, split_result=4,
                  dtype=np.float64)          # (H, W, 4): raw − dark, variance, norm, valid
    # (mask copied: preproc ORs the invalid pixels into a bool mask in place)
    signal, norm, valid = res[..., 0], res[..., 2], res[..., 3] == 1
    return np.where(valid, signal / np.where(valid, norm, 1.0), np.nan)


def block_nanmean(img, f):
    """numpy reference: f x f block means ignoring NaN, edge blocks partial."""
    h, w = img.shape
    out = np.full((-(-h // f), -(-w // f)), np.nan)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = img[i * f:(i + 1) * f, j * f:(j + 1) * f]
            if np.isfinite(block).any():
                out[i, j] = np.nanmean(block)
    return out


@pytest.fixture(scope="module")
def integ_inputs():
    rng = np.random.default_rng(5)
    mask, dark, flat, frames = detector_inputs(rng)
    integ = build_integrator_1d(GEN, npt=100, mask=mask, dark=dark, flat=flat, dummy=-1.0,
                                delta_dummy=0.5, polarization_factor=POL, dtype=torch.float64)
    return integ, mask, dark, flat, frames


def test_corrected_matches_pyfai_preproc(integ_inputs):
    integ, mask, dark, flat, frames = integ_inputs
    out = integ.corrected(frames)
    assert out.shape == (3,) + SHAPE and out.dtype == torch.float64
    got = out.numpy()
    for k in range(3):
        ref = pyfai_corrected(frames[k], mask, dark, flat)
        np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(ref))     # same invalid pixels
        np.testing.assert_allclose(got[k], ref, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[:, 20]).all() and np.isnan(got[:, :, 5]).all() and np.isnan(got[:, 40, 40]).all()
    assert np.isnan(got[1, 7, 9]) and not np.isnan(got[0, 7, 9])
    assert np.isnan(got[2, 50:52, 60:62]).all()
    # a single (H, W) frame, integer counts, gives the same as the batch row
    one = integ.corrected(np.nan_to_num(frames[0]).astype(np.int32))
    np.testing.assert_allclose(one[0].numpy(), got[0], rtol=1e-12, equal_nan=True)


def test_corrected_binning_and_bad_values(integ_inputs):
    integ, mask, dark, flat, frames = integ_inputs
    binned = integ.corrected(frames, binning=3).numpy()
    assert binned.shape == (3, 20, 24)                      # ceil(60/3), ceil(70/3)
    for k in range(3):
        ref = block_nanmean(pyfai_corrected(frames[k], mask, dark, flat), 3)
        np.testing.assert_allclose(binned[k], ref, rtol=1e-12, equal_nan=True)
    assert np.isnan(binned[:, 3, 10]).all() and np.isfinite(binned[:, 3, 9]).all()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="binning"):
            integ.corrected(frames, binning=bad)


@pytest.mark.gpu
def test_corrected_cuda_matches_cpu(integ_inputs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    integ, mask, dark, flat, frames = integ_inputs
    gpu = build_integrator_1d(GEN, npt=100, mask=mask, dark=dark, flat=flat, dummy=-1.0,
                              delta_dummy=0.5, polarization_factor=POL, dtype=torch.float64,
                              device="cuda")
    for f in (1, 3):
        got = gpu.corrected(torch.from_numpy(frames).cuda(), binning=f)
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), integ.corrected(frames, binning=f).numpy(),
                                   rtol=1e-12, equal_nan=True)


def test_worker_picks_first_and_every_nth_and_hub_forwards(monkeypatch):
    """RunPipeline: first frame of the run + seq_num % snapshot_every == 0, block-averaged to
    at most SNAPSHOT_MAX_PX px, float32; PublishHub hands them to tiled.add_snapshot."""
    import dataclasses

    from service.config import load_settings
    from service.messages import Frame
    from service.metrics import Metrics
    from service.publish.hub import PublishHub
    from service.publish.state import RunStore
    from service.run_spec import RunSpecBuilder
    from workers import pipeline

    monkeypatch.setattr(pipeline, "SNAPSHOT_MAX_PX", 32)      # 70 px -> binning 3
    rng = np.random.default_rng(1)
    mask, dark, flat, frames = detector_inputs(rng)
    settings = load_settings(None, reduction={"npt": 100, "polarization": POL, "snapshot_every": 4},
                             fit={"regularizer": {"window": 2}, "q_range": None,   # q 3.8-13 1/nm here
                                  "peaks": [{"name": "p", "center": 8.0, "fwhm": 1.0}]})
    assert load_settings(None).reduction.snapshot_every == 25
    spec = dataclasses.replace(RunSpecBuilder(settings).build({"uid": "u1"}, calibrated=GEN),
                               mask=mask, dark=dark, flat=flat)
    pipe = pipeline.RunPipeline(spec, "cpu", pipeline.IntegratorCache())
    batches = [(np.array([3, 4, 5]), frames), (np.array([6, 7, 8]), frames[::-1].copy())]
    outs = [pipe.process(seq, 1e9 + seq.astype(float), f) for seq, f in batches]
    got = [s for o in outs for s, _ in o.snapshots]
    assert got == [3, 4, 8]                                  # first frame, then multiples of 4
    seq3, img3 = outs[0].snapshots[0]
    assert img3.dtype == np.float32 and img3.shape == (20, 24)
    ref = block_nanmean(pyfai_corrected(frames[0], mask, dark, flat), 3)
    np.testing.assert_allclose(img3, ref, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(outs[1].snapshots[0][1],
                               block_nanmean(pyfai_corrected(frames[0], mask, dark, flat), 3),
                               rtol=1e-5, equal_nan=True)   # seq 8 = last of the reversed batch

    off_spec = dataclasses.replace(spec, reduction=dataclasses.replace(spec.reduction, snapshot_every=0))
    off = pipeline.RunPipeline(off_spec, "cpu", pipeline.IntegratorCache())
    assert off.process(np.array([1, 2]), np.zeros(2), frames[:2]).snapshots == []

    class FakeTiled:
        def __init__(self):
            self.snaps = []

        def start_run(self, *a):
            pass

        def add_profiles(self, *a):
            pass

        def add_peaks(self, *a):
            pass

        def add_snapshot(self, uid, seq, image, time):
            self.snaps.append((uid, seq, image, time))

    fake = FakeTiled()
    hub = PublishHub(RunStore(), Metrics(), tiled=fake)
    hub.run_started("u1", {"uid": "u1"}, spec)
    for (seq, f), out in zip(batches, outs):
        hub.frames_reduced("u1", [Frame("u1", int(s), 1e9 + s, f[0], 0.0, {}) for s in seq], out)
    assert [(u, s, t) for u, s, _, t in fake.snaps] == [("u1", 3, 1e9 + 3), ("u1", 4, 1e9 + 4),
                                                        ("u1", 8, 1e9 + 8)]
    assert fake.snaps[0][2] is outs[0].snapshots[0][1]


def test_snapshot_spool_file_roundtrip(tmp_path):
    from service.publish.tiled.ops import Op
    from service.publish.tiled.spool import load_op, save_op

    imgs = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    imgs[0, 1, 2] = np.nan
    op = Op("snapshots", "run1", {"offset": 3},
            arrays={"seq_num": np.array([25, 50]), "time": np.array([1.0, 2.0]), "images": imgs})
    back = load_op(save_op(op, tmp_path / "000000001-snapshots"))
    assert (back.kind, back.uid, back.meta) == ("snapshots", "run1", {"offset": 3})
    np.testing.assert_array_equal(back.arrays["images"], imgs)
    np.testing.assert_array_equal(back.arrays["seq_num"], [25, 50])


@pytest.mark.slow
def test_snapshots_roundtrip_tiled_and_report(tmp_path, shared_tiled):
    """TiledPublisher writes snapshots in two flushes (create, then patch-extend) to a real
    embedded Tiled (the session's); a fresh client reads back the exact values and seq_nums; a
    replayed op does not duplicate; the report shows them with their frame numbers."""
    pytest.importorskip("tiled")
    from PIL import Image
    from tiled.client import from_uri

    from service.publish.tiled import TiledPublisher
    from service.publish.tiled.ops import Op
    from service.report import write_report

    rng = np.random.default_rng(3)
    n, nbins = 6, 40
    q = np.linspace(1.0, 20.0, nbins)
    inten = rng.gamma(2.0, 50.0, (n, nbins)).astype(np.float32)
    seq = np.arange(1, n + 1)
    times = 1.8e9 + seq.astype(float)
    images = rng.lognormal(3.0, 1.0, (3, 20, 24)).astype(np.float32)
    images[:, 5, :] = np.nan                                 # masked row
    images[1, 2, 3] = -0.5                                   # a negative corrected value
    snap_seq = np.array([1, 4, 6])
    uid = str(uuid.uuid4())
    server = shared_tiled
    pub = TiledPublisher(server.uri, server.api_key, spool_dir=tmp_path / "spool", flush_rows=50)
    pub.start_run(uid, {"uid": uid}, {})
    pub.add_profiles(uid, seq[:3], times[:3], q, inten[:3], np.sqrt(inten[:3]), "q_nm^-1")
    pub.add_snapshot(uid, 1, images[0], times[0])
    assert pub.flush(30)                                 # first flush: write_array
    pub.add_profiles(uid, seq[3:], times[3:], q, inten[3:], np.sqrt(inten[3:]), "q_nm^-1")
    pub.add_snapshot(uid, 4, images[1], times[3])
    pub.add_snapshot(uid, 6, images[2].astype(np.float64), times[5])
    with pytest.raises(ValueError, match="shape"):
        pub.add_snapshot(uid, 7, images[0][:10], times[5])
    with pytest.raises(ValueError, match="2D"):
        pub.add_snapshot(uid, 7, images[:2], times[5])
    pub.stop_run(uid, "success")
    assert pub.drain(60)
    # replaying the second op (a retry after a lost reply) overwrites, appends nothing
    replay = Op("snapshots", uid, {"offset": 1}, arrays={
        "seq_num": snap_seq[1:], "time": times[[3, 5]], "images": images[1:]})
    pub._execute(replay, check=True)
    pub.close()
    assert pub.errors == 0 and pub.snapshots_written == 5   # 3 + the 2 replayed

    client = from_uri(server.uri, api_key=server.api_key)
    node = client["scatterflow"][uid]
    assert {"snapshots", "snapshot_frames"} <= set(node)
    stored = node["snapshots"].read()
    assert stored.shape == (3, 20, 24) and stored.dtype == np.float32
    np.testing.assert_array_equal(stored, images)        # NaN in the same places
    assert list(node["snapshots"].metadata["dims"]) == ["snapshot", "row", "col"]
    sf = node["snapshot_frames"].read()
    np.testing.assert_array_equal(sf["seq_num"].to_numpy(), snap_seq)
    np.testing.assert_array_equal(sf["time"].to_numpy(), times[[0, 3, 5]])

    out = tmp_path / "report"
    page = write_report(node, out).read_text()
    assert 'id="no-snapshots"' not in page
    fig = re.search(r'<figure id="snapshots" data-seq="([^"]*)" data-stored="(\d+)">'
                    r'<img src="([^"]+)"', page)
    assert fig and fig.group(1) == "1 4 6" and fig.group(2) == "3"
    assert fig.group(3) == "figures/snapshots.png" and "frames 1, 4, 6" in page
    with Image.open(out / fig.group(3)) as im:
        assert im.format == "PNG" and im.size[0] >= 500
        px = np.asarray(im.convert("RGB"), int)
    grey = np.all(px == 0x88, axis=-1)                       # masked pixels drawn grey
    assert grey.sum() > 3 * 24                               # at least the masked rows
    assert px.std() > 10                                     # not one flat colour
