"""Issue 22, ingest and files: hostile paths, hung and missing files, runs that never stop and
counts that mislead, each beside a legit run, through the real service.

One service for the module (real 0MQ socket, real worker process, REST over real HTTP), fed
event-model documents: reduced 1D profiles inline (the legit runs) and in NXcanSAS files, and
area-detector frames in files that cannot be read (a FIFO, a missing file, a hung read). Each
test asserts what /metrics counts (exactly, as deltas over the test), that /api/v1/health
answered 200 "ok" all along, and that the legit run beside the case completed with every frame.
The one mock is an injected fault: a file read that blocks in the kernel (a hung mount).
"""
from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import h5py
import httpx
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from event_model import compose_run
from prometheus_client.parser import text_string_to_metric_families

import service.resolve as resolve_mod
from service.config import IngestConfig, load_settings
from service.errors import RejectedInput
from service.ingest import DocumentRouter
from service.metrics import Metrics
from service.resolve import FrameResolver
from service.server import Service
from service.sim import AzoCycle

from helpers import wait_for, wait_stopped

pytestmark = pytest.mark.slow
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
N_BINS = 450
Q = np.linspace(1.5, 6.0, N_BINS)                 # 1/nm
FIT = {"q_range": [2.0, 4.6], "background": {"kind": "power_law"},
       "peaks": [{"name": "lamellar", "center": 3.2, "fwhm": 0.2, "center_min": 2.7, "center_max": 3.6}],
       "regularizer": {"window": 8}}
MAPPED_ROOT = "/beamline/data"                    # the documents' root, mapped to <tmp>/mapped
READ_TIMEOUT_S = 1.0 + 10 * 0.05                  # file_open_timeout_s + file_retries x file_retry_delay_s


# ------------------------------------------------------------------------------------ the rig
class Rig:
    """The service, a PUB socket feeding it, and its directories: `allowed` (ingest.allowed_roots),
    `mapped` (root_map MAPPED_ROOT), `secret` (neither)."""

    def __init__(self, tmp: Path, free_port):
        self.allowed, self.mapped, self.secret = tmp / "allowed", tmp / "mapped", tmp / "secret"
        for d in (self.allowed, self.mapped, self.secret):
            d.mkdir()
        port = free_port()
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        settings = load_settings(
            None, ingest={"address": f"tcp://127.0.0.1:{port}", "allowed_roots": [str(self.allowed)],
                          "root_map": {MAPPED_ROOT: str(self.mapped)}, "max_open_runs": 3, "max_seq_gap": 100,
                          "file_retries": 10, "file_retry_delay_s": 0.05, "file_open_timeout_s": 1.0},
            tiled={"enabled": False}, results={"address": None}, api={"port": free_port()}, fit=FIT)
        self.service = Service(settings).start()
        self.api = f"http://127.0.0.1:{self.service.api_port}"
        time.sleep(1.0)                                               # slow joiner

    def send(self, name: str, doc: dict) -> None:
        self.pub.send(b" " + name.encode() + b" " + pack(doc))

    def scrape(self) -> dict:
        """/metrics over HTTP: {(sample name, ((label, value), ...)): value}."""
        text = httpx.get(f"{self.api}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def close(self) -> None:
        self.service.close()
        self.pub.close(linger=0)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    r = Rig(tmp_path_factory.mktemp("hardening"), free_port)
    yield r
    r.close()


def value(metrics: dict, sample: str, **labels) -> float:
    return metrics.get((sample, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, sample: str, **labels) -> float:
    return value(after, sample, **labels) - value(before, sample, **labels)


class HealthWatch:
    """Asks /api/v1/health when the case starts, every 0.1 s while it runs (own thread) and once
    more when it ends; `check()`: every answer came within 2 s and was 200 with status "ok"."""

    def __init__(self, api: str):
        self.api, self.answers, self._stop = api, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _ask(self) -> None:
        try:
            r = httpx.get(f"{self.api}/api/v1/health", timeout=2.0)
            self.answers.append((r.status_code, r.json().get("status")))
        except httpx.HTTPError as exc:
            self.answers.append((None, type(exc).__name__))

    def _poll(self) -> None:
        while True:
            self._ask()
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ask()

    def check(self) -> None:
        assert len(self.answers) >= 2, self.answers
        assert all(a == (200, "ok") for a in self.answers), [a for a in self.answers if a != (200, "ok")]


# ------------------------------------------------------------------------------------ runs
def profiles(n: int, seed: int) -> np.ndarray:
    """(n, N_BINS) Poisson counts of the azopolymer cycle, frames 0..n-1."""
    cycle, rng = AzoCycle(schedule=((0.0, "dark"), (5.0, "uv"))), np.random.default_rng(seed)
    return np.stack([rng.poisson(20 * cycle.profile(Q, float(i))).astype(float) for i in range(n)])


class InlineRun:
    """A legit run: reduced profiles inline in the events (no files)."""

    def __init__(self, rig: Rig, n: int = 20, seed: int = 0):
        self.rig, self.counts = rig, profiles(n, seed)
        self.bundle = compose_run(metadata={"plan_name": "legit"})
        self.uid = self.bundle.start_doc["uid"]
        self.desc = self.bundle.compose_descriptor(name="primary", data_keys={
            k: {"source": "sim", "dtype": "array", "shape": [N_BINS]} for k in ("q", "intensity", "sigma")})

    def begin(self) -> InlineRun:
        self.rig.send("start", self.bundle.start_doc)
        self.rig.send("descriptor", self.desc.descriptor_doc)
        return self

    def event(self, seq: int, frame: int | None = None) -> None:
        c = self.counts[(seq if frame is None else frame) - 1]
        self.rig.send("event", self.desc.compose_event(
            data={"q": Q, "intensity": c, "sigma": np.sqrt(np.maximum(c, 1))},
            timestamps={k: 0.0 for k in ("q", "intensity", "sigma")}, seq_num=seq))

    def events(self, seqs, pace: float = 0.005) -> None:
        for seq in seqs:
            self.event(seq)
            time.sleep(pace)

    def end(self, num_events: int | None = None) -> None:
        """The stop document; `num_events`: the number it announces (else the events composed)."""
        stop = self.bundle.compose_stop()
        if num_events is not None:
            stop["num_events"] = {"primary": num_events}
        self.rig.send("stop", stop)

    def run(self) -> InlineRun:
        self.begin().events(range(1, len(self.counts) + 1))
        self.end()
        return self


def file_run(rig: Rig, root: str, resource_path: str, n: int, *, spec: str = "AD_HDF5") -> str:
    """A run whose n frames are in a file: AD_HDF5 frames (8, 8) by point_number, or NXcanSAS
    profiles by row (datum {frame: i}); returns its uid."""
    bundle = compose_run(metadata={"plan_name": "files"})
    nxcansas = spec == "NXcanSAS"
    key = ({"source": "reduction", "dtype": "array", "shape": [N_BINS], "external": "FILESTORE:"} if nxcansas
           else {"source": "det", "dtype": "array", "shape": [1, 8, 8], "external": "FILESTORE:"})
    desc = bundle.compose_descriptor(name="primary", data_keys={"det": key})
    res = bundle.compose_resource(spec=spec, root=root, resource_path=resource_path,
                                  resource_kwargs={} if nxcansas else {"frame_per_point": 1})
    rig.send("start", bundle.start_doc)
    rig.send("descriptor", desc.descriptor_doc)
    rig.send("resource", res.resource_doc)
    for i in range(n):
        datum = res.compose_datum(datum_kwargs={"frame": i} if nxcansas else {"point_number": i})
        rig.send("datum", datum)
        rig.send("event", desc.compose_event(data={"det": datum["datum_id"]}, timestamps={"det": 0.0},
                                             filled={"det": False}, seq_num=i + 1))
    rig.send("stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


def write_nxcansas(path: Path, counts: np.ndarray) -> None:
    """NXcanSAS (SASentry/SASdata, I(Time, Q), Q in 1/nm; σ Poisson when read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        e = f.create_group("sasentry01")
        e.attrs.update({"canSAS_class": "SASentry", "NX_class": "NXentry"})
        d = e.create_group("sasdata01")
        d.attrs.update({"canSAS_class": "SASdata", "NX_class": "NXdata", "signal": "I", "I_axes": "Time,Q"})
        d.create_dataset("Q", data=Q).attrs["units"] = "1/nm"
        d.create_dataset("I", data=counts)


def assert_complete(rig: Rig, uid: str, n: int, timeout: float = 60) -> None:
    rec = wait_stopped(rig.service, uid, timeout)
    assert (rec.status, rec.frames_received, rec.frames_fitted, dict(rec.failed)) == ("complete", n, n, {}), \
        (rec.status, rec.reason, rec.frames_received, rec.frames_fitted, dict(rec.failed))


# ------------------------------------------------------------------------------------ item 2
def test_fifo_resource_refused_at_once_beside_a_legit_run(rig):
    """h5py.File on a FIFO blocked in open() with the GIL held: the whole service froze. Now
    each frame of the FIFO run is refused (file_unavailable: not a regular file), no reader
    thread is left blocked, and the legit run beside it completes."""
    fifo = rig.allowed / "det.fifo"
    os.mkfifo(fifo)
    before = rig.scrape()
    with HealthWatch(rig.api) as health:
        uid = file_run(rig, str(rig.allowed), "det.fifo", 5)
        legit = InlineRun(rig, 20, seed=1).run()
        assert_complete(rig, legit.uid, 20)
        rec = wait_stopped(rig.service, uid)
    health.check()
    after = rig.scrape()
    assert delta(before, after, "scatterflow_rejected_total", reason="file_unavailable") == 5
    assert delta(before, after, "scatterflow_documents_total", name="event") == 20   # the legit run's only
    assert rec.frames_received == 0 and rig.service.router.hung_reads() == 0


def test_missing_file_run_does_not_hold_back_another_run(rig):
    """Each event of a missing file waits its retries (10 x 50 ms) on its run's lane, not on the
    routing thread: the legit run sent after it is taken in full long before the missing file's
    6 refusals (3 s of waits; before, the routing thread waited them out first)."""
    before = rig.scrape()
    with HealthWatch(rig.api) as health:
        uid = file_run(rig, str(rig.allowed), "absent.h5", 6)
        legit = InlineRun(rig, 20, seed=2).run()
        wait_for(lambda: rig.service.store.get(legit.uid).frames_received == 20, 10, "legit frames not taken")
        refused_meanwhile = delta(before, rig.scrape(), "scatterflow_rejected_total", reason="file_unavailable")
        assert_complete(rig, legit.uid, 20)
        rec = wait_stopped(rig.service, uid)
    health.check()
    assert refused_meanwhile <= 3                        # the legit run did not wait for them (6 on the old path)
    after = rig.scrape()
    assert delta(before, after, "scatterflow_rejected_total", reason="file_unavailable") == 6
    assert rec.frames_received == 0


def hang_reads_of(monkeypatch, name: str) -> tuple[threading.Event, threading.Event]:
    """Injected fault: opening files called `name` blocks in the kernel, GIL released, as on a
    hung network mount, until `release` is set; `entered` is set when a read has blocked."""
    entered, release, probe = threading.Event(), threading.Event(), resolve_mod.probe_regular_file

    def hung(path: str) -> None:
        if os.path.basename(path) == name:
            entered.set()
            release.wait(120)
        probe(path)
    monkeypatch.setattr(resolve_mod, "probe_regular_file", hung)
    return entered, release


def test_hung_read_is_abandoned_after_its_timeout(rig, monkeypatch):
    """The first read of a hung file is given READ_TIMEOUT_S, then refused and its thread left
    behind; the file's later frames are refused at once while that thread stays blocked."""
    _, release = hang_reads_of(monkeypatch, "hung.h5")
    before = rig.scrape()
    try:
        with HealthWatch(rig.api) as health:
            t0 = time.monotonic()
            uid = file_run(rig, str(rig.allowed), "hung.h5", 4)
            legit = InlineRun(rig, 20, seed=3).run()
            assert_complete(rig, legit.uid, 20)
            rec = wait_stopped(rig.service, uid)
            took = time.monotonic() - t0
        health.check()
        after = rig.scrape()
        assert delta(before, after, "scatterflow_rejected_total", reason="file_unavailable") == 4
        assert rec.frames_received == 0 and rig.service.router.hung_reads() == 1
        assert READ_TIMEOUT_S <= took < READ_TIMEOUT_S + 10
    finally:
        release.set()
    wait_for(lambda: rig.service.router.hung_reads() == 0, 10, "the released reader did not finish")


# ------------------------------------------------------------------------------------ item 3
def test_paths_confined_to_mapped_and_allowed_roots(rig):
    """Resources that escape are refused, path_outside_root: `..` out of the mapped root and an
    unmapped root when they arrive (the resource and each of its frames), a symlink out of the
    mapped root when a frame is read (each frame); resources in the mapped root and in an
    allowed root are read and fitted."""
    n = 5
    leak = rig.secret / "leak.h5"
    write_nxcansas(leak, profiles(n, seed=4))
    (rig.mapped / "link.h5").symlink_to(leak)
    write_nxcansas(rig.mapped / "run1" / "ok.h5", profiles(n, seed=5))
    write_nxcansas(rig.allowed / "ok.h5", profiles(n, seed=6))
    before = rig.scrape()
    with HealthWatch(rig.api) as health:
        refused = [file_run(rig, MAPPED_ROOT, "../secret/leak.h5", n, spec="NXcanSAS"),
                   file_run(rig, MAPPED_ROOT, "link.h5", n, spec="NXcanSAS"),
                   file_run(rig, "/", str(leak).lstrip("/"), n, spec="NXcanSAS")]
        legit = [file_run(rig, MAPPED_ROOT, "run1/ok.h5", n, spec="NXcanSAS"),
                 file_run(rig, str(rig.allowed), "ok.h5", n, spec="NXcanSAS")]
        for uid in legit:
            assert_complete(rig, uid, n)
        records = [wait_stopped(rig.service, uid) for uid in refused]
    health.check()
    after = rig.scrape()
    assert delta(before, after, "scatterflow_rejected_total", reason="path_outside_root") == 2 * (1 + n) + n
    assert [r.frames_received for r in records] == [0, 0, 0]


def test_resolver_confines_paths_and_checks_again_at_open(tmp_path):
    """The rules one by one, with the documents' two ways of naming a file (root + resource_path,
    uri), and a symlink swapped in after the resource was accepted."""
    mapped, allowed, secret = tmp_path / "mapped", tmp_path / "allowed", tmp_path / "secret"
    for d in (mapped, allowed, secret):
        d.mkdir()
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for d in (mapped, allowed, secret):
        np.save(d / "img_0.npy", frame)
    r = FrameResolver(root_map={MAPPED_ROOT: str(mapped)}, allowed_roots=[str(allowed)], retries=0)

    def reason(doc: dict, kind: str = "resource") -> str | None:
        try:
            (r.resource if kind == "resource" else r.stream_resource)({"run_start": "run", **doc})
        except RejectedInput as exc:
            return exc.reason
        return None

    npy = {"spec": "NPY_SEQ", "resource_kwargs": {}}
    assert reason({**npy, "uid": "up", "root": MAPPED_ROOT, "resource_path": "../secret/img"}) == "path_outside_root"
    assert reason({**npy, "uid": "abs", "root": MAPPED_ROOT, "resource_path": str(secret / "img")}) \
        == "path_outside_root"                                   # os.path.join drops the root before an absolute path
    assert reason({**npy, "uid": "unmapped", "root": "/", "resource_path": str(secret / "img")[1:]}) \
        == "path_outside_root"
    assert reason({"uid": "uri", "mimetype": "application/x-hdf5", "data_key": "det",
                   "uri": f"file://localhost{MAPPED_ROOT}/../../{secret}/x.h5"}, "stream") == "path_outside_root"
    assert reason({**npy, "uid": "mapped", "root": MAPPED_ROOT, "resource_path": "sub/../img"}) is None
    assert reason({**npy, "uid": "allowed", "root": str(allowed), "resource_path": "img"}) is None
    (mapped / "out").symlink_to(secret)
    assert reason({**npy, "uid": "link", "root": MAPPED_ROOT, "resource_path": "out/img"}) is None   # text: inside
    for uid in ("up", "mapped", "allowed", "link"):
        r.datum({"datum_id": f"{uid}/0", "resource": uid, "datum_kwargs": {"index": 0}})
    with pytest.raises(RejectedInput, match="path_outside_root"):
        r.read_datum("up/0")                                     # every frame of a refused resource
    with pytest.raises(RejectedInput, match="path_outside_root"):
        r.read_datum("link/0")                                   # the real path, checked at open
    np.testing.assert_array_equal(r.read_datum("mapped/0")[0], frame)
    np.testing.assert_array_equal(r.read_datum("allowed/0")[0], frame)
    (allowed / "img_0.npy").unlink()
    (allowed / "img_0.npy").symlink_to(secret / "img_0.npy")     # swapped after the resource was accepted
    with pytest.raises(RejectedInput, match="path_outside_root"):
        r.read_datum("allowed/0")
    with pytest.raises(RejectedInput, match="path_outside_root"):      # by default no unmapped root is allowed
        FrameResolver(retries=0).resource({**npy, "uid": "x", "root": str(allowed), "resource_path": "img"})


# ------------------------------------------------------------------------------------ item 5
def test_idlest_open_run_evicted_for_a_new_one(rig):
    """max_open_runs 3: three runs that never stop, then a legit run. It is taken and completes;
    the run idle longest (B: A and C were heard from since) is closed as aborted, and counted."""
    before = rig.scrape()
    with HealthWatch(rig.api) as health:
        a, b, c = (InlineRun(rig, 2, seed=s).begin() for s in (7, 8, 9))
        for run in (b, a, c):
            run.event(1)
            time.sleep(0.1)
        wait_for(lambda: all(rig.service.store.get(r.uid).frames_received == 1 for r in (a, b, c)), 10, "events")
        legit = InlineRun(rig, 20, seed=10).run()
        assert_complete(rig, legit.uid, 20)
        evicted = wait_stopped(rig.service, b.uid)
        assert {a.uid, c.uid} <= set(rig.service.router.runs) and b.uid not in rig.service.router.runs
        for run in (a, c):
            run.end()
        done = [wait_stopped(rig.service, r.uid) for r in (a, c)]
    health.check()
    after = rig.scrape()
    assert evicted.status == "abort" and evicted.reason.startswith("evicted: 3 runs open"), evicted.reason
    assert evicted.frames_received == evicted.frames_final == 1
    assert [r.status for r in done] == ["complete", "complete"]
    assert delta(before, after, "scatterflow_runs_evicted_total") == 1
    assert delta(before, after, "scatterflow_runs_refused_total", reason="too_many_runs") == 0


# ------------------------------------------------------------------------------------ item 6
def test_seq_num_jump_is_refused_not_counted_lost(rig):
    """seq_num 1,000,000 after 2 (max_seq_gap 100 here): one refusal, no losses; a real gap of 2
    still counts 2 lost; the run ends complete with every event that came."""
    before = rig.scrape()
    with HealthWatch(rig.api) as health:
        run = InlineRun(rig, 10, seed=11).begin()
        run.events([1, 2])
        run.event(1_000_000, frame=3)
        run.events([3, 4, 5, 8, 9, 10])
        run.end(num_events=10)
        rec = wait_stopped(rig.service, run.uid)
    health.check()
    after = rig.scrape()
    assert delta(before, after, "scatterflow_rejected_total", reason="seq_num_out_of_range") == 1
    assert delta(before, after, "scatterflow_lost_upstream_total", kind="event") == 2
    assert (rec.status, rec.frames_received, rec.frames_final) == ("incomplete", 8, 8)   # stop says 10, 2 never came
    assert rec.reason.startswith("2 event(s)")


def test_events_a_stop_announces_but_never_came_are_lost_once(rig):
    """A stop whose num_events says 10 when 8 arrived: 2 lost upstream, the run incomplete; with
    a gap of 1 already counted (events 1-4, 6-8), 1 + 2, not the gap twice."""
    before = rig.scrape()
    with HealthWatch(rig.api) as health:
        tail, gapped = InlineRun(rig, 10, seed=12).begin(), InlineRun(rig, 10, seed=13).begin()
        tail.events(range(1, 9))
        gapped.events([1, 2, 3, 4, 6, 7, 8])
        for run in (tail, gapped):
            run.end(num_events=10)
        recs = [wait_stopped(rig.service, r.uid) for r in (tail, gapped)]
    health.check()
    after = rig.scrape()
    assert delta(before, after, "scatterflow_lost_upstream_total", kind="event") == 2 + 3
    assert [(r.status, r.frames_received) for r in recs] == [("incomplete", 8), ("incomplete", 7)]
    assert [r.reason.split()[0] for r in recs] == ["2", "3"]


def test_ingest_queue_gauge_reads_zero_when_idle(rig):
    """After a run, once the routing thread is idle, the ingest queue depth reads 0 (it read 1)."""
    InlineRun(rig, 5, seed=14).run()
    wait_for(lambda: rig.service.subscriber.route_busy_s() is None and rig.service.subscriber.queue.empty(),
             10, "ingest still busy")
    time.sleep(0.3)
    assert value(rig.scrape(), "scatterflow_queue_depth", queue="ingest") == 0


def test_stop_passes_missing_events_to_the_sink():
    """The contract with the hub: the stop handed on carries scatterflow_missing_events (gaps +
    events announced that never came), and the document as sent otherwise."""
    stops = []

    class Sink:
        def start_run(self, uid, start): ...
        def submit(self, frame): ...
        def stop_run(self, uid, stop): stops.append(stop)

    router = DocumentRouter(Sink(), Metrics(), IngestConfig())
    bundle = compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}})
    router.route("start", bundle.start_doc)
    router.route("descriptor", desc.descriptor_doc)
    for seq in (1, 2, 4, 5):
        router.route("event", desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}, seq_num=seq))
    stop = {**bundle.compose_stop(), "num_events": {"primary": 7}}
    router.route("stop", stop)
    assert stops == [{**stop, "scatterflow_missing_events": 3}]


# ------------------------------------------------------------------------------------ shutdown (last)
def test_service_closes_promptly_with_a_read_hung(rig, monkeypatch):
    """Closing the service (what SIGTERM does in `scatterflow serve`) while a file read is
    blocked: the read gets what is left of its time, the rest of its run is refused, and the
    service is down in seconds. Runs last: it closes the module's service."""
    entered, release = hang_reads_of(monkeypatch, "stuck.h5")
    metrics = rig.service.metrics
    refused = metrics.registry.get_sample_value("scatterflow_rejected_total", {"reason": "file_unavailable"}) or 0
    try:
        uid = file_run(rig, str(rig.allowed), "stuck.h5", 3)
        assert entered.wait(10)
        wait_for(lambda: uid not in rig.service.router.runs, 10, "stop not routed")   # all its documents in
        t0 = time.monotonic()
        rig.service.close()
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < READ_TIMEOUT_S + 10, took
    assert metrics.registry.get_sample_value("scatterflow_rejected_total", {"reason": "file_unavailable"}) \
        == refused + 3                                          # the hung read and the two after it
    assert rig.service.store.get(uid).status != "running"
