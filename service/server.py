"""The running service: ingest -> dispatch -> workers -> publish, plus the REST API.

`Service(settings).start()` wires the parts built from one `Settings` object; `close()` stops
them in reverse order. `scatterflow serve` and `scatterflow demo` both use it.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path


from . import __version__
from .config import Settings, secret
from .dispatch import Dispatcher
from .ingest import DocumentRouter, ZmqSubscriber
from .memory import reuse_freed_buffers
from .metrics import Metrics
from .publish.hub import PublishHub
from .publish.state import RunStore
from .run_spec import RunSpecBuilder

log = logging.getLogger(__name__)
STOPPED_REASON = "service stopped before the run ended"


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.store = RunStore()
        self.started = time.time()
        self._closers: list = []
        self.tiled_uri: str | None = None
        self.tiled_api_key: str | None = None
        self.api_port: int | None = None
        self._stop = threading.Event()
        self.calibrated_geometry = None        # from the last calibrant run; used for the runs after it
        self.calibration_info: dict | None = None

    def spec_for_run(self, start: dict):
        """The workers.pipeline.RunSpec of the analysis of ``start`` (service/run_spec.py); the
        last calibrant run's geometry serves runs that name none of their own."""
        return self.specs.build(start, calibrated=self.calibrated_geometry)

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Service":
        s = self.settings
        reuse_freed_buffers()                # frames must not cost page faults (service/memory.py)
        self.specs = RunSpecBuilder(s)       # a bad phases or inversion checkpoint fails here, not per run
        tiled = self._start_tiled()
        results = None
        if s.results.address:
            from .publish.results import ResultsPublisher
            results = ResultsPublisher(s.results.address, prefix=s.results.prefix.encode())
            self._closers.append(results.close)
        self.hub = PublishHub(self.store, self.metrics, tiled=tiled, results=results,
                              config=s.model_dump(mode="json", exclude={"tiled": {"api_key"}, "api": {"api_key"}}),
                              on_calibration=self.calibrated)
        self.dispatcher = Dispatcher(s, self.metrics, self.hub, self.spec_for_run)
        self.dispatcher.start()
        # at close, reversed: open runs flushed and stopped, workers stopped, any run left marked interrupted
        self._closers.append(lambda: self.hub.interrupt_open_runs(STOPPED_REASON))
        self._closers.append(self.dispatcher.close)
        self._closers.append(self._stop_open_runs)
        self.router = DocumentRouter(self.dispatcher, self.metrics, s.ingest)
        self.subscriber = ZmqSubscriber(s.ingest, self.router, self.metrics)
        self.subscriber.start()
        self._closers.append(self.subscriber.stop)
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
            server = EmbeddedTiled(directory=s.directory, api_key=secret(s.api_key))
            self._closers.append(server.close)
            self.tiled_uri, self.tiled_api_key = server.uri, server.api_key
            log.info("embedded Tiled at %s (data in %s)", server.uri, s.directory)
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
        app = build_app(self.store, self.metrics, self.status, api_key=a.api_key)
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

    def _stop_open_runs(self, timeout: float = 10.0) -> None:
        """Runs without their stop document when the service stops (ingest closed already):
        stopped through the workers, so their windows' final fits are published, with
        exit_status "abort" and STOPPED_REASON; waits up to `timeout` s for every open run."""
        for uid, run in list(self.router.runs.items()):
            for key in run.keys:                            # one analysis per detector
                self.dispatcher.stop_run(key, {"run_start": uid, "exit_status": "abort", "reason": STOPPED_REASON,
                                               "time": time.time(), "uid": "", "num_events": {}})
        deadline = time.monotonic() + timeout
        while self.hub.open_runs() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _stop_api(self) -> None:
        self._uvicorn.should_exit = True

    def _housekeeping(self) -> None:
        while not self._stop.wait(1.0):
            self.router.expire(self.settings.run_timeout_s)
            for name, depth in self.dispatcher.queue_depths().items():
                self.metrics.queue_depth.labels(name).set(depth)
            if getattr(self, "tiled", None) is not None:
                self.metrics.tiled_requests.set(getattr(self.tiled, "requests", 0))
                self.metrics.tiled_failures.set(getattr(self.tiled, "failures", 0))

    def status(self) -> dict:
        m = self.metrics
        def total(counter) -> float:
            return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))
        return {"version": __version__, "uptime_s": time.time() - self.started,
                "devices": self.dispatcher.devices, "workers": len(self.dispatcher.devices),
                "worker_restarts": self.dispatcher.restarts,
                "queues": {"ingest": self.subscriber.queue.qsize(), **self.dispatcher.queue_depths()},
                "frames_received": total(m.frames_in), "frames_fitted": total(m.frames_fitted),
                "frames_final": total(m.frames_final), "frames_failed": total(m.frames_failed),
                "rejected": total(m.rejected), "runs_active": len(self.router.runs),
                "tiled_uri": self.tiled_uri, "ingest_address": self.settings.ingest.address,
                "calibration": self.calibration_info}

    def close(self) -> None:
        self._stop.set()
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
