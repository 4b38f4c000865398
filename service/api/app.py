"""The FastAPI app: read-only REST under /api/v1, Prometheus at /metrics, the live dashboard at /.

`build_app` receives its collaborators (run store, metrics, status and health callables), as tiled's
`build_app` does, so tests inject them; routers reach them through ``app.state.context``
(dependencies.py). The app serves the routes of the resource routers as its own:
`include_router` (FastAPI >= 0.137) would list each router as one node in ``app.routes``.

Every route is read-only (GET; other methods answer 405) but ``/api/v1/session``, which sets
and clears the dashboard's session cookie. When an API key is set, every route but the
dashboard's page and code (``/``, ``/static``), the API docs (``/docs``, ``/redoc``,
``/openapi.json``) and the session's log-in and log-out needs it, given as header
``X-API-Key: KEY``, ``Authorization: Bearer KEY`` (what Prometheus' scrape ``authorization``
sends) or the session cookie (session.py: the browser's EventSource and images cannot set
headers); else 401. Never as a query parameter: URLs land in access logs and browser history.
``/metrics`` is behind the key too: its counters reveal run activity, and Prometheus sends bearer
tokens natively. So is ``/api/v1/health``: the container healthchecks read the key from their
secret file, and nothing answers an unauthenticated caller.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr

from ..config import secret
from ..metrics import Metrics
from ..publish.state import RunStore
from . import dashboard, docs, events, health, images, results, runs, session
from .dependencies import ApiContext
from .schemas import Health

if TYPE_CHECKING:
    from ..publish.archive_reader import ArchiveReader

ROUTERS = (health.router, session.router, runs.router, results.router, images.router, events.router,
           dashboard.router, docs.router)


def build_app(store: RunStore, metrics: Metrics, status: Callable[[], dict], *,
              health: Callable[[], Health] | None = None,
              api_key: str | SecretStr | None = None, stream_interval_s: float = 0.5,
              stream_max_s: float = 20.0, archive: ArchiveReader | None = None) -> FastAPI:
    """The service's web app.

    health : what ``/api/v1/health`` reports (`service.server.Service.health`); None: always "ok".

    archive : reads runs and rows that ``store`` no longer holds back from Tiled
        (`service.publish.archive_reader.ArchiveReader`); None: memory only (rows not held are
        named in the pages' ``missing``).

    api_key : None or empty: no authentication (the configuration allows that on loopback only).

    stream_interval_s : how often (s) an open event stream looks for new results (> 0).
    stream_max_s : an event stream ends after this long (s, > 0) and the browser reconnects
        where it left off (``Last-Event-ID``), so a stopping server never waits on a stream.
    """
    if not stream_interval_s > 0:
        raise ValueError(f"stream_interval_s must be > 0, got {stream_interval_s!r}")
    if not stream_max_s > 0:
        raise ValueError(f"stream_max_s must be > 0, got {stream_max_s!r}")
    app = FastAPI(title="scatterflow", version="0.1.0",
                  description="Live reduction and peak fitting of operando X-ray scattering runs.",
                  docs_url=None, redoc_url=None,          # docs.py serves them, with local assets
                  routes=[route for router in ROUTERS for route in router.routes])
    app.state.context = ApiContext(store=store, metrics=metrics, status=status, health=health,
                                   api_key=secret(api_key),
                                   started=time.time(), stream_interval_s=stream_interval_s,
                                   stream_max_s=stream_max_s, archive=archive)
    app.state.login_throttle = session.LoginThrottle()
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")   # before /static
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    return app
