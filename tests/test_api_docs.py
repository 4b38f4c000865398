"""The API's documentation over real HTTP (uvicorn): /docs and /redoc load every script,
stylesheet and icon from the app itself (a beamline network has no CDN), also when the app is
mounted under a path prefix; /openapi.json names a response model or a media type for every
route, and real responses validate against their models."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.routing import Mount

from live_app import serve
from service.api import build_app, schemas
from service.metrics import Metrics
from service.publish.state import PEAK_COLUMNS, RunStore
from workers.inversion.quality import fit_verdict
from workers.inversion.refine import InversionResult, inversion_rows
from workers.inversion.spec import SAXS_MODELS

KEY = "docs-test-key"
AUTH = {"X-API-Key": KEY}
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
MEDIA = {"/api/v1/runs/{uid}/frame.png": "image/png", "/api/v1/runs/{uid}/qmap.png": "image/png",
         "/api/v1/events": "text/event-stream", "/metrics": "text/plain"}


class PageAssets(HTMLParser):
    """The URLs a page loads by itself: script src, link href (stylesheet, icon), img src."""

    def __init__(self, html: str):
        super().__init__()
        self.urls: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        url = a.get("src") if tag in ("script", "img") else a.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def inversion_columns(seq, radius, chi2) -> dict[str, np.ndarray]:
    """The rows the workers send for frames `seq` (workers.inversion.refine.inversion_rows of a
    sphere_hs result): `radius` (nm) ± 2 %, reduced `chi2` (its verdict per frame, 300 points)."""
    names = SAXS_MODELS["sphere_hs"].names
    n = len(seq)
    params = torch.tensor([[r, 0.1, 0.15, 200.0, 0.05] for r in radius], dtype=torch.float64)
    chi2 = torch.tensor(chi2, dtype=torch.float64)
    p_value, quality = fit_verdict(chi2, torch.full((n,), 295.0))
    res = InversionResult(names=names, params=params, stderr=0.02 * params, encoder=1.05 * params, chi2_red=chi2,
                          converged=torch.ones(n, dtype=torch.bool), model="sphere_hs",
                          at_bound=torch.zeros(n, len(names), dtype=torch.bool), p_value=p_value, quality=quality)
    return inversion_rows(res, seq_num=np.asarray(seq), time=100.0 + np.asarray(seq, float))


def populated_app(api_key=KEY):
    """The app over a store with a run holding a profile, peak rows, inversion rows and a frame,
    and a status like the service's."""
    store = RunStore()
    store.start_run("u1", {"uid": "u1", "plan_name": "growth"})
    store.add_profiles("u1", [1, 2], [100.0, 101.0], np.linspace(0.1, 4, 50), "q_nm^-1",
                       np.ones((2, 50)), np.full((2, 50), 0.1))
    store.add_peaks("u1", {"seq_num": np.array([2]), "time": np.array([101.0]), "peak": np.array(["a"]),
                           **{c: np.ones(1) for c in PEAK_COLUMNS[3:11]}, "converged": np.ones(1, bool),
                           "change_point": np.zeros(1, bool), "final": np.zeros(1, bool)})
    store.add_inversion("u1", inversion_columns([1, 2, 3], [5.0, 5.5, 6.0], [1.0, 1.5, 9.0]))
    store.set_latest_frame("u1", 2, np.arange(64, dtype=np.float32).reshape(8, 8))
    status = {"version": "0.1.0", "uptime_s": 12.5, "devices": ["cpu"], "workers": 1, "worker_restarts": 0,
              "engine": "local", "worker_pool": [], "queues": {"ingest": 0, "pending_frames": 3},
              "frames_received": 3.0, "frames_fitted": 2.0, "frames_final": 2.0, "frames_failed": 0.0,
              "rejected": 0.0, "runs_active": 1, "tiled_uri": None, "ingest_address": "tcp://127.0.0.1:5578",
              "calibration": None}
    return build_app(store, Metrics(), lambda: status, api_key=api_key, stream_interval_s=0.01, stream_max_s=0.05)


@pytest.mark.parametrize("prefix", ["", "/beamline"])
def test_docs_pages_load_their_assets_from_the_app(prefix):
    app = populated_app()
    with serve(Starlette(routes=[Mount(prefix, app=app)]) if prefix else app) as base, \
            httpx.Client(timeout=10) as client:
        for page, kinds in (("docs", {".js", ".css", ".png"}), ("redoc", {".js", ".png"})):
            url = f"{base}{prefix}/{page}"
            r = client.get(url)                              # public, as /openapi.json: no data
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (url, r.status_code)
            assert "http://" not in r.text and "https://" not in r.text      # no CDN, fonts or validator
            urls = PageAssets(r.text).urls
            assert {Path(urlparse(u).path).suffix for u in urls} == kinds, urls   # scripts, stylesheet, icon
            for u in urls:
                full = urlparse(urljoin(url, u))
                assert full.netloc == urlparse(base).netloc and full.path.startswith(f"{prefix}/static/docs/"), u
                got = client.get(full.geturl())
                assert got.status_code == 200 and len(got.content) > 1000, (u, got.status_code)
                assert CONTENT_TYPES[Path(full.path).suffix] in got.headers["content-type"], (u, got.headers)
            spec_url = re.search(r"url: '([^']+)'|spec-url=\"([^\"]+)\"", r.text).group(1, 2)
            spec = client.get(urljoin(url, next(s for s in spec_url if s)))
            assert spec.status_code == 200 and spec.json()["info"]["title"] == "scatterflow"
        assert client.get(f"{base}{prefix}/api/v1/status").status_code == 401       # the data stay behind the key


def test_openapi_names_a_response_model_or_media_type_for_every_route():
    app = populated_app()
    with serve(app) as base:
        spec = httpx.get(f"{base}/openapi.json", timeout=10).json()
    ops = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
    routes = {(r.path, m.lower()) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
              for m in r.methods}
    assert set(ops) == routes and all(p.startswith(("/api/v1/", "/metrics")) for p, _ in ops)
    models = spec["components"]["schemas"]
    for (path, method), op in ops.items():
        assert op["summary"] and op["description"], (path, method)
        content = op["responses"]["200"]["content"]
        if path in MEDIA:
            assert list(content) == [MEDIA[path]], (path, content)
            continue
        assert list(content) == ["application/json"], (path, content)
        schema = content["application/json"]["schema"]
        refs = [s["$ref"].rsplit("/", 1)[-1] for s in [schema, *schema.get("anyOf", [])] if "$ref" in s]
        assert refs and set(refs) <= set(models), (path, schema)
        if (path, method) not in {("/api/v1/session", "post"), ("/api/v1/session", "delete")}:
            assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorDetail")
    # the routes that had no documentation: units and query parameters named
    frame = ops["/api/v1/runs/{uid}/frame.png", "get"]
    assert {p["name"]: bool(p.get("description")) for p in frame["parameters"] if p["in"] == "query"} == \
        {"size": True, "scale": True}
    assert "pixels" in frame["description"] and "X-Seq-Num" in frame["description"]
    assert "seq_num" in ops["/api/v1/runs/{uid}/latest", "get"]["description"]
    assert {p["name"] for p in ops["/api/v1/events", "get"]["parameters"]} == {"run", "since"}
    assert "latency" in ops["/api/v1/metrics/summary", "get"]["description"]
    inversion = models["InversionTable"]["properties"]["columns"]["description"]
    assert all(c in inversion for c in ("_err", "_at_bound", "p_value", "fit_quality", "warm_start"))


def test_real_responses_validate_against_their_models():
    with serve(populated_app()) as base, httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
        bodies = {path: client.get(path) for path in (
            "/api/v1/runs/u1/latest", "/api/v1/status", "/api/v1/metrics/summary", "/api/v1/runs/u1",
            "/api/v1/runs/u1/inversion", "/api/v1/runs/u1/frame.png", "/metrics")}
        with client.stream("GET", "/api/v1/events") as events:
            events_type = events.headers["content-type"]
    assert all(r.status_code == 200 for r in bodies.values()), {p: r.status_code for p, r in bodies.items()}
    latest = bodies["/api/v1/runs/u1/latest"].json()
    assert set(latest) == set(schemas.LatestProfile.model_fields)
    assert schemas.LatestProfile.model_validate(latest).seq_num == 2
    status = schemas.Status.model_validate(bodies["/api/v1/status"].json())
    assert status.queues == {"ingest": 0, "pending_frames": 3} and not status.model_extra
    metrics = bodies["/api/v1/metrics/summary"].json()
    assert set(metrics) == set(schemas.MetricsSummary.model_fields)
    schemas.MetricsSummary.model_validate(metrics)
    run = schemas.RunDetail.model_validate(bodies["/api/v1/runs/u1"].json())
    assert (run.inversion.frames, run.inversion.good, run.inversion.poor, run.inversion.bad) == (3, 1, 1, 1)
    table = schemas.InversionTable.model_validate(bodies["/api/v1/runs/u1/inversion"].json())
    assert table.columns["fit_quality"] == ["good", "poor", "bad"] and table.next_since == 3
    assert bodies["/api/v1/runs/u1/frame.png"].headers["content-type"] == "image/png"
    assert bodies["/metrics"].headers["content-type"].startswith("text/plain")
    assert events_type.startswith("text/event-stream")
