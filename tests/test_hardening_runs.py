"""Hostile runs cost nothing but a counted refusal (issue 22, items 1 and 6).

One service for the module (real 0MQ ingest, one real worker process, hub, REST over HTTP),
with ``limits.npt`` small (4000 bins) so that the issue's start document (npt 2,000,000) is
refused here as it would be at a beamline, and a memory guard beside it: a thread that reads the
resident memory of the service's worker processes (and of this process, which hosts the service)
from /proc and kills them if one passes GUARD_BYTES, failing the test.

* limits: a run whose start document asks for more bins than the ceiling is refused before
  anything is allocated (status "refused", the key, value and ceiling in its reason,
  ``runs_refused{reason="limits"}``, its frames failed "refused"); a legit 2D run beside it
  completes; every other size a start document can set is bounded, and its PONI mapping cannot
  make pyFAI read a file (RunSpecBuilder directly);
* run outcomes: a bad value in the start document refuses the run with the ValueError's text
  ("setup_error"); a run whose every frame failed ends "failed"; a stop document carrying
  ``scatterflow_missing_events`` ends "incomplete";
* quarantine: the worker is killed each time a batch of one run is in flight (the injected fault:
  SIGSTOP so that the batch stays in flight, then SIGKILL); after the second death that run is
  quarantined, not replayed, and a legit run on the same worker completes, each frame final once.

Counts are asserted exactly, as deltas of the module's service's /metrics read over HTTP.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from event_model import compose_run
from prometheus_client.parser import text_string_to_metric_families

from service.config import load_settings
from service.detectors import run_detectors
from service.errors import ConfigError
from service.publish.hub import MISSING_EVENTS_KEY, _OpenRun, run_outcome
from service.run_spec import LimitExceeded, RunSpecBuilder
from service.server import Service
from service.sim import AzoCycle
from service.sim.frames import FrameSimulator, poni_dict
from workers.geometry import Geometry

from helpers import wait_for, wait_stopped

pytestmark = pytest.mark.slow
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)

GUARD_BYTES = 3 * 2**30          # a worker (or this process) above this is killed: the test fails
NPT_CEILING = 4000
N_BINS = 450
FIT = {"q_range": [2.0, 4.6], "background": {"kind": "power_law"},
       "peaks": [{"name": "lamellar", "center": 3.2, "fwhm": 0.2, "center_min": 2.7, "center_max": 3.6}],
       "regularizer": {"window": 4}}
FIT_2D = {"q_range": [2.2, 4.2], "background": {"kind": "power_law"},
          "peaks": [{"name": "lamellar", "shape": "pseudo_voigt", "center": 3.2, "fwhm": 0.2, "center_min": 2.7,
                     "center_max": 3.6, "fwhm_min": 0.03, "fwhm_max": 1.0}]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryGuard(threading.Thread):
    """Every 50 ms: a worker of `service` above GUARD_BYTES is SIGKILLed and recorded in
    `tripped`; this process (the service's) above it ends the session at once (exit 99)."""

    def __init__(self, service: Service):
        super().__init__(name="memory-guard", daemon=True)
        self.service, self.tripped, self.peak = service, [], 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for w in self.service.dispatcher.worker_health():
                rss = rss_bytes(w["pid"])
                self.peak = max(self.peak, rss)
                if rss > GUARD_BYTES:
                    self.tripped.append((w["pid"], rss))
                    os.kill(w["pid"], signal.SIGKILL)
            if rss_bytes(os.getpid()) > GUARD_BYTES:
                os.write(2, b"memory guard: the service's process passed GUARD_BYTES; exiting\n")
                os._exit(99)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    port = _port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"}, tiled={"enabled": False},
                             results={"address": None}, api={"port": _port()}, phases={"enabled": False},
                             fit=FIT, limits={"npt": NPT_CEILING})
    service = Service(settings).start()
    guard = MemoryGuard(service)
    guard.start()
    time.sleep(1.0)                                   # 0MQ slow joiner
    yield service, pub, guard
    guard.done.set()
    service.close()
    pub.close(linger=0)
    assert not guard.tripped, f"memory guard killed workers: {guard.tripped}"


def send(pub, name: str, doc: dict) -> None:
    pub.send(b" " + name.encode() + b" " + pack(doc))


class ProfileRun:
    """A run of reduced profiles (azopolymer cycle, Poisson noise): `begin`, `events`, `end`."""

    def __init__(self, pub, md: dict | None = None, seed: int = 0):
        self.pub, self.rng = pub, np.random.default_rng(seed)
        self.cycle = AzoCycle(schedule=((0.0, "dark"), (5.0, "uv")))
        self.q = np.linspace(1.5, 6.0, N_BINS)
        self.bundle = compose_run(metadata={"plan_name": "hardening", **(md or {})})
        self.uid = self.bundle.start_doc["uid"]
        self.desc = self.bundle.compose_descriptor(name="primary", data_keys={
            k: {"source": "sim", "dtype": "array", "shape": [N_BINS]} for k in ("q", "intensity", "sigma")})

    def begin(self) -> "ProfileRun":
        send(self.pub, "start", self.bundle.start_doc)
        send(self.pub, "descriptor", self.desc.descriptor_doc)
        return self

    def events(self, first: int, last: int, pace: float = 0.005) -> None:
        for seq in range(first, last + 1):
            counts = self.rng.poisson(20 * self.cycle.profile(self.q, float(seq - 1))).astype(float)
            send(self.pub, "event", self.desc.compose_event(
                data={"q": self.q, "intensity": counts, "sigma": np.sqrt(np.maximum(counts, 1))},
                timestamps={k: 0.0 for k in ("q", "intensity", "sigma")}, seq_num=seq))
            time.sleep(pace)

    def end(self) -> None:
        send(self.pub, "stop", self.bundle.compose_stop())


def frame_runs(pub, runs: dict[str, tuple[dict, FrameSimulator | None]], n: int, shape=(200, 200)) -> dict[str, str]:
    """Runs of 2D frames sent side by side, event by event: {name: (start metadata, simulator or
    None for frames of zeros)}; returns {name: uid}."""
    bundles, descs = {}, {}
    for name, (md, _) in runs.items():
        bundles[name] = b = compose_run(metadata={"plan_name": "hardening_2d", **md})
        descs[name] = d = b.compose_descriptor(name="primary", data_keys={
            "image": {"source": "sim", "dtype": "array", "shape": list(shape), "dtype_numpy": "<i4"}})
        send(pub, "start", b.start_doc)
        send(pub, "descriptor", d.descriptor_doc)
    for i in range(n):
        for name, (_, sim) in runs.items():
            image = sim.frame(float(i)).astype(np.int32) if sim is not None else np.zeros(shape, np.int32)
            send(pub, "event", descs[name].compose_event(data={"image": image}, timestamps={"image": 0.0},
                                                         seq_num=i + 1))
        time.sleep(0.01)
    for name, b in bundles.items():
        send(pub, "stop", b.compose_stop())
    return {name: b.start_doc["uid"] for name, b in bundles.items()}


def transmission_geometry() -> Geometry:
    """200 x 200 2x-binned Pilatus pixels, beam in the middle, 0.5 m."""
    return Geometry(dist=0.5, poni1=0.0344, poni2=0.0344, detector="Detector", pixel1=344e-6, pixel2=344e-6,
                    shape=(200, 200), wavelength=1e-10)


def api(service, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{service.api_port}{path}", timeout=10, trust_env=False)


def metric(service, name: str, **labels) -> float:
    """A counter's value (`name` without _total) from /metrics over HTTP; 0 when absent."""
    for fam in text_string_to_metric_families(api(service, "/metrics").text):
        for s in fam.samples:
            if s.name == f"{name}_total" and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def counters(service) -> dict[str, float]:
    """The counts these tests move, read together."""
    return {"limits": metric(service, "scatterflow_runs_refused", reason="limits"),
            "setup_error": metric(service, "scatterflow_runs_refused", reason="setup_error"),
            "quarantined_runs": metric(service, "scatterflow_runs_quarantined"),
            **{f"failed_{r}": metric(service, "scatterflow_frames_failed", reason=r)
               for r in ("refused", "quarantined", "no_geometry", "no_setup")}}


def delta(service, before: dict) -> dict[str, float]:
    return {k: v - before[k] for k, v in counters(service).items() if v != before[k]}


def healthy(service) -> dict:
    """/api/v1/health once it answers 200 "ok" (a restarted worker is "degraded" while it starts)."""
    def ok():
        r = api(service, "/api/v1/health")
        return r.status_code == 200 and r.json()["status"] == "ok" and r.json()
    return wait_for(ok, 30, "health did not answer 200 ok")


def ended(service, uid: str, timeout: float = 60):
    """The record of run `uid` once it has ended (a refused run is closed at start, before its stop)."""
    return wait_for(lambda: (r := service.store.get(uid)) is not None and r.stopped is not None and r,
                    timeout, f"run {uid[:8]} did not end")


# ----------------------------------------------------------------------------------- item 1
def test_npt_above_its_ceiling_is_refused_before_allocating_and_a_legit_run_beside_it_completes(rig):
    service, pub, guard = rig
    before = counters(service)
    g = transmission_geometry()
    poni = poni_dict(g.to_pyfai())
    cyc = AzoCycle(schedule=((0.0, "dark"), (2.0, "uv")))
    hostile = {"geometry": poni, "scatterflow": {"reduction": {"npt": 2_000_000}}}    # the document
    legit = {"geometry": poni, "scatterflow": {"fit": FIT_2D, "reduction": {"npt": 200, "radial_range": [1.5, 5.0]}}}
    n = 8
    uids = frame_runs(pub, {"hostile": (hostile, FrameSimulator(g, cyc, flux=3.0, seed=1)),
                            "legit": (legit, FrameSimulator(g, cyc, flux=3.0, seed=2))}, n)
    run = wait_stopped(service, uids["legit"])
    assert run.status == "complete" and run.reason == ""
    assert (run.frames_received, run.frames_fitted, run.frames_final, dict(run.failed)) == (n, n, n, {})
    bad = ended(service, uids["hostile"])
    wait_for(lambda: bad.frames_received == n and sum(bad.failed.values()) == n, 10, "hostile frames not counted")
    assert bad.status == "refused"
    assert bad.reason == f"reduction.npt = 2000000 is above the ceiling limits.npt = {NPT_CEILING}"
    assert (bad.frames_received, bad.frames_fitted, dict(bad.failed)) == (n, 0, {"refused": n})
    rest = api(service, f"/api/v1/runs/{uids['hostile']}").json()
    assert rest["status"] == "refused" and rest["reason"] == bad.reason and rest["frames_failed"] == {"refused": n}
    assert delta(service, before) == {"limits": 1, "failed_refused": n}
    assert healthy(service)["status"] == "ok"
    assert not guard.tripped and guard.peak < GUARD_BYTES
    print(f"worker peak RSS {guard.peak / 2**20:.0f} MiB")


@pytest.mark.parametrize("start, reason", [
    ({"scatterflow": {"reduction": {"npt": 4001}}}, "reduction.npt = 4001 is above the ceiling limits.npt = 4000"),
    ({"scatterflow": {"modality": "giwaxs", "incident_angle": 0.003, "reduction": {"qmap_npt": [4096, 64]}}},
     "reduction.qmap_npt = 4096 is above the ceiling limits.qmap_npt = 2048"),
    ({"scatterflow": {"fit": {"peaks": [{"name": f"p{i}", "center": 1.0 + i} for i in range(33)]}}},
     "fit.peaks = 33 is above the ceiling limits.peaks = 32"),
    ({"scatterflow": {"fit": {"regularizer": {"window": 1_000_000}}}},
     "fit.regularizer.window = 1000000 is above the ceiling limits.window = 256"),
    ({"geometry": {"detector": "Detector", "dist": 1.0, "poni1": 0.0, "poni2": 0.0, "wavelength": 1e-10,
                   "detector_config": {"pixel1": 1e-4, "pixel2": 1e-4, "max_shape": [100_000, 100_000]}}},
     "detector pixels = 10000000000 is above the ceiling limits.detector_pixels = 67108864"),
    ({"scatterflow": {f"d{i}": {"modality": "saxs"} for i in range(17)}},
     "start.scatterflow detector entries = 17 is above the ceiling limits.detectors = 16"),
    ({"scatterflow": {"saxs": {"reduction": {"npt": 10**9}}}},      # a detector entry's own keys too
     "reduction.npt = 1000000000 is above the ceiling limits.npt = 4000"),
])
def test_every_size_a_start_document_sets_has_a_ceiling(start, reason):
    builder = RunSpecBuilder(load_settings(None, phases={"enabled": False}, limits={"npt": NPT_CEILING}))
    with pytest.raises(LimitExceeded) as exc:
        builder.build({"uid": "u1", **start})
    assert str(exc.value) == reason


@pytest.mark.parametrize("geometry, reason", [
    ({"detector": "/etc/hostname"}, "start.geometry.detector: '/etc/hostname' is not a pyFAI detector name"),
    ({"detector": "NexusDetector", "detector_config": {"filename": "/etc/hostname"}},
     "start.geometry: a start document may not name files (filename)"),
    ({"detector": "Detector", "detector_config": {"pixel1": 1e-4, "pixel2": 1e-4, "max_shape": [10, 10],
                                                  "splineFile": "/etc/hostname"}},
     "start.geometry: a start document may not name files (splineFile)"),
])
def test_a_start_document_geometry_makes_pyfai_read_no_file(geometry, reason):
    """pyFAI opens a detector named by a path (NexusDetector) or a spline file: refused, a
    "setup_error" with this reason, before pyFAI sees the mapping."""
    builder = RunSpecBuilder(load_settings(None, phases={"enabled": False}))
    start = {"uid": "u1", "geometry": {"dist": 1.0, "poni1": 0.0, "poni2": 0.0, "wavelength": 1e-10, **geometry}}
    with pytest.raises(ValueError) as exc:
        builder.build(start)
    assert str(exc.value) == reason and not isinstance(exc.value, LimitExceeded)
    start["geometry"].update(detector="Pilatus1M", detector_config={})       # a pyFAI name is read, as before
    assert builder.build(start).geometry.shape == (1043, 981)


def test_sizes_at_their_ceiling_pass_and_configured_ones_above_fail_at_start():
    builder = RunSpecBuilder(load_settings(None, phases={"enabled": False}, limits={"npt": NPT_CEILING}))
    spec = builder.build({"uid": "u1", "scatterflow": {"reduction": {"npt": NPT_CEILING},
                                                       "fit": {"regularizer": {"window": 256}}}})
    assert spec.reduction.npt == NPT_CEILING and spec.regularizer.window == 256
    with pytest.raises(ConfigError, match="reduction.npt = 5000 is above the ceiling limits.npt = 4000"):
        RunSpecBuilder(load_settings(None, reduction={"npt": 5000}, limits={"npt": NPT_CEILING}))
    # ingest opens one analysis, not one per entry, for a document with too many detectors
    many = {"uid": "u1", "scatterflow": {f"d{i}": {"modality": "saxs"} for i in range(17)}}
    assert run_detectors(many, max_detectors=16) == {}
    assert len(run_detectors(many, max_detectors=17)) == 17


# ----------------------------------------------------------------------------------- item 6
def test_bad_values_in_start_documents_are_refused_with_their_reason(rig):
    service, pub, _ = rig
    before = counters(service)
    many = ProfileRun(pub, {"scatterflow": {"reduction": {"npt": "many"}}}, seed=3).begin()
    xrd = ProfileRun(pub, {"scatterflow": {"modality": "xrd"}}, seed=4).begin()
    for run in (many, xrd):
        run.events(1, 5)
        run.end()
    reasons = {}
    for run in (many, xrd):
        rec = ended(service, run.uid)
        wait_for(lambda: rec.frames_received == 5 and sum(rec.failed.values()) == 5, 10, "frames not counted")
        assert (rec.status, rec.frames_fitted, dict(rec.failed)) == ("refused", 0, {"refused": 5})
        reasons[run] = rec.reason
    assert reasons[many] == "start.scatterflow.reduction.npt: Input should be a valid integer, unable to parse " \
                           "string as an integer"
    assert reasons[xrd] == "start.scatterflow.modality: Input should be 'saxs', 'waxs', 'gisaxs' or 'giwaxs'"
    assert delta(service, before) == {"setup_error": 2, "failed_refused": 10}
    assert healthy(service)["status"] == "ok"


def test_a_run_whose_every_frame_failed_ends_failed(rig, caplog, capfd):
    """2D frames and no geometry anywhere (no geometry.poni, none in the start document): the
    run ends failed, its failure logged once (by the service, not again by the worker)."""
    service, pub, _ = rig
    before = counters(service)
    n = 6
    capfd.readouterr()
    uid = frame_runs(pub, {"blind": ({}, None)}, n, shape=(32, 32))["blind"]
    rec = wait_stopped(service, uid)
    assert rec.status == "failed" and rec.reason == f"every frame failed ({n} no_geometry)"
    logged = [r.getMessage() for r in caplog.records if uid[:8] in r.getMessage() and r.levelno >= logging.WARNING]
    assert [m for m in logged if "NoGeometry" in m] == logged[:1] and logged[1:] == [f"run {uid[:8]} failed: {rec.reason}"]
    assert uid[:8] not in capfd.readouterr().err             # the worker process's log
    assert (rec.frames_received, rec.frames_fitted, dict(rec.failed)) == (n, 0, {"no_geometry": n})
    assert delta(service, before) == {"failed_no_geometry": n}
    assert healthy(service)["status"] == "ok"


def test_a_stop_announcing_events_that_never_arrived_ends_incomplete(rig):
    """The stop document as ingest hands it to the dispatcher, with the count it adds
    (``scatterflow_missing_events``: num_events said 10, 8 arrived)."""
    service, pub, _ = rig
    before = counters(service)
    run = ProfileRun(pub, seed=5).begin()
    run.events(1, 8)
    wait_for(lambda: (r := service.store.get(run.uid)) is not None and r.frames_received == 8, 30, "frames missing")
    stop = run.bundle.compose_stop()
    service.dispatcher.stop_run(run.uid, {**stop, "num_events": {"primary": 10}, MISSING_EVENTS_KEY: 2})
    rec = wait_stopped(service, run.uid)
    assert rec.status == "incomplete" and rec.reason == "2 event(s) lost upstream never arrived"
    assert (rec.frames_received, rec.frames_final, dict(rec.failed)) == (8, 8, {})
    send(pub, "stop", stop)                    # ingest's own stop: the run is closed already, nothing changes
    time.sleep(0.3)
    assert service.store.get(run.uid).status == "incomplete" and delta(service, before) == {}


def test_run_outcome_precedence():
    """The stop's own exit_status first, then "failed" (no frame reduced), then "incomplete"."""
    ok, dead = _OpenRun(received=5, reduced=5), _OpenRun(received=5)
    dead.failed.update({"no_geometry": 3, "reduction_error": 2})
    assert run_outcome({"exit_status": "success"}, ok) == ("complete", "")
    assert run_outcome({"exit_status": "success"}, _OpenRun()) == ("complete", "")      # a run without frames
    assert run_outcome({"exit_status": "abort", "reason": "user", MISSING_EVENTS_KEY: 2}, dead) == ("abort", "user")
    assert run_outcome({"exit_status": "success", MISSING_EVENTS_KEY: 2}, dead) == \
        ("failed", "every frame failed (3 no_geometry, 2 reduction_error)")
    assert run_outcome({"exit_status": "success", MISSING_EVENTS_KEY: 1}, ok) == \
        ("incomplete", "1 event(s) lost upstream never arrived")


# ----------------------------------------------------------------------------------- quarantine
def _in_flight(service, uid: str) -> bool:
    """A batch of run `uid` sent to the worker and not answered."""
    with service.dispatcher._lock:
        return any(b.uid == uid for w in service.dispatcher._workers for b in w.inflight.values())


def _worker_pid(service) -> int:
    return service.dispatcher.worker_health()[0]["pid"]


def test_a_run_that_kills_its_worker_twice_is_quarantined_and_the_legit_run_completes(rig):
    service, pub, _ = rig
    before, restarts = counters(service), service.dispatcher.restarts
    legit = ProfileRun(pub, seed=6).begin()
    legit.events(1, 10)
    wait_for(lambda: service.store.get(legit.uid).frames_fitted == 10
             and service.dispatcher.worker_health()[0]["inflight_batches"] == 0, 30, "legit frames not reduced")
    # death 1: the worker stops answering (SIGSTOP) while the hostile run's batches are sent, then dies
    pid = _worker_pid(service)
    os.kill(pid, signal.SIGSTOP)
    hostile = ProfileRun(pub, seed=7).begin()
    hostile.events(1, 4)
    wait_for(lambda: service.store.get(hostile.uid).frames_received == 4 and _in_flight(service, hostile.uid),
             10, "hostile batch not in flight")
    os.kill(pid, signal.SIGKILL)
    # death 2: its replacement dies with the replayed batch in flight, long before it could answer
    # (spawned a moment ago: still importing); the legit run's replay is in flight too (its first death)
    second = wait_for(lambda: (p := _worker_pid(service)) != pid and _in_flight(service, hostile.uid) and p,
                      10, "worker not restarted")
    os.kill(second, signal.SIGKILL)
    rec = ended(service, hostile.uid, timeout=30)
    assert rec.status == "quarantined"
    assert rec.reason.startswith("its worker died 2 times while reducing it (last exit code -9); not replayed: "
                                 "4 frame(s) without a final result counted failed"), rec.reason
    hostile.events(5, 6)                        # later frames: counted failed, never sent to a worker
    hostile.end()
    legit.events(11, 16)
    legit.end()
    run = wait_stopped(service, legit.uid, timeout=60)
    assert run.status == "complete" and run.reason == ""
    assert (run.frames_received, run.frames_final, dict(run.failed)) == (16, 16, {})
    cols, _ = service.store.peaks_since(legit.uid, 0, final=True)
    assert sorted(cols["seq_num"]) == list(range(1, 17))        # each frame's final fit once, none lost
    wait_for(lambda: rec.frames_received == 6 and sum(rec.failed.values()) == 6, 10, "hostile frames not counted")
    assert (rec.frames_final, dict(rec.failed)) == (0, {"quarantined": 6})
    assert service.dispatcher.restarts == restarts + 2
    assert delta(service, before) == {"quarantined_runs": 1, "failed_quarantined": 6}
    assert api(service, f"/api/v1/runs/{hostile.uid}").json()["status"] == "quarantined"
    assert healthy(service)["status"] == "ok"
