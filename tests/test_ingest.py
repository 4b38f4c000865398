"""Ingest: framing, decoding, validation and bad input, with event-model's own document factory."""
import functools
import itertools
import pickle

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from event_model import compose_run

from service.config import IngestConfig
from service.errors import RejectedInput
from service.decode import DocumentDecoder
from service.ingest import DocumentRouter, choose_frame_field
from service.metrics import Metrics

from helpers import RecordingSink

pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)


def frame_message(name, doc, prefix=b""):
    return prefix + b" " + name.encode() + b" " + pack(doc)


def make_run(shape=(8, 6), n=3, dtype=np.int32):
    bundle = compose_run(metadata={"plan_name": "test"})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={"det_image": {"source": "sim", "dtype": "array", "shape": list(shape), "dtype_numpy": "<i4"},
                   "temp": {"source": "sim", "dtype": "number", "shape": []}})
    events = [desc.compose_event(data={"det_image": np.full(shape, i, dtype), "temp": 20.0 + i},
                                 timestamps={"det_image": 0.0, "temp": 0.0}, seq_num=i + 1) for i in range(n)]
    stop = bundle.compose_stop()
    return bundle.start_doc, desc.descriptor_doc, events, stop


def rejected(metrics, reason):
    return metrics.registry.get_sample_value("scatterflow_rejected_total", {"reason": reason}) or 0


def test_decoder_roundtrip_msgpack_numpy():
    dec = DocumentDecoder()
    start, desc, events, stop = make_run()
    name, doc = dec.decode(frame_message("event", events[1]))
    assert name == "event"
    np.testing.assert_array_equal(doc["data"]["det_image"], np.full((8, 6), 1))
    assert doc["data"]["det_image"].dtype == np.int32


def test_decoder_reads_a_zmq_frame_in_place():
    """A message received with copy=False (zmq.Frame) decodes as its bytes do, and the payload
    is not copied by the framing split: the frame array is msgpack's copy, not a view of it."""
    import zmq
    start, desc, events, stop = make_run(shape=(64, 48))
    message = frame_message("event", events[2])
    for received in (zmq.Frame(message), memoryview(message), bytearray(message)):
        name, doc = DocumentDecoder().decode(received)
        assert name == "event" and doc["seq_num"] == 3
        np.testing.assert_array_equal(doc["data"]["det_image"], np.full((64, 48), 2))


@pytest.mark.parametrize("message,reason", [
    (b"\x00\xff garbage", "bad_framing"),
    (b" start", "bad_framing"),
    (b"start" * 40, "bad_framing"),
    (b" start \xc1\xc1\xc1", "undecodable"),
    (b" nonsense " + pack({"a": 1}), "unknown_document"),
    (b" start " + pack([1, 2, 3]), "malformed_document"),
    (b" start " + pickle.dumps({"uid": "x", "time": 0.0}), "pickle_refused"),
    (b"other start " + pack({}), "wrong_prefix"),
])
def test_decoder_rejects_bad_messages(message, reason):
    with pytest.raises(RejectedInput) as info:
        DocumentDecoder().decode(message)
    assert info.value.reason == reason


def test_pickle_only_when_allowed():
    doc = {"uid": "u", "time": 1.0}
    msg = b" start " + pickle.dumps(doc)
    assert DocumentDecoder(allow_pickle=True).decode(msg) == ("start", doc)
    with pytest.raises(ValueError, match="allow_pickle"):
        DocumentDecoder(serializer="pickle", allow_pickle=False)


def test_message_size_limit():
    with pytest.raises(RejectedInput) as info:
        DocumentDecoder(max_message_bytes=100).decode(b" event " + b"x" * 200)
    assert info.value.reason == "message_too_large"


def test_router_emits_frames_and_counts_bad_documents():
    sink, metrics = RecordingSink(), Metrics()
    router = DocumentRouter(sink, metrics, IngestConfig())
    start, desc, events, stop = make_run(n=4)
    good_run = [("start", start), ("descriptor", desc), *[("event", e) for e in events], ("stop", stop)]
    # a second, bad run interleaved with the good one
    bstart, bdesc, bevents, bstop = make_run(shape=(8, 6), n=4, dtype=np.float32)
    bevents[1]["data"]["det_image"] = np.full((8, 6), np.nan, np.float32)      # NaN frame
    bevents[2]["data"]["det_image"] = np.zeros((5, 5), np.float32)             # wrong shape
    bad_run = [("event", bevents[0]),                                          # before its descriptor
               ("start", bstart), ("descriptor", bdesc), *[("event", e) for e in bevents[1:]],
               ("event", {"not": "an event"}), ("stop", bstop)]
    for pair in itertools.zip_longest(good_run, bad_run):
        for name, doc in filter(None, pair):
            router.route(name, doc)
    assert [f.seq_num for f in sink.frames if f.run_uid == start["uid"]] == [1, 2, 3, 4]
    assert [f.seq_num for f in sink.frames if f.run_uid == bstart["uid"]] == [4]
    assert sink.frames[0].scalars == {"temp": 20.0}
    assert set(sink.stopped) == {start["uid"], bstart["uid"]}
    assert rejected(metrics, "event_before_descriptor") == 1
    assert rejected(metrics, "nonfinite_frame") == 1
    assert rejected(metrics, "wrong_shape") == 1
    assert rejected(metrics, "invalid_document") == 1
    assert router.runs == {}                                                   # per-run state dropped at stop


def test_seq_num_gaps_counted_as_lost_upstream():
    sink, metrics = RecordingSink(), Metrics()
    router = DocumentRouter(sink, metrics)
    start, desc, events, stop = make_run(n=6)
    for name, doc in [("start", start), ("descriptor", desc), ("event", events[0]), ("event", events[4])]:
        router.route(name, doc)
    assert metrics.registry.get_sample_value("scatterflow_lost_upstream_total", {"kind": "event"}) == 3


def test_event_page_unpacked():
    from event_model import pack_event_page
    sink, metrics = RecordingSink(), Metrics()
    router = DocumentRouter(sink, metrics)
    start, desc, events, stop = make_run(n=3)
    router.route("start", start)
    router.route("descriptor", desc)
    router.route("event_page", pack_event_page(*events))
    assert [f.seq_num for f in sink.frames] == [1, 2, 3]
    np.testing.assert_array_equal(sink.frames[2].data, np.full((8, 6), 2))


def test_frame_field_choice():
    desc = {"data_keys": {"x": {"shape": []}, "spectrum": {"shape": [100]}, "img": {"shape": [4, 5]}}}
    assert choose_frame_field(desc, None) == ("img", (4, 5))
    assert choose_frame_field(desc, "spectrum") == ("spectrum", (100,))
    assert choose_frame_field(desc, "absent") == (None, None)


def test_router_takes_frames_from_ophyd_async_hdf5_files(tmp_path):
    """A real ophyd-async detector writes HDF5; the router's frames equal what h5py reads."""
    import bluesky.plans as bp
    import h5py
    from bluesky.run_engine import RunEngine
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.sim import SimBlobDetector

    RE = RunEngine(call_returns_result=True)
    with init_devices():
        det = SimBlobDetector(StaticPathProvider(StaticFilenameProvider("blob"), tmp_path))
    sink, metrics = RecordingSink(), Metrics()
    router = DocumentRouter(sink, metrics, IngestConfig(allowed_roots=[str(tmp_path)]))
    RE.subscribe(lambda name, doc: router.route(name, doc))
    RE(bp.count([det], num=4))
    assert router.drain()                          # frames in files are read on the run's lane
    assert metrics.registry.get_sample_value("scatterflow_rejected_total", {"reason": "internal_error"}) is None
    with h5py.File(tmp_path / "blob.h5", "r", swmr=True) as f:
        truth = f["/entry/data/data"][()] if "/entry/data/data" in f else None
    assert [f.seq_num for f in sink.frames] == [1, 2, 3, 4]
    assert truth is not None and truth.shape[0] == 4
    for i, frame in enumerate(sink.frames):
        np.testing.assert_array_equal(frame.data, truth[i])
    assert len(sink.stopped) == 1 and router.runs == {}


def test_router_fills_ophyd_v1_resource_datum(tmp_path):
    """ophyd v1 SynSignalWithRegistry (resource/datum, NPY_SEQ): the event holds a datum id."""
    import bluesky.plans as bp
    from bluesky.run_engine import RunEngine
    from ophyd.sim import SynSignalWithRegistry

    made = []

    def acquire():
        made.append(np.random.default_rng(len(made)).integers(0, 100, (12, 10)).astype(np.int32))
        return made[-1]

    img = SynSignalWithRegistry(func=acquire, name="img", save_path=str(tmp_path))
    made.clear()                                   # SynSignal computes an initial value at construction
    sink, metrics = RecordingSink(), Metrics()
    router = DocumentRouter(sink, metrics, IngestConfig(allowed_roots=[str(tmp_path)]))
    RE = RunEngine()
    RE.subscribe(lambda name, doc: router.route(name, doc))
    RE(bp.count([img], num=3))
    assert router.drain()
    assert [f.seq_num for f in sink.frames] == [1, 2, 3]
    for frame, truth in zip(sink.frames, made):
        np.testing.assert_array_equal(frame.data, truth)


def test_reduced_profiles_are_frames_of_kind_profile():
    sink, metrics = RecordingSink(), Metrics()
    router = DocumentRouter(sink, metrics)
    bundle = compose_run()
    q = np.linspace(1, 5, 50)
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "q": {"source": "x", "dtype": "array", "shape": [50]},
        "intensity": {"source": "x", "dtype": "array", "shape": [50]}})
    router.route("start", bundle.start_doc)
    router.route("descriptor", desc.descriptor_doc)
    router.route("event", desc.compose_event(data={"q": q, "intensity": 4 * q}, timestamps={"q": 0, "intensity": 0}, seq_num=1))
    router.route("event", desc.compose_event(data={"q": q[::-1], "intensity": q}, timestamps={"q": 0, "intensity": 0}, seq_num=2))
    (f,) = sink.frames
    assert f.kind == "profile" and f.data.shape == (3, 50)
    np.testing.assert_array_equal(f.data[1], 4 * q)
    np.testing.assert_allclose(f.data[2], np.sqrt(np.maximum(4 * q, 1)))      # Poisson when no sigma field
    assert rejected(metrics, "bad_profile") == 1                                # q not increasing


def test_hdf5_frames_take_their_events_time_and_scalars(tmp_path):
    """A RunEngine with the simulated detector writing its frames to HDF5 (stream_resource and
    one stream_datum per frame, before its event): each frame handed on carries its own event's
    time and scalar readings (the simulator's truth), in seq order, pixels equal to the file's."""
    import h5py
    from bluesky import RunEngine

    from service.sim import make_beamline, operando_cycle

    det, light = make_beamline(frame_interval=1.0, seed=2, hdf5_directory=tmp_path)
    sink = RecordingSink()
    router = DocumentRouter(sink, Metrics(), IngestConfig(allowed_roots=[str(tmp_path)]))
    events = []
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(lambda name, doc: router.route(name, doc))
    RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    RE(operando_cycle(det, light, n_frames=4, schedule=[(0, "uv")]))
    assert router.drain()
    truth = "det_lamellar_center_truth"
    assert [(f.seq_num, f.time, f.scalars[truth]) for f in sink.frames] == \
        [(e["seq_num"], e["time"], e["data"][truth]) for e in events]
    with h5py.File(det.writer.path, "r") as f:
        np.testing.assert_array_equal(np.stack([f.data for f in sink.frames]), f["/entry/data/data"][()])
