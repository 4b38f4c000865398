"""Frames left in their HDF5 files (service/frame_refs.py), as the Ray engine hands them to a
worker on another node: ingest locates them (same checks and waits as a read, no pixels read),
the worker reads them; the frames equal what h5py reads from the files directly."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from event_model import compose_run

from service.config import IngestConfig
from service.errors import RejectedInput
from service.frame_refs import FrameReadError, FrameRef, read_frame_refs
from service.ingest import DocumentRouter
from service.metrics import Metrics
from service.resolve import FrameResolver

from helpers import RecordingSink


def test_ophyd_async_detector_frames_located_then_read_on_the_worker(tmp_path):
    """A real ophyd-async SimBlobDetector under a RunEngine: the router hands on FrameRefs (no
    pixels), which read back to exactly the rows h5py reads."""
    import bluesky.plans as bp
    from bluesky.run_engine import RunEngine
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.sim import SimBlobDetector

    RE = RunEngine(call_returns_result=True)
    with init_devices():
        det = SimBlobDetector(StaticPathProvider(StaticFilenameProvider("blob"), tmp_path))
    sink = RecordingSink(takes_file_refs=True)
    router = DocumentRouter(sink, Metrics(), IngestConfig(allowed_roots=[str(tmp_path)]))
    RE.subscribe(lambda name, doc: router.route(name, doc))
    RE(bp.count([det], num=5))
    assert router.drain()
    assert [f.seq_num for f in sink.frames] == [1, 2, 3, 4, 5]
    refs = tuple(f.data for f in sink.frames)
    assert all(isinstance(r, FrameRef) for r in refs)
    with h5py.File(tmp_path / "blob.h5", "r", swmr=True) as f:
        truth = f["/entry/data/data"][()]
    assert refs[0].shape == truth.shape[1:] and refs[0].size == truth.shape[1] * truth.shape[2]
    np.testing.assert_array_equal(read_frame_refs(refs), truth)


def test_refs_from_two_files_in_any_order(tmp_path):
    """A batch's refs in arbitrary order, over two files, consecutive and scattered rows: each
    frame in its place."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**16, (6, 7, 9), dtype=np.uint16), rng.integers(0, 2**16, (4, 7, 9), dtype=np.uint16)
    for name, data in (("a.h5", a), ("b.h5", b)):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("/entry/data/data", data=data, chunks=(1, 7, 9))
    order = [("b.h5", 3), ("a.h5", 0), ("a.h5", 1), ("a.h5", 2), ("b.h5", 0), ("a.h5", 5)]
    refs = tuple(FrameRef(str(tmp_path / n), "/entry/data/data", row, (7, 9), "<u2") for n, row in order)
    expected = np.stack([(a if n == "a.h5" else b)[row] for n, row in order])
    np.testing.assert_array_equal(read_frame_refs(refs), expected)
    with pytest.raises(FrameReadError, match="missing.h5"):
        read_frame_refs((FrameRef(str(tmp_path / "missing.h5"), "/entry/data/data", 0, (7, 9), "<u2"),))


def test_ad_hdf5_located_with_the_checks_of_a_read(tmp_path):
    """ophyd v1 AD_HDF5 resource/datum documents: locate gives refs to the datum's row; a frame
    beyond a fixed-size dataset and a shape other than the descriptor's are refused as a read is."""
    frames = np.arange(3 * 5 * 6, dtype=np.uint32).reshape(3, 5, 6)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=frames, chunks=(1, 5, 6))
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "PV:det", "dtype": "array", "shape": [1, 5, 6], "external": "FILESTORE:"}})
    res = run.compose_resource(spec="AD_HDF5", root=str(tmp_path), resource_path="f.h5",
                               resource_kwargs={"frame_per_point": 1})
    r = FrameResolver(retries=0, allowed_roots=[str(tmp_path)])
    r.resource(res.resource_doc)
    located = []
    for n in (2, 0, 7):
        datum = res.compose_datum(datum_kwargs={"point_number": n})
        r.datum(datum)
        event = desc.compose_event(data={"det_image": datum["datum_id"]}, timestamps={"det_image": 0.0},
                                   seq_num=n + 1, filled={"det_image": False})
        plan = r.plan_event(event, desc.descriptor_doc, "det_image")
        if n == 7:
            with pytest.raises(RejectedInput) as exc:
                plan.locate()
            assert exc.value.reason == "frame_out_of_range"
            continue
        located += plan.locate()
    assert [s for s, _ in located] == [3, 1]
    np.testing.assert_array_equal(read_frame_refs(tuple(ref for _, ref in located)), frames[[2, 0]])
    wrong = run.compose_descriptor(name="other", data_keys={
        "det_image": {"source": "PV:det", "dtype": "array", "shape": [1, 6, 5], "external": "FILESTORE:"}})
    datum = res.compose_datum(datum_kwargs={"point_number": 1})
    r.datum(datum)
    event = wrong.compose_event(data={"det_image": datum["datum_id"]}, timestamps={"det_image": 0.0}, seq_num=1,
                                filled={"det_image": False})
    with pytest.raises(RejectedInput) as exc:
        r.plan_event(event, wrong.descriptor_doc, "det_image").locate()
    assert exc.value.reason == "wrong_shape"
