"""The running service: ingest -> dispatch -> workers -> publish, plus the REST API.

`Service(settings).start()` wires the parts built from one `Settings` object; `close()` stops
them in reverse order, within `health.close_timeout_s` for ingest and the workers even when
one of them hangs. `health()` is what ``/api/v1/health`` reports. `scatterflow serve` and
`scatterflow demo` both use it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path


from . import __version__
from .api.schemas import Health, WorkerHealth
from .config import Settings, secret
from .dispatch import Dispatcher
from .frame_slots import remove_stale_segments, shm_directory
from .ingest import DocumentRouter, ZmqSubscriber
from .memory import reuse_freed_buffers
from .metrics import Metrics, total
from .publish.hub import PublishHub
from .publish.state import RunStore
from .run_spec import RunSpecBuilder

log = logging.getLogger(__name__)
STOPPED_REASON = "service stopped before the run ended"
WORKERS_CLOSE_S = 4.0       # of the close budget, kept for Dispatcher.close (Shutdown 1 s, join, kill)
INGEST_CLOSE_S = 5.0        # of the close budget, at most for ingest to stop


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self._seen = {"tiled_requests": 0, "tiled_failures": 0, "tiled_spooled": 0, "tiled_interrupted": 0, "catalog": 0}   # writer counts already in the counters
        self._first_seen: dict[tuple[str, int], float] = {}           # (dead|starting, pid) -> time.monotonic()
        self._deadline = float("inf")                                 # of close(), time.monotonic()
        self.store = RunStore(max_runs=settings.api.max_runs, held_rows=settings.api.held_rows)
        self.started = time.time()
        self._closers: list = []
        self.tiled_uri: str | None = None
        self.tiled_api_key: str | None = None
        self.api_port: int | None = None
        self._stop = threading.Event()
        self.calibrated_geometry = None        # from the last calibrant run; used for the runs after it
        self.calibration_info: dict | None = None

    def _start_catalog_writer(self):
        """The writer of the analysis runs as BlueskyRuns into the archive Tiled (its closer runs
        after the results publisher's, which stops the open runs); None when Tiled does not answer."""
        from .publish.catalog_writer import CatalogWriter
        from .publish.tiled_server import connect
        try:
            writer = CatalogWriter(connect(self.tiled_uri, self.tiled_api_key))
        except Exception as exc:
            log.error("Tiled at %s: analysis runs will not be written as BlueskyRuns (%s)", self.tiled_uri, exc)
            return None
        self.catalog_writer = writer
        self._closers.append(lambda: writer.close(max(1.0, self._time_left())))
        return writer

    def _recovery(self):
        """Events lost on the 0MQ link fetched from the catalogue (service/recovery.py), when one is configured."""
        c = self.settings.catalog
        if not (c.uri and c.recover):
            return None
        from .recovery import CatalogRecovery
        log.info("ingest: events lost upstream are fetched from the catalogue %s", c.uri)
        return CatalogRecovery(c.uri, secret(c.api_key), c.recover_wait_s, c.recover_wait_at_stop_s)

    tiled_key_file: Path | None = None      # where the embedded Tiled's generated key is

    def spec_for_run(self, start: dict):
        """The workers.pipeline.RunSpec of the analysis of ``start`` (service/run_spec.py); the
        last calibrant run's geometry serves runs that name none of their own."""
        return self.specs.build(start, calibrated=self.calibrated_geometry)

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Service":
        s = self.settings
        reuse_freed_buffers()                # frames must not cost page faults (service/memory.py)
        self._remove_stale_segments()
        self.specs = RunSpecBuilder(s)       # a bad phases or inversion checkpoint fails here, not per run
        tiled = self._start_tiled()
        results = None
        catalog = self._start_catalog_writer() if tiled is not None and s.tiled.bluesky_runs else None
        if s.results.address or catalog is not None:
            from .publish.results import ResultsPublisher
            results = ResultsPublisher(s.results.address, prefix=s.results.prefix.encode(),
                                       also=catalog.put if catalog is not None else None)
            self._closers.append(results.close)
        self.hub = PublishHub(self.store, self.metrics, tiled=tiled, results=results,
                              config=s.model_dump(mode="json", exclude={"tiled": {"api_key"}, "api": {"api_key"},
                                                                         "catalog": {"api_key"}}),
                              on_calibration=self.calibrated)
        self.dispatcher = Dispatcher(s, self.metrics, self.hub, self.spec_for_run)
        self.dispatcher.start()
        # at close, reversed: open runs flushed and stopped, workers stopped, any run left marked interrupted
        self._closers.append(lambda: self.hub.interrupt_open_runs(STOPPED_REASON))
        self._closers.append(lambda: self.dispatcher.close(self._time_left()))
        self._closers.append(self._stop_open_runs)
        self.router = DocumentRouter(self.dispatcher, self.metrics, s.ingest, max_detectors=s.limits.detectors,
                                     recovery=self._recovery())
        self.subscriber = ZmqSubscriber(s.ingest, self.router, self.metrics)
        self.subscriber.start()
        self._closers.append(self._stop_ingest)
        self._start_api()
        t = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        t.start()
        return self

    def calibrated(self, uid: str, info: dict) -> None:
        """A calibrant run was calibrated (worker): later runs use this geometry; keep a PONI file."""
        geometry = info["geometry"]
        self.calibrated_geometry = geometry
        path = Path(self.settings.tiled.directory) / f"calibration-{uid[:8]}.poni"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            geometry.to_poni(path)
        except OSError as exc:
            log.error("could not write %s: %s", path, exc)
        self.calibration_info = {"run": uid, "poni_file": str(path), "dist": geometry.dist, "poni1": geometry.poni1,
                                 "poni2": geometry.poni2, "rot1": geometry.rot1, "rot2": geometry.rot2,
                                 **{k: v for k, v in info.items() if k != "geometry"}}
        log.info("calibrant run %s: new geometry dist %.6f m, poni1 %.6f m, poni2 %.6f m (rms %.4f deg, %d rings); "
                 "used for the next runs", uid[:8], geometry.dist, geometry.poni1, geometry.poni2,
                 info.get("rms_residual_deg", float("nan")), info.get("rings_used", 0))

    def _start_tiled(self):
        s = self.settings.tiled
        if not s.enabled:
            self.tiled = None
            return None
        try:
            from .publish.tiled_server import EmbeddedTiled
            from .publish.tiled import TiledPublisher
        except ImportError as exc:
            log.warning("Tiled publishing unavailable: %s", exc)
            return None
        if s.uri is None:
            server = EmbeddedTiled(directory=s.directory, api_key=secret(s.api_key), port=s.port)
            self._closers.append(server.close)
            self.tiled_uri, self.tiled_api_key = server.uri, server.api_key
            if s.api_key is None:
                self.tiled_key_file = write_key_file(Path(s.directory) / "api_key", server.api_key)
            log.info("embedded Tiled at %s (data in %s; API key %s)", server.uri, s.directory,
                     f"in {self.tiled_key_file}" if self.tiled_key_file else "tiled.api_key")
        else:
            self.tiled_uri, self.tiled_api_key = s.uri, secret(s.api_key)
        publisher = TiledPublisher(self.tiled_uri, api_key=self.tiled_api_key,
                                   spool_dir=Path(s.directory) / "spool",
                                   flush_rows=s.flush_rows, flush_seconds=s.flush_seconds)
        self._closers.append(publisher.close)
        self.tiled = publisher
        return publisher

    def _start_api(self) -> None:
        import uvicorn
        from .api import build_app
        a = self.settings.api
        archive = None
        if self.tiled_uri is not None:          # runs and rows the store no longer holds, read back from Tiled
            from .publish.archive_reader import ArchiveReader
            archive = ArchiveReader(self.tiled_uri, self.tiled_api_key, cache_rows=a.archive_cache_rows)
        app = build_app(self.store, self.metrics, self.status, health=self.health, api_key=a.api_key,
                        archive=archive)
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                                                     timeout_graceful_shutdown=2))
        t = threading.Thread(target=self._uvicorn.run, name="api", daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.05)
        if not self._uvicorn.started:
            raise RuntimeError(f"REST API could not start on {a.host}:{a.port}")
        self.api_port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        self._closers.append(self._stop_api)
        log.info("REST API on http://%s:%d/api/v1 (dashboard at /)", a.host, self.api_port)

    def _remove_stale_segments(self) -> None:
        """Shared-memory frame files left by scatterflow processes that were killed: removed,
        counted (scatterflow_stale_segments_removed) and logged per dead process."""
        removed = remove_stale_segments()
        for pid, n in sorted(removed.items()):
            log.warning("removed %d shared-memory frame file(s) of dead scatterflow process %d from %s",
                        n, pid, shm_directory())
        self.metrics.stale_segments_removed.inc(sum(removed.values()))

    def _stop_ingest(self) -> None:
        """Stop ingest (ZmqSubscriber.stop: routes what is queued, file reads finish) for at most
        INGEST_CLOSE_S: a routing thread blocked on a worker that stopped reading is only woken by
        Dispatcher.close, after this, so waiting longer would not help."""
        stopper = threading.Thread(target=self.subscriber.stop, name="close-ingest", daemon=True)
        stopper.start()
        stopper.join(INGEST_CLOSE_S)
        if stopper.is_alive():
            log.warning("ingest did not stop within %.0f s (%s); going on", INGEST_CLOSE_S,
                        "; ".join(self.health().problems) or "busy")

    def _time_left(self, reserve: float = 0.0) -> float:
        """Seconds of the close budget left, less `reserve` (at least 0.1)."""
        return max(0.1, self._deadline - reserve - time.monotonic())

    def _stop_open_runs(self) -> None:
        """Runs without their stop document when the service stops (ingest closed already):
        stopped through the workers, so their windows' final fits are published, with
        exit_status "abort" and STOPPED_REASON. Waits for every open run until the close budget
        less WORKERS_CLOSE_S is spent. The stops are sent from a helper thread: sending waits on
        the dispatcher, which a worker that stopped reading blocks until Dispatcher.close wakes it."""
        def send() -> None:
            for uid, run in list(self.router.runs.items()):
                for key in run.keys:                        # one analysis per detector
                    self.dispatcher.stop_run(key, {"run_start": uid, "exit_status": "abort",
                                                   "reason": STOPPED_REASON, "time": time.time(), "uid": "",
                                                   "num_events": {}})
        sender = threading.Thread(target=send, name="close-open-runs", daemon=True)
        sender.start()
        sender.join(self._time_left(reserve=WORKERS_CLOSE_S))
        while self.hub.open_runs() and self._time_left(reserve=WORKERS_CLOSE_S) > 0.1:
            time.sleep(0.05)
        left = self.hub.open_runs()
        if left:
            problems = self.health().problems
            log.warning("%d run(s) did not end in time (%s); closed as interrupted",
                        len(left), "; ".join(problems) or "workers busy")

    def _stop_api(self) -> None:
        self._uvicorn.should_exit = True

    def _housekeeping(self) -> None:
        while not self._stop.wait(1.0):
            self._update_metrics()                      # first: expire may wait on the dispatcher
            self.router.expire(self.settings.run_timeout_s)

    def _update_metrics(self) -> None:
        """Gauges of the queues, and the Tiled writer's own counts into the service's metrics."""
        for name, depth in self.dispatcher.queue_depths().items():
            self.metrics.queue_depth.labels(name).set(depth)
        writer = getattr(self, "catalog_writer", None)
        if writer is not None:                  # runs left out of, and documents dropped before, the BlueskyRuns
            lost = writer.failed + writer.dropped
            self.metrics.publish_errors.labels("catalog").inc(lost - self._seen["catalog"])
            self._seen["catalog"] = lost
        tiled = getattr(self, "tiled", None)
        if tiled is None:
            return
        for key, now, counter in (("tiled_requests", tiled.requests, self.metrics.tiled_requests),
                                  ("tiled_failures", tiled.failures, self.metrics.tiled_failures),
                                  ("tiled_spooled", tiled.spooled, self.metrics.tiled_spooled),
                                  ("tiled_interrupted", tiled.interrupted, self.metrics.runs_interrupted_at_start)):
            counter.inc(now - self._seen[key])
            self._seen[key] = now

    def health(self) -> Health:
        """What /api/v1/health reports: "stuck" when the ingest routing thread has been on one
        message longer than `health.route_stuck_s`, a worker has an unanswered batch older than
        `health.worker_stuck_s`, or a dead worker was not replaced within `health.restart_s`;
        else "degraded" while a worker restarts or Tiled writes wait in the spool; else "ok".
        Reads counters only, never waits on a lock."""
        lim, now = self.settings.health, time.monotonic()
        stuck: list[str] = []
        degraded: list[str] = []
        busy = self.subscriber.route_busy_s() if hasattr(self, "subscriber") else None
        if busy is not None and busy > lim.route_stuck_s:
            stuck.append(f"ingest routing thread on one message for {busy:.1f} s (limit {lim.route_stuck_s:g} s)")
        workers = [WorkerHealth(**w) for w in self.dispatcher.worker_health()] if hasattr(self, "dispatcher") else []
        current = set()
        for w in workers:
            name = f"worker {w.index} (pid {w.pid})"
            if not w.alive or not w.ready:
                state = "dead" if not w.alive else "starting"
                current.add((state, w.pid))
                since = now - self._first_seen.setdefault((state, w.pid), now)
                limit = lim.restart_s if state == "dead" else lim.worker_stuck_s
                if since > limit:
                    stuck.append(f"{name} {'dead and not restarted' if state == 'dead' else 'not ready'} "
                                 f"for {since:.1f} s (limit {limit:g} s)")
                else:
                    degraded.append(f"{name} {'died; restarting' if state == 'dead' else 'starting'}")
            elif w.oldest_inflight_s is not None and w.oldest_inflight_s > lim.worker_stuck_s:
                stuck.append(f"{name} has not answered a batch for {w.oldest_inflight_s:.1f} s "
                             f"(limit {lim.worker_stuck_s:g} s)")
        for key in set(self._first_seen) - current:          # recovered: forget
            self._first_seen.pop(key, None)
        tiled = getattr(self, "tiled", None)
        spool = tiled.spool_pending if tiled is not None else None
        if spool:
            degraded.append(f"{spool} Tiled write(s) waiting in the spool (Tiled unreachable, or draining)")
        status = "stuck" if stuck else "degraded" if degraded else "ok"
        return Health(status=status, uptime_s=time.time() - self.started, problems=stuck + degraded,
                      routing_busy_s=busy, workers=workers, tiled_spool_pending=spool)

    def status(self) -> dict:
        m = self.metrics
        return {"version": __version__, "uptime_s": time.time() - self.started,
                "devices": self.dispatcher.devices, "workers": len(self.dispatcher.devices),
                "worker_restarts": self.dispatcher.restarts, "engine": self.dispatcher.engine.name,
                "worker_pool": [{k: w[k] for k in ("index", "node", "device", "alive", "ready", "runs", "frames", "fps")}
                                for w in self.dispatcher.worker_health()],
                "queues": {"ingest": self.subscriber.queue.qsize(), **self.dispatcher.queue_depths()},
                "frames_received": total(m.frames_in), "frames_fitted": total(m.frames_fitted),
                "frames_final": total(m.frames_final), "frames_failed": total(m.frames_failed),
                "rejected": total(m.rejected), "runs_active": len(self.router.runs),
                "tiled_uri": self.tiled_uri, "ingest_address": self.settings.ingest.address,
                "calibration": self.calibration_info}

    def close(self) -> None:
        """Stop everything, in reverse order of start: the API, ingest, the open runs (final
        fits), the workers within `health.close_timeout_s` in all, then the publishers."""
        self._stop.set()
        self._deadline = time.monotonic() + self.settings.health.close_timeout_s
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                log.exception("error while closing")
        self._closers.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def write_key_file(path: Path, key: str) -> Path:
    """`key` into `path`, readable by its owner only (created so: never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path
