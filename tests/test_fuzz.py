"""Fuzz: hostile and malformed 0MQ messages through the real ingest path.

Every message goes through `ZmqSubscriber.handle` (what the routing thread calls for each
received message: decode, validate, route) with the real `DocumentDecoder`, `DocumentRouter`,
`FrameResolver` and `Metrics`; only the socket and the dispatcher are left out (a sink that
checks and drops the frames). Hypothesis generates the messages, derandomized so that CI sees the
same ones each time. Per example the test asserts:

- nothing raises, and no message reaches the catch-all (``internal_error`` stays 0);
- every message is either accepted (``scatterflow_documents_total`` + 1) or refused with a reason
  (``scatterflow_rejected_total{reason}`` + 1): accepted + rejected == messages sent;
- frames handed on are finite 2D numeric arrays (or (3, N) profiles) within the pixel limit;
- open runs never exceed ``ingest.max_open_runs``; per-run state is gone once runs are closed;
- pickle never runs unless ``allow_pickle`` (a payload whose unpickling would set a flag).

Memory: per-run state checked empty after each example, peak RSS growth over the mutated runs,
and tracemalloc in the deterministic tests (a flood of starts, size and structure bombs).
Figures (messages, accepted, rejected by reason, frames, RSS growth) are printed by
``pytest tests/test_fuzz.py -s``. benchmarks/fuzz_ingest_atheris.py fuzzes the same path
coverage-guided (not in the suite).
"""
import base64
import collections
import copy
import functools
import math
import pickle
import resource
import tempfile
import time
import tracemalloc
import uuid

import h5py
import msgpack
import msgpack_numpy
import numpy as np
import pytest
from event_model import compose_run, pack_event_page
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import IngestConfig
from service.decode import DOCUMENT_NAMES
from service.ingest import DocumentRouter, ZmqSubscriber
from service.metrics import Metrics

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


TALLY = {"messages": 0, "accepted": 0, "rejected": collections.Counter(), "frames": 0}
SHAPE = (4, 3)
MAX_OPEN_RUNS = 8


# --------------------------------------------------------------------------- the ingest path
class CheckingSink:
    """The dispatcher's place: checks what the router emits and keeps nothing of it."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.open: set[str] = set()
        self.frames = 0

    def start_run(self, uid, start):
        assert isinstance(uid, str) and uid not in self.open
        self.open.add(uid)

    def submit(self, frame):
        assert frame.run_uid in self.open
        a = frame.data
        assert isinstance(a, np.ndarray) and a.size <= self.max_pixels
        if frame.kind == "frame":
            assert a.ndim == 2 and a.dtype.kind in "uif", (a.shape, a.dtype)
            assert a.dtype.kind != "f" or np.isfinite(a).all()
        else:       # q finite and increasing; intensities may hold NaN (masked bins of a reduction)
            assert a.ndim == 2 and a.shape[0] == 3 and np.isfinite(a[0]).all() and np.all(np.diff(a[0]) > 0)
        assert isinstance(frame.seq_num, int) and math.isfinite(frame.time)
        self.frames += 1

    def stop_run(self, uid, stop):
        assert uid in self.open
        self.open.discard(uid)


class Ingest:
    """ZmqSubscriber (never started: no socket) over a router with small limits."""

    def __init__(self, **overrides):
        cfg = dict(file_retries=0, max_open_runs=MAX_OPEN_RUNS, max_frame_pixels=4096,
                   max_message_bytes=1 << 20, max_objects=20_000, max_depth=32,
                   allowed_roots=[tempfile.gettempdir()])          # the templates' files (tmp_path_factory)
        self.config = IngestConfig(**{**cfg, **overrides})
        self.metrics = Metrics()
        self.sink = CheckingSink(self.config.max_frame_pixels)
        self.router = DocumentRouter(self.sink, self.metrics, self.config)
        self.subscriber = ZmqSubscriber(self.config, self.router, self.metrics)

    def counts(self) -> tuple[float, collections.Counter]:
        accepted = sum(s.value for fam in self.metrics.documents.collect() for s in fam.samples
                       if s.name.endswith("_total"))
        rejected = collections.Counter()
        for fam in self.metrics.rejected.collect():
            for s in fam.samples:
                if s.name.endswith("_total"):
                    rejected[s.labels["reason"]] += int(s.value)
        return accepted, rejected

    def feed(self, messages: list[bytes]) -> None:
        """Send messages; assert each was accepted or counted as rejected, none by the catch-all."""
        acc0, rej0 = self.counts()
        for m in messages:
            self.subscriber.handle(m, time.monotonic())
        assert self.router.drain()              # documents with frames in files are counted on their run's lane
        acc1, rej1 = self.counts()
        rejected = rej1 - rej0
        assert rejected["internal_error"] == 0
        assert (acc1 - acc0) + sum(rejected.values()) == len(messages)
        assert len(self.router.runs) <= self.config.max_open_runs
        TALLY["messages"] += len(messages)
        TALLY["accepted"] += int(acc1 - acc0)
        TALLY["rejected"].update(rejected)

    def close_all(self) -> None:
        """Housekeeping's timeout path: every open run closed, per-run state dropped."""
        self.router.expire(-1.0)
        assert self.router.drain()
        r = self.router.resolver
        assert self.router.runs == {} and self.router._descriptor_run == {}
        assert not r._resources and not r._datums and not r._frame_keys and not self.sink.open


def message(name: str, doc, prefix: bytes = b"") -> bytes:
    return prefix + b" " + name.encode() + b" " + pack(doc)


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    yield
    r = TALLY["rejected"]
    print(f"\nfuzz: {TALLY['messages']} messages, {TALLY['accepted']} accepted, {sum(r.values())} rejected, "
          f"{TALLY['frames']} frames emitted; rejected by reason: {dict(r.most_common())}")


# --------------------------------------------------------------------------- valid runs to mutate
@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return make_templates(tmp_path_factory.mktemp("fuzzdata"))


def make_templates(d):
    """Valid runs as (name, doc) lists: inline frames (event and event_page), reduced profiles,
    ophyd v1 NPY_SEQ resource/datum, and ophyd-async HDF5 stream_resource/stream_datum; files under `d`."""
    frames = np.arange(3 * 12, dtype=np.uint16).reshape(3, *SHAPE)
    runs = {}

    b = compose_run(metadata={"plan_name": "inline", "sample": {"name": "film", "temperature_K": 300.0}})
    desc = b.compose_descriptor(name="primary", data_keys={
        "img": {"source": "sim", "dtype": "array", "shape": list(SHAPE), "dtype_numpy": "<u2"},
        "temp": {"source": "sim", "dtype": "number", "shape": []}})
    ev = [desc.compose_event(data={"img": frames[i], "temp": 20.0 + i}, timestamps={"img": 1.0, "temp": 1.0},
                             seq_num=i + 1) for i in range(3)]
    page = pack_event_page(*[desc.compose_event(data={"img": frames[i], "temp": 1.0},
                                                timestamps={"img": 1.0, "temp": 1.0}, seq_num=4 + i)
                             for i in range(2)])
    runs["inline"] = [("start", b.start_doc), ("descriptor", desc.descriptor_doc),
                      *[("event", e) for e in ev], ("event_page", page), ("stop", b.compose_stop())]

    b = compose_run(metadata={"plan_name": "profiles"})
    q = np.linspace(1.0, 5.0, 16)
    desc = b.compose_descriptor(name="primary", data_keys={
        k: {"source": "sim", "dtype": "array", "shape": [16]} for k in ("q", "intensity", "sigma")})
    ev = [desc.compose_event(data={"q": q, "intensity": q * i, "sigma": np.ones(16)},
                             timestamps={k: 1.0 for k in ("q", "intensity", "sigma")}, seq_num=i + 1) for i in range(2)]
    runs["profiles"] = [("start", b.start_doc), ("descriptor", desc.descriptor_doc),
                        *[("event", e) for e in ev], ("stop", b.compose_stop())]

    b = compose_run(metadata={"plan_name": "npy"})
    for i in range(2):
        np.save(d / f"frames_{i}.npy", frames[i])
    res = b.compose_resource(spec="NPY_SEQ", root=str(d), resource_path="frames", resource_kwargs={})
    datums = [res.compose_datum(datum_kwargs={"index": i}) for i in range(2)]
    desc = b.compose_descriptor(name="primary", data_keys={
        "img": {"source": "sim", "dtype": "array", "shape": list(SHAPE), "external": "FILESTORE:"}})
    ev = [desc.compose_event(data={"img": datums[i]["datum_id"]}, timestamps={"img": 1.0},
                             filled={"img": False}, seq_num=i + 1) for i in range(2)]
    runs["npy"] = [("start", b.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc),
                   ("datum", datums[0]), ("event", ev[0]), ("datum", datums[1]), ("event", ev[1]),
                   ("stop", b.compose_stop())]

    b = compose_run(metadata={"plan_name": "hdf5"})
    with h5py.File(d / "blob.h5", "w") as f:
        f["/entry/data/data"] = frames
    desc = b.compose_descriptor(name="primary", data_keys={
        "blob": {"source": "sim", "dtype": "array", "shape": [1, *SHAPE], "external": "STREAM:"}})
    sres = b.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{d}/blob.h5",
                                     data_key="blob", parameters={"dataset": "/entry/data/data"})
    sd = [sres.compose_stream_datum(indices={"start": i, "stop": i + 1}, seq_nums={"start": i + 1, "stop": i + 2},
                                    descriptor=desc.descriptor_doc) for i in range(2)]
    ev = [desc.compose_event(data={}, timestamps={}, seq_num=i + 1) for i in range(2)]
    runs["hdf5"] = [("start", b.start_doc), ("descriptor", desc.descriptor_doc),
                    ("stream_resource", sres.stream_resource_doc), ("stream_datum", sd[0]), ("event", ev[0]),
                    ("stream_datum", sd[1]), ("event", ev[1]), ("stop", b.compose_stop())]
    return runs


def relabel(docs):
    """A deep copy of a run with fresh uids (so runs never collide across examples)."""
    old = {doc[k] for _, doc in docs for k in ("uid", "datum_id") if isinstance(doc.get(k), str) and "/" not in doc[k]}
    new = {u: str(uuid.uuid4()) for u in old}

    def sub(x):
        if isinstance(x, str):
            for a, b in new.items():
                if a in x:
                    x = x.replace(a, b)
            return x
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return copy.copy(x)
    return [(name, sub(doc)) for name, doc in docs]


# --------------------------------------------------------------------------- strategies
names = st.sampled_from(sorted(DOCUMENT_NAMES))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20))
map_keys = st.one_of(st.text(max_size=8), st.text(max_size=8), st.integers(-3, 3), st.binary(max_size=3))
structures = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=6),
                                                       st.dictionaries(map_keys, c, max_size=6)),
                          max_leaves=25)
dtypes = st.sampled_from(["<u2", "<i4", "<f4", "<f8", ">f8", "|u1", "|b1", "<c8", "<f2", "<U3", "|S2"])
def _array(dtype, shape, fill):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, fill).astype(dtype, casting="unsafe")


arrays = st.builds(_array,
                   dtypes, st.sampled_from([(), (0,), (5,), SHAPE, (1, *SHAPE), (3, 3), (65, 65), (2, 2, 2)]),
                   st.sampled_from([0, 1, 7, np.nan, np.inf, -1e300]))
numpy_forgeries = st.fixed_dictionaries(
    {b"nd": st.sampled_from([True, False, 1, None])},
    optional={b"type": st.sampled_from(["|O", "O", "<f8", "V8", "(2,)f8", "M8[s]", "<U0", "S0", "bogus", 12]),
              b"kind": st.sampled_from([b"O", b"V", b"", b"f"]),
              b"shape": st.sampled_from([[], [1], [2], [-1], [2**40, 2**40], [1] * 40, "x", [True], [1.5]]),
              b"data": st.one_of(st.binary(max_size=24), st.just(pickle.dumps({"uid": "x"})), st.text(max_size=4))})
depth_bombs = st.integers(20, 60).map(lambda n: functools.reduce(lambda acc, _: [acc], range(n), 0))
hostile = st.one_of(scalars, structures, arrays, numpy_forgeries, depth_bombs,
                    st.sampled_from([[10**9, 10**9], [None, 4, 3], [-1, 3], [2**63, 2], [1, 0, 0], "/etc/passwd",
                                     "file:///etc/passwd", "http://example.org/x.h5", {"start": 0, "stop": 2**40},
                                     {"start": 5, "stop": 1}, {"start": -3, "stop": 0}, {"index": -1},
                                     {"index": 2**40}, {"point_number": 3}, "a" * 300]))


def paths(doc, prefix=()):
    """Every key path of a document (nested dicts), for picking what to mutate."""
    for k, v in doc.items():
        yield (*prefix, k)
        if isinstance(v, dict) and len(prefix) < 3:
            yield from paths(v, (*prefix, k))


@st.composite
def mutated_run(draw, templates):
    kind = draw(st.sampled_from(sorted(templates)))
    docs = relabel(templates[kind])
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(docs) - 1))
        name, doc = docs[i]
        keys = list(paths(doc))
        path = draw(st.sampled_from(keys)) if keys else ()
        action = draw(st.sampled_from(["drop", "set", "set", "rename", "add"]))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if action == "drop" and path:
            parent.pop(path[-1], None)
        elif action == "set" and path:
            parent[path[-1]] = copy.deepcopy(draw(hostile))   # sampled constants are shared objects
        elif action == "rename":
            docs[i] = (draw(names), doc)
        else:
            doc[draw(map_keys)] = copy.deepcopy(draw(hostile))   # sampled constants are shared objects
    return docs


# --------------------------------------------------------------------------- the tests
@fuzz(1500)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_random_bytes(raws):
    FEED_RAW.feed(raws)


framed_garbage = st.builds(
    lambda prefix, name, payload: prefix + b" " + name.encode("utf-8", "replace") + b" " + payload,
    st.sampled_from([b"", b"", b"bl1", b"\xff"]), st.one_of(names, st.text(max_size=12)),
    st.one_of(st.binary(max_size=200), st.binary(max_size=40).map(lambda b: b"\xdd\xff\xff\xff\xff" + b),
              st.binary(max_size=40).map(lambda b: b"\x80\x04" + b)))


@fuzz(800)
@given(st.lists(framed_garbage, min_size=1, max_size=4))
def test_framing_with_garbage_payloads(messages):
    FEED_RAW.feed(messages)


wrong_structure = st.tuples(names, st.one_of(
    structures, st.dictionaries(st.text(max_size=10), hostile, max_size=8),
    st.fixed_dictionaries({"uid": hostile, "time": hostile, "data": hostile, "descriptor": hostile,
                           "seq_num": hostile})))


@fuzz(500)
@given(st.lists(wrong_structure, min_size=1, max_size=4))
def test_valid_msgpack_of_wrong_structure(pairs):
    messages = []
    for name, doc in pairs:
        try:
            messages.append(message(name, doc))
        except (OverflowError, ValueError, TypeError):      # not packable (numpy forgeries of bad dtype)
            continue
    FEED_RAW.feed(messages)


def test_mutated_bluesky_runs(templates):
    """Valid runs of the four kinds, each with 1-3 documents damaged. The per-run state is
    checked empty after every example; the process' peak RSS grows by less than 100 MiB over the
    whole run (tracemalloc would slow hypothesis several-fold; it is used in the tests below)."""
    ingest = Ingest()

    @fuzz(400)
    @given(mutated_run(templates))
    def run(docs):
        msgs = []
        for name, doc in docs:
            try:
                msgs.append(message(name, doc))
            except (OverflowError, ValueError, TypeError):
                continue
        ingest.feed(msgs)
        ingest.close_all()          # as the run timeout does; checks that no per-run state is left

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # MiB (Linux: KiB)
    run()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    TALLY["frames"] += ingest.sink.frames
    print(f"\nmutated runs: peak RSS grew {grown:.1f} MiB, {ingest.sink.frames} frames emitted")
    assert ingest.sink.frames > 200              # the valid parts of the runs still go through
    assert grown < 100


def test_out_of_order_and_interleaved_runs(templates):
    """Valid documents of two runs shuffled, dropped and repeated: refused or handled, never lost."""
    ingest = Ingest()

    @fuzz(150)
    @given(st.data())
    def run(data):
        a = relabel(templates[data.draw(st.sampled_from(sorted(templates)))])
        b = relabel(templates[data.draw(st.sampled_from(sorted(templates)))])
        docs = data.draw(st.permutations(a + b))
        docs = [d for d in docs if not data.draw(st.booleans())] + data.draw(st.lists(st.sampled_from(a + b),
                                                                                      max_size=3))
        ingest.feed([message(name, doc) for name, doc in docs])
        ingest.close_all()

    run()
    TALLY["frames"] += ingest.sink.frames
    ingest.close_all()


FEED_RAW = Ingest()


def test_open_runs_and_memory_bounded_under_a_flood_of_starts():
    """1000 start documents that never stop: at most max_open_runs kept, each new one taking
    the place of the idlest (runs_evicted; issue 22: the newest is no longer refused); what stays
    allocated after them (tracemalloc) is under 1 MiB."""
    ingest = Ingest()
    b = compose_run()
    template = b.start_doc
    tracemalloc.start()
    ingest.feed([message("start", {**template, "uid": str(uuid.uuid4())}) for _ in range(1000)])
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    accepted, rejected = ingest.counts()
    evicted = ingest.metrics.registry.get_sample_value("scatterflow_runs_evicted_total")
    assert len(ingest.router.runs) == MAX_OPEN_RUNS and accepted == 1000 and not rejected
    assert evicted == 1000 - MAX_OPEN_RUNS and len(ingest.sink.open) == MAX_OPEN_RUNS
    assert current < 2**20
    ingest.close_all()


def test_large_and_complex_messages_refused_before_decoding():
    """Over-size messages and object/nesting bombs are refused without building them: the peak
    allocation while handling stays within 1.5x the message itself."""
    ingest = Ingest(max_message_bytes=8 << 20, max_objects=10_000, max_depth=32)
    bombs = {"message_too_large": b" event " + b"\x00" * (9 << 20),
             "too_complex": b" event \xdd" + (7 << 20).to_bytes(4, "big") + b"\x90" * (7 << 20)}   # 7 Mi empty lists
    for reason, msg in bombs.items():
        tracemalloc.start()
        ingest.feed([msg])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert ingest.counts()[1][reason] == 1
        assert peak < 1.5 * len(msg), (reason, peak)
    depth = b" start \x81\xa3uid" + b"\x91" * 40 + b"\xc0"
    ingest.feed([depth])
    assert ingest.counts()[1]["too_complex"] == 2
    # small messages declaring huge containers: msgpack's limits (at most the message's length)
    declared = [b" event \xdd\xff\xff\xff\xff\xc0",                  # array of 2^32 - 1 items
                b" event \xdf\xff\xff\xff\xff\xc0\xc0",              # map of 2^32 - 1 pairs
                b" event \xc6\xff\xff\xff\xffxx",                    # bin of 4 GiB
                b" event \xdb\xff\xff\xff\xffxx"]                    # str of 4 GiB
    tracemalloc.start()
    ingest.feed(declared)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ingest.counts()[1]["undecodable"] == 4 and peak < 2**20


@pytest.mark.parametrize("kind,index,path,value,reason", [
    ("hdf5", 1, ("data_keys", "blob", "shape"), [None, 4, 3], None),      # variable dims: not a frame key
    ("npy", 1, ("data_keys", "img", "shape"), [4, None], None),
    ("inline", 1, ("data_keys", "img", "shape"), [None], None),
    ("inline", 2, ("time",), float("nan"), "bad_time"),
    ("inline", 2, ("time",), float("inf"), "bad_time"),
    ("inline", 2, ("seq_num",), -5, "bad_seq_num"),
    ("inline", 2, ("seq_num",), 2**62, "seq_num_out_of_range"),         # not 4.6e18 events lost upstream
    ("inline", 2, ("data", "img"), [[1, 2, 3], [1]], "bad_frame"),      # ragged lists
    ("hdf5", 2, ("run_start",), "not-an-open-run", "resource_without_start"),   # would never be dropped
])
def test_regressions_found_by_fuzzing(templates, kind, index, path, value, reason):
    """Inputs that reached the catch-all (internal_error), leaked state or skewed counters."""
    docs = relabel(templates[kind])
    parent = docs[index][1]
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    ingest = Ingest()
    ingest.feed([message(name, doc) for name, doc in docs])
    rejected = ingest.counts()[1]
    lost = ingest.metrics.registry.get_sample_value("scatterflow_lost_upstream_total", {"kind": "event"}) or 0
    assert lost <= 1
    if reason is None:
        assert rejected["invalid_document"] == 0 and ingest.router.runs == {}
    else:
        assert rejected[reason] >= 1
    ingest.close_all()


class _Flag:
    ran = False


def _set_flag():
    _Flag.ran = True
    return {"uid": "pwned", "time": 0.0}


class _Evil:
    def __reduce__(self):
        return (_set_flag, ())


@fuzz(100)
@given(st.sampled_from(["start", "event", "descriptor"]), st.integers(2, 5), st.booleans())
def test_pickle_refused_unless_enabled(name, protocol, inside_msgpack):
    """A pickled payload, or a msgpack-numpy object array (pickled inside msgpack), never
    unpickles while allow_pickle is false; with allow_pickle it does."""
    evil = pickle.dumps(_Evil(), protocol=protocol)
    payload = (pack({"uid": {b"nd": True, b"kind": b"O", b"type": "|O", b"shape": [], b"data": evil}, "time": 0.0})
               if inside_msgpack else evil)
    _Flag.ran = False
    refused = FEED_RAW.counts()[1]["pickle_refused"]
    FEED_RAW.feed([b" " + name.encode() + b" " + payload])
    assert not _Flag.ran
    assert FEED_RAW.counts()[1]["pickle_refused"] == refused + 1
    permissive = Ingest(allow_pickle=True)
    permissive.feed([b" " + name.encode() + b" " + payload])
    assert _Flag.ran


def test_non_string_keys_refused():
    """Found by atheris: a start document with an integer key reached jsonschema's
    patternProperties (re.search on an int: TypeError, the catch-all). Keys must be str."""
    ingest = Ingest()
    found = base64.b64decode("IHN0YXJ0IISjdWlk2SQyYTVhOWQxYy0wYjkyLTQyMTktOTZmMy05NmJlNjM3MGI5NzSkdGlt"
                             "ZctB2nBsZYGkbmFtZaRmaWxt")
    start = compose_run().start_doc
    ingest.feed([found, message("start", {**start, 7: "x"}), message("start", {**start, b"k": 1}),
                 message("start", {**start, "sample": {b"nested": 1}})])
    assert ingest.counts()[1]["non_string_key"] == 4


def test_object_dtype_array_is_refused_not_dereferenced():
    """msgpack-numpy would build an object array from raw bytes (pointers 0x4141...): touching
    it segfaults. The decoder refuses the dtype ("bad_array") and the process survives."""
    ingest = Ingest()
    forged = {b"nd": True, b"type": "|O", b"shape": [2], b"data": b"A" * 16}
    ingest.feed([message("start", {"uid": forged, "time": 1.0})])
    assert ingest.counts()[1]["bad_array"] == 1


def test_receive_thread_refuses_oversize_messages_before_queueing(free_port):
    """Over the real socket: a message over max_message_bytes is counted at once by the receive
    thread ("message_too_large") and never queued; the next one goes through."""
    import zmq
    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    ingest = Ingest(address=f"tcp://127.0.0.1:{port}", max_message_bytes=1000)
    ingest.subscriber.start()
    try:
        start = compose_run().start_doc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ingest.router.runs:    # slow joiner: repeat until one arrives
            pub.send(b" event " + b"x" * 5000)
            pub.send(message("start", {**start, "uid": str(uuid.uuid4())}))
            time.sleep(0.2)
        while time.monotonic() < deadline:                               # the routing thread catches up
            accepted, rejected = ingest.counts()
            if accepted + sum(rejected.values()) == ingest.subscriber.received:
                break
            time.sleep(0.05)
        assert ingest.router.runs and rejected["message_too_large"] >= 1
        assert accepted + sum(rejected.values()) == ingest.subscriber.received
        assert ingest.subscriber._queued_bytes == 0
    finally:
        ingest.subscriber.stop()
        pub.close(linger=0)


def test_receive_queue_bounded_in_bytes():
    """The receive thread waits while queued bytes would pass ingest.max_queue_bytes (an empty
    queue takes any message), as it waits on a full queue: lossless, and memory bounded."""
    import threading
    ingest = Ingest(max_queue_bytes=100)
    sub = ingest.subscriber
    sub._reserve(60)
    second = threading.Thread(target=sub._reserve, args=(60,))
    second.start()
    second.join(0.3)
    assert second.is_alive() and sub._queued_bytes == 60         # 120 > 100: waits
    sub._release(60)
    second.join(2)
    assert not second.is_alive() and sub._queued_bytes == 60
    sub._release(60)
    sub._reserve(500)                                            # larger than the budget, queue empty: taken
    assert sub._queued_bytes == 500


def _ref_count_depth(obj) -> tuple[int, int]:
    """Reference for check_msgpack_structure, from the Python object msgpack encodes: objects
    (every scalar, container, map key) and depth (containers nested, empty ones not counted)."""
    if isinstance(obj, dict):
        children = [x for kv in obj.items() for x in kv]
    elif isinstance(obj, list):
        children = obj
    else:
        return 1, 0
    counts = [_ref_count_depth(c) for c in children]
    return 1 + sum(c for c, _ in counts), (1 + max(d for _, d in counts)) if counts else 0


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=300),
              st.binary(max_size=300), st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20))),
    lambda c: st.one_of(st.lists(c, max_size=20), st.dictionaries(st.text(max_size=4), c, max_size=20)),
    max_leaves=60)


@fuzz(300)
@given(msgpack_values, st.booleans())
def test_structure_check_matches_a_reference(value, single_float):
    """The header walk counts what msgpack encodes, for every type and length class
    (fixint..int64, float32/64, fixstr..str16, bin8/16, ext/fixext, fix/16-bit containers)."""
    from service.errors import RejectedInput
    from service.decode import check_msgpack_structure
    try:
        payload = msgpack.packb(value, use_single_float=single_float)
    except OverflowError:                       # a double beyond float32's range
        payload = msgpack.packb(value)
    count, depth = _ref_count_depth(value)
    check_msgpack_structure(payload, max_objects=count, max_depth=max(depth, 1))
    if count > 1:
        with pytest.raises(RejectedInput, match="objects"):
            check_msgpack_structure(payload, max_objects=count - 1, max_depth=64)
    if depth > 1:
        with pytest.raises(RejectedInput, match="deeper"):
            check_msgpack_structure(payload, max_objects=count, max_depth=depth - 1)


def test_structure_check_32_bit_headers():
    from service.decode import check_msgpack_structure
    for value in ([None] * 70_000, {str(i): i for i in range(70_000)}, "x" * 70_000, b"y" * 70_000):
        count, depth = _ref_count_depth(value)
        check_msgpack_structure(msgpack.packb(value), max_objects=count, max_depth=1)
        if count > 1:
            with pytest.raises(ValueError):
                check_msgpack_structure(msgpack.packb([value]), max_objects=count, max_depth=1)
