"""Issue 22, items 4, 7, 8 and the spool count of 6: /health tells the truth, /status and close
never hang, the results stream survives ingest.root_map, a killed service leaves nothing behind.

Real components throughout: the service in-process (real ingest socket, real worker process,
real HTTP to its API), a real Tiled server behind a TCP relay (cut: Tiled unreachable), a stock
bluesky RemoteDispatcher on the results stream, and `scatterflow serve` as a subprocess that is
SIGKILLed. The faults are real signals: SIGSTOP/SIGCONT of a worker, SIGKILL of the service.
Run with ``-s`` to see each test's figures.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
import zmq
from event_model import DocumentNames, compose_run, schema_validators

from service.config import load_settings
from service.frame_slots import segment_owner, shm_directory
from service.server import STOPPED_REASON, Service

from helpers import one_tiled_attempt, wait_for, wait_stopped
from test_faults import BIN, FIT, ProfileRun, TcpRelay, alive, children, free_port, pack

pytestmark = pytest.mark.slow
STUCK_S = 1.5                   # route_stuck_s and worker_stuck_s of these tests' services


def send(pub, name: str, doc: dict) -> None:
    pub.send(b" " + name.encode() + b" " + pack(doc))


def metric(service: Service, name: str, label: str = "") -> float:
    """A sample of the service's Prometheus text (what /metrics serves), 0 when absent."""
    for line in service.metrics.render().decode().splitlines():
        if not line.startswith("#") and line.split(" ")[0] == (f"{name}{{{label}}}" if label else name):
            return float(line.split(" ")[1])
    return 0.0


def health(service: Service) -> tuple[int, dict]:
    r = httpx.get(f"http://127.0.0.1:{service.api_port}/api/v1/health", timeout=5)
    return r.status_code, r.json()


class Stream:
    """A stock bluesky RemoteDispatcher on the results stream, on its own thread."""

    def __init__(self, address: str):
        from bluesky.callbacks.zmq import RemoteDispatcher
        from service.publish.results import msgpack_deserializer
        self.docs: list[tuple[str, dict]] = []
        self.disp = RemoteDispatcher(address.replace("tcp://", ""), deserializer=msgpack_deserializer())
        self.disp.subscribe(lambda name, doc: self.docs.append((name, doc)))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.disp.start()
        except asyncio.CancelledError:
            pass

    def run_docs(self, source_uid: str) -> list[tuple[str, dict]]:
        """The documents of the analysis run of `source_uid`, once its stop arrived (else [])."""
        start = next((d for n, d in self.docs if n == "start" and d.get("source_run_uid") == source_uid), None)
        if start is None:
            return []
        descs = {d["uid"] for n, d in self.docs if n == "descriptor" and d["run_start"] == start["uid"]}
        mine = [(n, d) for n, d in self.docs if d is start or (n == "descriptor" and d["uid"] in descs)
                or (n == "event" and d["descriptor"] in descs) or (n == "stop" and d["run_start"] == start["uid"])]
        return mine if mine[-1][0] == "stop" else []

    def close(self) -> None:
        self.disp.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(self.disp.loop)])
        self.thread.join(5)


class Rig:
    """One service: ingest from a PUB bound here, ingest.root_map set, the results stream on,
    Tiled (`tiled`, the session's server, up before the service) through a TcpRelay, /health
    limits of STUCK_S."""

    def __init__(self, tmp: Path, tiled):
        ingest_port, self.results_port = free_port(), free_port()
        self.tiled = tiled
        self.serve = KilledServe(tmp / "killed", tiled)       # boots while the other tests run
        self.relay = TcpRelay(tiled.port)
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{ingest_port}")
        self.settings = load_settings(
            None, ingest={"address": f"tcp://127.0.0.1:{ingest_port}", "root_map": {"/data": str(tmp / "data")}},
            tiled={"uri": f"http://127.0.0.1:{self.relay.port}/api/v1", "api_key": tiled.api_key,
                   "directory": str(tmp / "sf"), "flush_seconds": 0.2},
            results={"address": f"tcp://127.0.0.1:{self.results_port}"}, api={"port": free_port()},
            phases={"enabled": False}, fit=FIT, health={"route_stuck_s": STUCK_S, "worker_stuck_s": STUCK_S})
        self.service = Service(self.settings).start()
        self.stream = Stream(f"tcp://127.0.0.1:{self.results_port}")
        time.sleep(1.0)                                       # 0MQ slow joiners: ingest and results

    def emit(self, name: str, doc: dict) -> None:
        send(self.pub, name, doc)

    def close(self) -> None:
        self.stream.close()
        self.service.close()
        self.serve.close()
        self.pub.close(linger=0)
        self.relay.down()


class KilledServe:
    """`scatterflow serve` (subprocess) for the kill test, fed by a PUB bound here, writing to
    `tiled` directly; started with the rig, so that it boots while the other tests run."""

    def __init__(self, work: Path, tiled):
        work.mkdir(parents=True)
        self.work, port, api_port = work, free_port(), free_port()
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.config = {"ingest": {"address": f"tcp://127.0.0.1:{port}"}, "results": {"address": None},
                       "tiled": {"uri": tiled.uri, "api_key": tiled.api_key, "directory": str(work / "sf"),
                                 "flush_seconds": 0.2},
                       "api": {"port": api_port}, "phases": {"enabled": False}, "fit": FIT}
        (work / "config.yaml").write_text(yaml.safe_dump(self.config))
        self.log = open(work / "serve.log", "w")
        self.process = subprocess.Popen([str(BIN / "scatterflow"), "serve", "--config", str(work / "config.yaml")],
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.api = f"http://127.0.0.1:{api_port}/api/v1"

    def close(self) -> None:
        if self.process.poll() is None:                # the kill test did not run: no orphans either
            kids = children(self.process.pid)
            self.process.kill()
            self.process.wait(10)
            for pid in kids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self.pub.close(linger=0)
        self.log.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, shared_tiled):
    """The module's service, with one Tiled attempt per write (helpers.one_tiled_attempt), on
    the session's Tiled server."""
    with one_tiled_attempt():
        r = Rig(tmp_path_factory.mktemp("health"), shared_tiled)
        try:
            yield r
        finally:
            r.close()


# ------------------------------------------------------------------------------ item 4
def test_results_stream_with_root_map_reaches_remote_dispatcher(rig):
    """ingest.root_map {"/data": ...} in the configuration: the analysis start document carries
    the configuration as a JSON string (event-model refuses keys with "/" or "."), and a stock
    RemoteDispatcher receives start, the descriptors of ``primary`` (final fits) and
    ``provisional``, one event per frame in each, and the stop; every document valid; nothing
    counted as a publish error."""
    service, n = rig.service, 12
    run = ProfileRun(rig.emit, seed=11).begin()
    run.events(1, n, pace=0.01)
    run.end()
    rec = wait_stopped(service, run.uid, 60)
    docs = wait_for(lambda: rig.stream.run_docs(run.uid), 30, "analysis run's stop on the results stream")
    names = [name for name, _ in docs]
    print("figures:", {"frames": n, "documents": len(docs), "events": names.count("event")})
    assert rec.status == "complete" and rec.frames_final == n
    assert names == ["start", "descriptor", "descriptor", "descriptor"] + ["event"] * (3 * n) + ["stop"]
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    start, stop = docs[0][1], docs[-1][1]
    config = json.loads(start["configuration"])
    assert config["ingest"]["root_map"] == rig.settings.ingest.root_map
    assert "api_key" not in config["tiled"] and "api_key" not in config["api"]
    streams = {d["uid"]: d["name"] for name, d in docs if name == "descriptor"}
    assert sorted(streams.values()) == ["primary", "profiles", "provisional"]
    seqs = {s: [d["data"]["source_seq_num"] for name, d in docs if name == "event" and streams[d["descriptor"]] == s]
            for s in ("primary", "provisional", "profiles")}
    assert seqs["primary"] == list(range(1, n + 1))             # final fits: one per frame, in order
    assert sorted(seqs["provisional"]) == sorted(seqs["profiles"]) == list(range(1, n + 1))
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": n, "provisional": n, "profiles": n}
    assert metric(service, "scatterflow_publish_errors_total", 'sink="results"') == 0


# ------------------------------------------------------------------------------ item 7 (a)
def test_stopped_worker_is_reported_stuck_then_ok(rig):
    """A worker SIGSTOPped with batches in flight: /health answers 503 "stuck" naming it once its
    oldest batch is older than worker_stuck_s (and /status still answers); SIGCONT: 200 "ok"
    again, and the run completes with every frame final, counts exact in /metrics."""
    service, n = rig.service, 10
    assert health(service)[0] == 200
    received0 = metric(service, "scatterflow_frames_received_total")
    final0 = metric(service, "scatterflow_frames_final_total")
    pid = service.dispatcher.worker_health()[0]["pid"]
    run = ProfileRun(rig.emit, seed=12).begin()
    time.sleep(0.3)                                         # the run's start reaches the worker
    os.kill(pid, signal.SIGSTOP)
    try:
        sent = time.monotonic()
        run.events(1, 4, pace=0.01)
        code, body = wait_for(lambda: (h := health(service))[0] == 503 and h, STUCK_S + 5, "health never 503")
        stuck_after = time.monotonic() - sent
        status = httpx.get(f"http://127.0.0.1:{service.api_port}/api/v1/status", timeout=1.0)
        print("figures:", {"stuck_after_s": round(stuck_after, 2), "problems": body["problems"]})
        assert body["status"] == "stuck" and status.status_code == 200
        assert any(f"worker 0 (pid {pid}) has not answered a batch" in p for p in body["problems"]), body
        assert STUCK_S <= stuck_after < STUCK_S + 3
        worker = body["workers"][0]
        assert worker["alive"] and worker["inflight_batches"] >= 1 and worker["oldest_inflight_s"] > STUCK_S
    finally:
        os.kill(pid, signal.SIGCONT)
    _, body = wait_for(lambda: (h := health(service))[0] == 200 and h, 10, "health not ok after SIGCONT")
    assert body == {**body, "status": "ok", "problems": []}
    run.events(5, n, pace=0.01)
    run.end()
    rec = wait_stopped(service, run.uid, 60)
    assert rec.status == "complete" and rec.frames_received == rec.frames_final == n and not rec.failed
    assert service.dispatcher.worker_health()[0]["pid"] == pid                 # stopped, never restarted
    wait_for(lambda: metric(service, "scatterflow_frames_final_total") - final0 == n, 10, "final count")
    assert metric(service, "scatterflow_frames_received_total") - received0 == n


# ------------------------------------------------------------------------------ item 6 (spool)
def test_spooled_writes_counted_exactly_and_logged(rig, caplog):
    """Tiled unreachable (relay cut) during a run: every write the Tiled writer spools is counted
    in scatterflow_tiled_spooled (exactly the files in the spool), the outage logs one WARNING
    and /health says "degraded" while writes wait; Tiled back: the spool drains, one INFO line
    names the count, /health is "ok" again."""
    service, tiled, n = rig.service, rig.service.tiled, 8
    assert tiled.drain(30) and health(service)[0] == 200
    spooled0 = metric(service, "scatterflow_tiled_spooled_total")
    assert spooled0 == tiled.spooled
    caplog.set_level(logging.INFO, logger="service.publish.tiled.writer")
    rig.relay.down()
    try:
        run = ProfileRun(rig.emit, seed=13).begin()
        run.events(1, n, pace=0.01)
        run.end()
        rec = wait_stopped(service, run.uid, 60)
        assert rec.status == "complete" and rec.frames_final == n
        assert tiled.flush(30)
        spool_files = [p for p in tiled.spool_dir.iterdir() if p.suffix in (".npz", ".parquet")]
        spooled = int(tiled.spooled - spooled0)
        wait_for(lambda: metric(service, "scatterflow_tiled_spooled_total") - spooled0 == spooled, 5, "metric")
        code, body = health(service)
        print("figures:", {"spooled": spooled, "spool_files": len(spool_files), "health": body["status"]})
        assert spooled == len(spool_files) > 0
        assert code == 503 and body["status"] == "degraded" and body["tiled_spool_pending"] == spooled
        assert f"{spooled} Tiled write(s) waiting in the spool" in " ".join(body["problems"])
    finally:
        rig.relay.up()
    assert tiled.drain(60)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "spooling writes" in r.message]
    drained = [r.message for r in caplog.records if r.levelno == logging.INFO and "spool drained" in r.message]
    assert len(warnings) == 1 and drained == [f"Tiled: spool drained, {spooled} spooled write(s) now in Tiled"]
    assert metric(service, "scatterflow_tiled_spooled_total") - spooled0 == spooled      # unchanged by the drain
    wait_for(lambda: health(service)[0] == 200, 5, "health ok after the drain")


# ------------------------------------------------------------------------------ item 7 (b)
def test_status_answers_and_close_is_bounded_under_backpressure(free_port):
    """The worker SIGSTOPped and its queue (1 batch) full: ingest blocks on back-pressure while
    holding the dispatcher. /status answers within 1 s, /health says "stuck" (routing thread and
    worker), and Service.close() returns within 15 s with the default close budget: the stopped
    worker is killed, the run closed as interrupted."""
    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"}, tiled={"enabled": False},
                             results={"address": None}, api={"port": free_port()}, phases={"enabled": False},
                             fit=FIT, workers={"batch": 1, "queue_batches": 1},
                             health={"route_stuck_s": STUCK_S, "worker_stuck_s": STUCK_S})
    service = Service(settings).start()
    pid = service.dispatcher.worker_health()[0]["pid"]
    try:
        time.sleep(1.0)                                     # slow joiner
        os.kill(pid, signal.SIGSTOP)
        run = ProfileRun(lambda name, doc: send(pub, name, doc), seed=14).begin()
        run.events(1, 6, pace=0.01)                         # StartRun fills the queue; frame 1 blocks
        wait_for(lambda: (service.subscriber.route_busy_s() or 0) > STUCK_S, 10, "ingest not blocked")
        t0 = time.monotonic()
        status = httpx.get(f"http://127.0.0.1:{service.api_port}/api/v1/status", timeout=1.0)
        status_s = time.monotonic() - t0
        code, body = health(service)
        assert status.status_code == 200 and status_s < 1.0
        assert status.json()["queues"]["inflight_batches"] >= 1
        assert code == 503 and body["status"] == "stuck"
        assert any(p.startswith("ingest routing thread on one message") for p in body["problems"]), body
        t0 = time.monotonic()
        closing = threading.Thread(target=service.close, daemon=True)      # a hung close fails, not hangs
        closing.start()
        closing.join(30)
        close_s = time.monotonic() - t0
        rec = service.store.get(run.uid)
        print("figures:", {"status_s": round(status_s, 3), "close_s": round(close_s, 1), "problems": body["problems"],
                           "run": [rec.status, rec.reason]})
        assert close_s < 15
        assert rec.status == "abort" and rec.reason == STOPPED_REASON
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        service.close()                                     # nothing left to do after the close above
        pub.close(linger=0)


# ------------------------------------------------------------------------------ item 8
def frame_run(emit, n: int, shape=(64, 64)) -> str:
    """A run of `n` 2D frames with a geometry in its start document: frames go to the worker
    through shared memory (service/frame_slots.py)."""
    from service.sim.frames import poni_dict
    from workers.geometry import Geometry
    g = Geometry(dist=0.1, poni1=0.0, poni2=0.0, detector="Detector", pixel1=172e-6, pixel2=172e-6,
                 shape=shape, wavelength=1e-10)              # beam at a corner: q to 6.9 1/nm
    bundle = compose_run(metadata={"plan_name": "frames", "geometry": poni_dict(g.to_pyfai())})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "image": {"source": "sim", "dtype": "array", "shape": list(shape), "dtype_numpy": "<i4"}})
    emit("start", bundle.start_doc)
    emit("descriptor", desc.descriptor_doc)
    rng = np.random.default_rng(0)
    for seq in range(1, n + 1):
        emit("event", desc.compose_event(data={"image": rng.poisson(50, shape).astype(np.int32)},
                                         timestamps={"image": 0.0}, seq_num=seq))
        time.sleep(0.02)
    return bundle.start_doc["uid"]


def stale_segments() -> dict[int, int]:
    """Slot files in /dev/shm by owner pid, for pids that are gone."""
    out: dict[int, int] = {}
    for name in os.listdir(shm_directory()):
        pid = segment_owner(name)
        if pid is not None and not Path(f"/proc/{pid}").exists():
            out[pid] = out.get(pid, 0) + 1
    return out


def test_killed_serve_leaves_no_worker_and_next_start_cleans_up(rig, free_port):
    """`scatterflow serve` (writing to the rig's Tiled; started with the rig) SIGKILLed mid-run:
    its worker and multiprocessing's resource tracker exit by themselves within seconds. Its
    shared-memory frame files stay; the next service to start on the same directory removes
    exactly the files of dead processes and marks the run the killed one left "running" in
    Tiled interrupted, both counted in /metrics."""
    from tiled.client import from_uri
    pub, config, serve, api = rig.serve.pub, rig.serve.config, rig.serve.process, rig.serve.api
    kids: list[int] = []
    service = None

    def mine() -> list[str]:
        return [n for n in os.listdir(shm_directory()) if segment_owner(n) == serve.pid]
    try:
        wait_for(lambda: httpx.get(f"{api}/health").status_code == 200, 120, "serve did not come up")
        kids = children(serve.pid)                          # the worker and the resource tracker
        time.sleep(1.0)                                     # slow joiner
        uid = frame_run(lambda name, doc: send(pub, name, doc), 10)          # no stop: killed mid-run
        files = wait_for(mine, 30, "no shared-memory frame files")
        tiled = from_uri(rig.tiled.uri, api_key=rig.tiled.api_key)
        wait_for(lambda: tiled["scatterflow"][uid].metadata["status"] == "running", 30, "run not in Tiled")
        shown = wait_for(lambda: (r := httpx.get(f"{api}/runs/{uid}").json())["frames_fitted"] and r, 30, "fits")
        serve.kill()
        serve.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(k) for k in kids), 10, f"children {kids} outlived serve")
        gone_s = time.monotonic() - t0
        stale = stale_segments()
        assert stale.get(serve.pid) == len(mine()) >= len(files) > 0
        settings = load_settings(None, **{**config, "ingest": {"address": f"tcp://127.0.0.1:{free_port()}"},
                                          "api": {"port": free_port()}})
        service = Service(settings).start()
        removed = metric(service, "scatterflow_stale_segments_removed_total")
        interrupted = wait_for(lambda: metric(service, "scatterflow_runs_interrupted_at_start_total"), 30,
                               "run not marked interrupted")
        node = from_uri(rig.tiled.uri, api_key=rig.tiled.api_key)["scatterflow"][uid]
        in_tiled = len(node["frames"].read()) if "frames" in node else 0
        print("figures:", {"children": len(kids), "children_gone_s": round(gone_s, 2), "stale": stale,
                           "removed": removed, "interrupted": interrupted, "fitted_shown_by_rest": shown["frames_fitted"],
                           "profiles_in_tiled": in_tiled})
        assert len(kids) >= 2 and gone_s < 5
        assert removed == sum(stale.values()) and not mine()
        assert not [n for n in os.listdir(shm_directory()) if segment_owner(n) in stale]
        assert interrupted == 1 and node.metadata["status"] == "interrupted"
    finally:
        if serve.poll() is None:
            serve.kill()
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)
        if service is not None:
            service.close()
