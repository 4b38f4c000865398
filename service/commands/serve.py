"""`scatterflow serve --config FILE`: run the service until interrupted."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the streaming service (ingest, workers, Tiled, REST, metrics)",
                       description="Subscribe to a bluesky 0MQ proxy, reduce and fit every frame, publish results.")
    p.add_argument("--config", "-c", help="YAML configuration file (see README); SCATTERFLOW_* variables override it")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_settings
    from ..server import Service
    settings = load_settings(args.config)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    service = Service(settings).start()
    print(f"scatterflow serving: ingest {settings.ingest.address}, REST http://{settings.api.host}:{service.api_port}/api/v1,"
          f" Tiled {service.tiled_uri}", flush=True)
    try:
        done.wait()
    finally:
        log.info("shutting down")
        service.close()
    return 0
