"""FrameResolver against real writers: ophyd-async's SimBlobDetector and ophyd.sim under a RunEngine,
area-detector-style HDF5 files (compressed), and a SWMR file still being written by another process.

Ground truth is what h5py reads from the file directly, or the arrays the writer wrote.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import msgpack
import msgpack_numpy
import numpy as np
import pytest
from event_model import DocumentNames, compose_run, schema_validators

import service.resolve as resolve_mod
from service.errors import RejectedInput
from service.resolve import FrameResolver, frame_shape

hdf5plugin = pytest.importorskip("hdf5plugin")


def _wire(doc: dict) -> dict:
    """The document as it arrives over 0MQ (msgpack + msgpack-numpy: tuples become lists)."""
    packed = msgpack.packb(doc, default=msgpack_numpy.encode)
    return msgpack.unpackb(packed, object_hook=msgpack_numpy.decode, strict_map_key=False)


# --------------------------------------------------------------------------- ophyd-async
def test_ophyd_async_blob_detector_stream_datum(tmp_path):
    """SimBlobDetector writes a real SWMR HDF5 file; frames resolved live during the run and replayed."""
    import bluesky.plans as bp
    from bluesky.run_engine import RunEngine
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.sim import SimBlobDetector

    RE = RunEngine(call_returns_result=True)
    with init_devices():
        det = SimBlobDetector(StaticPathProvider(StaticFilenameProvider("blob"), tmp_path))

    live = FrameResolver(retries=20, retry_delay_s=0.05, allowed_roots=[str(tmp_path)])
    docs: list[tuple[str, dict]] = []
    live_frames: list[tuple[int, np.ndarray]] = []
    frame_keys = {}

    def callback(name, doc):
        docs.append((name, doc))
        if name == "descriptor":
            frame_keys.update(live.stream_data_keys(doc))
        elif name == "stream_resource":
            live.stream_resource(doc)
        elif name == "stream_datum":
            live_frames.extend(live.stream_datum(doc))
        elif name == "stop":
            live.forget_run(doc["run_start"])

    RE.subscribe(callback)
    RE(bp.count([det], num=5))

    names = [n for n, _ in docs]
    assert names.count("stream_resource") == 2 and names.count("stream_datum") == 10   # det and det-sum
    descriptor = next(d for n, d in docs if n == "descriptor")
    stop = next(d for n, d in docs if n == "stop")
    key = descriptor["data_keys"]["det"]
    assert frame_keys == {"det": tuple(key["shape"][1:])}                # det-sum is not a frame key
    sr = next(d for n, d in docs if n == "stream_resource" and d["data_key"] == "det")
    path = tmp_path / "blob.h5"
    assert sr["uri"] == f"file://localhost{path}"
    with h5py.File(path, "r", swmr=True) as f:
        truth = f[sr["parameters"]["dataset"]][()]

    event_seq = [d["seq_num"] for n, d in docs if n == "event"]
    for frames in (live_frames, _replay(docs, tmp_path)):
        assert [s for s, _ in frames] == event_seq == list(range(1, stop["num_events"]["primary"] + 1))
        assert len(frames) == truth.shape[0] == 5
        for i, (_, frame) in enumerate(frames):
            assert frame.shape == tuple(key["shape"][1:]) == (240, 320)
            assert frame.dtype == np.dtype(key["dtype_numpy"])
            np.testing.assert_array_equal(frame, truth[i])
    assert truth.max() > 0                                               # real blobs, not empty frames


def _replay(docs, root):
    """Validated, wire-encoded documents through a fresh resolver after the run (file closed)."""
    r = FrameResolver(retries=0, allowed_roots=[str(root)])
    out = []
    for name, doc in docs:
        doc = _wire(doc)
        schema_validators[DocumentNames[name]].validate(doc)
        if name == "descriptor":
            r.stream_data_keys(doc)
        elif name == "stream_resource":
            r.stream_resource(doc)
        elif name == "stream_datum":
            out.extend(r.stream_datum(doc))
    return out


# --------------------------------------------------------------------------- ophyd v1: NPY_SEQ
def test_ophyd_sim_npy_seq_fill_event(tmp_path):
    import bluesky.plans as bp
    from bluesky.run_engine import RunEngine
    from ophyd.sim import SynSignalWithRegistry

    rng = np.random.default_rng(3)
    written: list[np.ndarray] = []

    def acquire():
        written.append(rng.poisson(50.0, (12, 17)).astype(np.uint16))
        return written[-1]

    img = SynSignalWithRegistry(func=acquire, name="img", save_path=str(tmp_path))
    written.clear()                                  # SynSignal computes an initial value at construction
    docs: list[tuple[str, dict]] = []
    RE = RunEngine()
    RE.subscribe(lambda name, doc: docs.append((name, _wire(doc))))
    RE(bp.count([img], num=4))

    r = FrameResolver(retries=0, allowed_roots=[str(tmp_path)])
    descriptor = None
    filled = []
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
        if name == "descriptor":
            descriptor = doc
        elif name == "resource":
            assert doc["spec"] == "NPY_SEQ"
            r.resource(doc)
        elif name == "datum":
            r.datum(doc)
        elif name == "event":
            assert doc["filled"] == {"img": False}
            filled.append(r.fill_event(doc, descriptor, "img"))
    assert len(filled) == len(written) == 4
    for got, want in zip(filled, written):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert r.stream_data_keys(descriptor) == {}                         # FILESTORE, not STREAM:

    run_uid = docs[0][1]["uid"]
    event = next(d for n, d in docs if n == "event")
    r.forget_run(run_uid)
    with pytest.raises(RejectedInput) as exc:
        r.fill_event(event, descriptor, "img")
    assert exc.value.reason == "unknown_datum"


# --------------------------------------------------------------------------- AD_HDF5 written by h5py
def _ad_file(path: Path, frames: np.ndarray, **compression) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=frames, chunks=(1, *frames.shape[1:]), **compression)


def _ad_run(root: str, resource_path: str, n: int, shape: tuple[int, int], fpp: int = 1, spec: str = "AD_HDF5"):
    """Schema-valid documents of an ophyd v1 area detector writing AD_HDF5 (event_model composers)."""
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "pilatus_image": {"source": "PV:XF:DET{Pilatus}", "dtype": "array", "shape": [fpp, *shape],
                          "external": "FILESTORE:", "dtype_numpy": "<u4"}})
    res = run.compose_resource(spec=spec, root=root, resource_path=resource_path,
                               resource_kwargs={"frame_per_point": fpp})
    datums, events = [], []
    for i in range(n):
        datum = res.compose_datum(datum_kwargs={"point_number": i})
        datums.append(datum)
        events.append(desc.compose_event(data={"pilatus_image": datum["datum_id"]},
                                         timestamps={"pilatus_image": time.time()},
                                         filled={"pilatus_image": False}, seq_num=i + 1))
    return run.start_doc, desc.descriptor_doc, res.resource_doc, datums, events, res


def test_ad_hdf5_bitshuffle_lz4_with_root_map(tmp_path):
    rng = np.random.default_rng(7)
    truth = rng.poisson(200.0, (6, 40, 33)).astype(np.uint32)
    truth[:, :, 10] = 2**32 - 1                                         # Eiger-style gap pixels survive
    data_dir = tmp_path / "local" / "2026" / "run7"
    data_dir.mkdir(parents=True)
    _ad_file(data_dir / "scan_000.h5", truth, **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(data_dir / "scan_000.h5", "r") as f:                  # really bitshuffle (filter 32008)
        assert f["/entry/data/data"].id.get_create_plist().get_filter(0)[0] == hdf5plugin.BSHUF_ID

    start, descriptor, resource, datums, events, _ = _ad_run("/nsls2/data/beamline", "2026/run7/scan_000.h5",
                                                             6, (40, 33))
    for name, doc in [("start", start), ("descriptor", descriptor), ("resource", resource),
                      *[("datum", d) for d in datums], *[("event", e) for e in events]]:
        schema_validators[DocumentNames[name]].validate(doc)
    r = FrameResolver(root_map={"/nsls2/data/beamline": str(tmp_path / "local")}, retries=0)
    r.resource(resource)
    for d in datums[:3]:
        r.datum(d)
    page = {"resource": resource["uid"], "datum_id": [d["datum_id"] for d in datums[3:]],
            "datum_kwargs": {"point_number": [d["datum_kwargs"]["point_number"] for d in datums[3:]]}}
    schema_validators[DocumentNames.datum_page].validate(page)
    r.datum_page(page)
    for i in (5, 0, 3, 1, 2, 4):                                        # any order, one cached handle
        frame = r.fill_event(events[i], descriptor, "pilatus_image")
        assert frame.shape == (40, 33) and frame.dtype == np.uint32
        np.testing.assert_array_equal(frame, truth[i])
    handle = r._resources[resource["uid"]].file
    assert handle is not None and handle.id.valid
    assert r._resources[resource["uid"]].filters_checked
    r.forget_run(start["uid"])
    assert not handle.id.valid and r._resources == {} and r._datums == {}


def test_missing_compression_filter_refused_at_once(tmp_path, monkeypatch):
    """A filter libhdf5 cannot load is unsupported_compression at once, not file_unavailable after retries."""
    _ad_file(tmp_path / "c.h5", np.ones((2, 8, 8), np.uint32), **hdf5plugin.Bitshuffle(cname="lz4"))
    _, _, resource, datums, _, _ = _ad_run(str(tmp_path), "c.h5", 1, (8, 8))
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda code: code != hdf5plugin.BSHUF_ID)
    r = FrameResolver(retries=50, retry_delay_s=1.0, allowed_roots=[str(tmp_path)])
    r.resource(resource)
    r.datum(datums[0])
    t0 = time.monotonic()
    with pytest.raises(RejectedInput, match="unsupported_compression.*32008"):
        r.read_datum(datums[0]["datum_id"])
    assert time.monotonic() - t0 < 0.5


def test_ad_hdf5_frames_per_point_and_refusals(tmp_path):
    truth = np.arange(4 * 5 * 6, dtype=np.uint32).reshape(4, 5, 6)
    _ad_file(tmp_path / "f.h5", truth)
    start, descriptor, resource, datums, events, _ = _ad_run(str(tmp_path), "f.h5", 2, (5, 6), fpp=2)
    r = FrameResolver(retries=1, retry_delay_s=0.01, allowed_roots=[str(tmp_path)])
    r.resource(resource)
    for d in datums:
        r.datum(d)
    np.testing.assert_array_equal(r.read_datum(datums[1]["datum_id"]), truth[2:4])   # AD_HDF5 slicing
    summed = r.fill_event(events[1], descriptor, "pilatus_image")                     # a point's frames, summed
    np.testing.assert_array_equal(summed, truth[2] + truth[3])
    assert summed.dtype == np.uint32 and r.plan_event(events[1], descriptor, "pilatus_image").locate is None

    def reason(fn, *args):
        with pytest.raises(RejectedInput) as exc:
            fn(*args)
        return exc.value.reason

    assert reason(r.fill_event, {"data": {"pilatus_image": "nope/0"}}, descriptor, "pilatus_image") == "unknown_datum"
    assert reason(r.datum, {"datum_id": "x/0", "resource": "x", "datum_kwargs": {}}) == "unknown_resource"
    assert reason(r.stream_datum, {"uid": "s/0", "stream_resource": "s", "descriptor": "d",
                                   "indices": {"start": 0, "stop": 1}, "seq_nums": {"start": 1, "stop": 2}}) \
        == "unknown_resource"
    spe = {**resource, "uid": "spe-res", "spec": "AD_SPE"}
    r.resource(spe)                                                      # accepted; refused when read
    r.datum({"datum_id": "spe-res/0", "resource": "spe-res", "datum_kwargs": {"point_number": 0}})
    assert reason(r.read_datum, "spe-res/0") == "unsupported_spec"
    missing = {**resource, "uid": "gone", "resource_path": "missing.h5"}
    r.resource(missing)
    r.datum({"datum_id": "gone/0", "resource": "gone", "datum_kwargs": {"point_number": 0}})
    assert reason(r.read_datum, "gone/0") == "file_unavailable"
    fixed = tmp_path / "fixed.h5"
    _ad_file(fixed, truth)                                               # maxshape fixed: 4 frames, ever
    r.resource({**resource, "uid": "fixed", "resource_path": "fixed.h5", "resource_kwargs": {}})
    r.datum({"datum_id": "fixed/9", "resource": "fixed", "datum_kwargs": {"point_number": 9}})
    assert reason(r.read_datum, "fixed/9") == "frame_out_of_range"
    r.datum({"datum_id": "fixed/x", "resource": "fixed", "datum_kwargs": {"index": 0}})
    assert reason(r.read_datum, "fixed/x") == "bad_datum"
    small = FrameResolver(max_frame_pixels=29, allowed_roots=[str(tmp_path)])
    small.resource({**resource, "resource_kwargs": {}})
    small.datum(datums[0])
    assert reason(small.read_datum, datums[0]["datum_id"]) == "frame_too_large"


@pytest.mark.parametrize("bad", [{"retries": -1}, {"retry_delay_s": float("nan")}, {"max_frame_pixels": 0},
                                 {"root_map": {"": "/x"}}, {"allowed_roots": ["relative/dir"]}])
def test_bad_options_rejected(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        FrameResolver(**bad)


def test_frame_shape_of_data_keys():
    assert frame_shape({"shape": [240, 320]}) == (1, 240, 320)          # ophyd.sim / inline
    assert frame_shape({"shape": [1, 240, 320]}) == (1, 240, 320)       # ophyd-async, ophyd v1 AD
    assert frame_shape({"shape": [0, 240, 320]}) == (1, 240, 320)       # AD with num_images 0
    assert frame_shape({"shape": [1]}) is None and frame_shape({"shape": [1, 1000]}) is None
    assert frame_shape({"shape": []}) is None


# --------------------------------------------------------------------------- a file still being written
WRITER = textwrap.dedent("""
    import sys, time, h5py, numpy as np
    path, n, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    frame = lambda i: (np.arange(9 * 11, dtype=np.uint16).reshape(9, 11) * (i + 1)) % 1021
    f = h5py.File(path, "w", libver="latest")
    d = f.create_dataset("/entry/data/data", shape=(0, 9, 11), maxshape=(None, 9, 11), chunks=(1, 9, 11),
                         dtype=np.uint16)
    f.swmr_mode = True
    for i in range(n):
        d.resize(i + 1, axis=0); d[i] = frame(i); d.flush()
        if i == 0:
            print("ready", flush=True)
        time.sleep(period)
    sys.stdin.read()                 # keep the file open (still being written) until the test ends
    f.close()
""")


def _datum(sr_bundle, desc, start: int, stop: int) -> dict:
    return sr_bundle.compose_stream_datum(indices={"start": start, "stop": stop},
                                          seq_nums={"start": start + 1, "stop": stop + 1},
                                          descriptor=desc.descriptor_doc)


def _expected(i: int) -> np.ndarray:
    return (np.arange(9 * 11, dtype=np.uint16).reshape(9, 11) * (i + 1)) % 1021


def test_swmr_file_still_being_written(tmp_path, monkeypatch):
    """A writer in another process (as a detector IOC) appends frames; the resolver waits for them."""
    monkeypatch.setattr(resolve_mod, "REOPEN_EVERY", 10**9)              # prove SWMR refresh alone suffices
    path = tmp_path / "live.h5"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "5", "0.1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        run = compose_run()
        sr_bundle = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                                data_key="det", parameters={"dataset": "/entry/data/data"})
        desc = run.compose_descriptor(name="primary", data_keys={
            "det": {"source": "sim", "dtype": "array", "shape": [1, 9, 11], "external": "STREAM:",
                    "dtype_numpy": "<u2"}})
        r = FrameResolver(retries=60, retry_delay_s=0.02, allowed_roots=[str(tmp_path)])
        assert r.stream_data_keys(desc.descriptor_doc) == {"det": (9, 11)}
        r.stream_resource(sr_bundle.stream_resource_doc)
        first = r.stream_datum(_datum(sr_bundle, desc, 0, 1))
        np.testing.assert_array_equal(first[0][1], _expected(0))
        handle = r._resources[sr_bundle.stream_resource_doc["uid"]].file
        assert handle["/entry/data/data"].shape[0] < 4                    # frames 2..4 not visible yet

        t0 = time.monotonic()
        rest = r.stream_datum(_datum(sr_bundle, desc, 1, 5))
        waited = time.monotonic() - t0
        assert [s for s, _ in rest] == [2, 3, 4, 5]
        for i, (_, frame) in enumerate(rest, start=1):
            np.testing.assert_array_equal(frame, _expected(i))
        assert waited > 0.1                                               # it did wait for the writer
        assert r._resources[sr_bundle.stream_resource_doc["uid"]].file is handle   # refreshed, not re-opened

        never = FrameResolver(retries=5, retry_delay_s=0.02, allowed_roots=[str(tmp_path)])
        never.stream_resource(sr_bundle.stream_resource_doc)
        t0 = time.monotonic()
        with pytest.raises(RejectedInput) as exc:
            never.stream_datum(_datum(sr_bundle, desc, 5, 6))
        assert exc.value.reason == "file_unavailable"
        assert 0.08 < time.monotonic() - t0 < 2.0                          # 5 retries x 20 ms, then gives up
    finally:
        writer.communicate("", timeout=10)
    assert writer.returncode == 0
