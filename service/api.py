"""FastAPI app: read-only REST under /api/v1, Prometheus at /metrics, the dashboard at /.

`build_app` receives its collaborators (run store, metrics, a status callable), as tiled's
`build_app` does, so tests inject them.
"""
from __future__ import annotations

import hmac
import time
from typing import Callable

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import Metrics
from .publish.state import RunStore

DASHBOARD = """<!doctype html><html><head><meta charset="utf-8"><title>scatterflow</title>
<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>
</head><body><h1>scatterflow</h1><p>Live status (JSON: <a href="api/v1/status">status</a>,
<a href="api/v1/runs">runs</a>, <a href="metrics">metrics</a>).</p><table id="runs"></table>
<script>
async function tick(){const r=await (await fetch('api/v1/runs')).json();
let h='<tr><th>run</th><th>status</th><th>received</th><th>fitted</th><th>final</th></tr>';
for(const x of r.runs){h+=`<tr><td>${x.uid.slice(0,8)}</td><td>${x.status}</td><td>${x.frames_received}</td><td>${x.frames_fitted}</td><td>${x.frames_final}</td></tr>`}
document.getElementById('runs').innerHTML=h}
tick();setInterval(tick,1000);
</script></body></html>"""


def build_app(store: RunStore, metrics: Metrics, status: Callable[[], dict], *,
              api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="scatterflow", version="0.1.0",
                  description="Live reduction and peak fitting of operando X-ray scattering runs.")
    started = time.time()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or request.query_params.get("api_key") or ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    def run_or_404(uid: str):
        run = store.get(uid)
        if run is None:
            raise HTTPException(status_code=404, detail=f"no run {uid!r}")
        return run

    deps = [Depends(check_key)]

    @app.get("/api/v1/health", dependencies=deps)
    def health() -> dict:
        return {"status": "ok", "uptime_s": time.time() - started}

    @app.get("/api/v1/status", dependencies=deps)
    def get_status() -> dict:
        return status()

    @app.get("/api/v1/runs", dependencies=deps)
    def runs() -> dict:
        return {"runs": store.list()}

    @app.get("/api/v1/runs/{uid}", dependencies=deps)
    def run(uid: str) -> dict:
        r = run_or_404(uid)
        return {**r.summary(), "start": _jsonable(r.start)}

    @app.get("/api/v1/runs/{uid}/peaks", dependencies=deps)
    def peaks(uid: str, since: int = Query(0, ge=0, description="row index to start from"),
              final: bool | None = Query(None, description="only final (true) or provisional (false) rows")) -> dict:
        run_or_404(uid)
        cols, next_since = store.peaks_since(uid, since, final)
        return {"columns": cols, "next_since": next_since}

    @app.get("/api/v1/runs/{uid}/profiles", dependencies=deps)
    def profiles(uid: str, since_seq: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=5000)) -> dict:
        r = run_or_404(uid)
        items = [p for p in list(r.profiles) if p[0] >= since_seq][:limit]
        return {"unit": r.unit, "radial": [] if r.radial is None else np.asarray(r.radial).tolist(),
                "seq_num": [p[0] for p in items], "time": [p[1] for p in items],
                "intensity": [np.asarray(p[2]).tolist() for p in items],
                "sigma": [np.asarray(p[3]).tolist() for p in items]}

    @app.get("/metrics", dependencies=deps)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, dependencies=deps)
    def dashboard() -> str:
        return DASHBOARD

    return app


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
