"""FastAPI app: read-only REST under /api/v1, Prometheus at /metrics, the live dashboard at /.

`build_app` receives its collaborators (run store, metrics, a status callable), as tiled's
`build_app` does, so tests inject them.

Every route is read-only (GET; other methods answer 405). When an API key is set, every route
but ``/static`` (the dashboard's code) needs it, given as header ``X-API-Key: KEY``,
``Authorization: Bearer KEY`` (what Prometheus' scrape ``authorization`` sends) or query
``api_key=KEY`` (the dashboard passes the key of its own URL on, as EventSource cannot set
headers); else 401. ``/metrics`` is behind the key too: its counters reveal run activity, and
Prometheus sends bearer tokens natively. So is ``/api/v1/health``: the container healthchecks
read the key from their secret file, and nothing answers an unauthenticated caller.

- ``/api/v1/health``, ``/api/v1/status``, ``/api/v1/runs``, ``/api/v1/runs/{uid}``,
  ``/api/v1/runs/{uid}/peaks?since=&final=``, ``/api/v1/runs/{uid}/profiles``, ``/metrics``:
  the REST contract (DESIGN.md).
- ``/api/v1/runs/{uid}/latest``: the latest reduced profile and the peak rows of that frame.
- ``/api/v1/runs/{uid}/frame.png?size=&scale=``: the latest raw 2D frame, block-averaged to at
  most ``size`` pixels a side, log or linear colour scale, masked pixels (negative: gaps) grey.
- ``/api/v1/runs/{uid}/qmap``: the latest (q_xy, q_z) map of a grazing-incidence run
  (service/modalities.py): axes ``q_xy``, ``q_z`` (1/nm), ``intensity`` rows along q_z, NaN
  (missing wedge, no pixel) as null; ``/api/v1/runs/{uid}/qmap.png?size=&scale=`` the same drawn.
- ``/api/v1/runs/{uid}/extras``: latest extra profiles (in_plane, vertical_cut) and per-frame
  scalar series (hermans_orientation) of the run's modality.
- ``/api/v1/metrics/summary``: the Prometheus metrics as JSON (latency quantiles, drops, losses).
- ``/api/v1/events?run=latest|UID&since=N``: server-sent events for the dashboard (see `events`).
- ``/`` the dashboard page, ``/static/...`` its files (public: code and the vendored uPlot).
"""
from __future__ import annotations

import asyncio
import hmac
import io
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from .config import secret as plain_secret
from .metrics import Metrics
from .publish.state import RunStore

STATIC_DIR = Path(__file__).parent / "static"


def build_app(store: RunStore, metrics: Metrics, status: Callable[[], dict], *,
              api_key: str | SecretStr | None = None, stream_interval_s: float = 0.5,
              stream_max_s: float = 20.0) -> FastAPI:
    """The service's web app.

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
                  description="Live reduction and peak fitting of operando X-ray scattering runs.")
    started = time.time()

    secret = plain_secret(api_key)

    def check_key(request: Request) -> None:
        if secret is None:
            return
        if not hmac.compare_digest(_given_key(request).encode(), secret.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key",
                                headers={"WWW-Authenticate": "Bearer"})

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

    @app.get("/api/v1/runs/{uid}/phases", dependencies=deps)
    def phases(uid: str, since: int = Query(0, ge=0, description="row index to start from"),
               final: bool | None = Query(None, description="only final (true) or provisional (false) rows")) -> dict:
        """Phase label, probability and crystallinity index per frame (columnar, like peaks), and
        the confirmed transitions: {from, to, seq_num, time, time_sigma, frame_sigma, change_point}."""
        run_or_404(uid)
        cols, next_since, transitions = store.phases_since(uid, since, final)
        return {"columns": cols, "next_since": next_since, "transitions": transitions}

    @app.get("/api/v1/runs/{uid}/inversion", dependencies=deps)
    def inversion(uid: str, since: int = Query(0, ge=0, description="row index to start from")) -> dict:
        """Structural parameters per frame (inversion.enabled): radius (nm), pd, volfraction, i0,
        background, each with _err (LM standard error) and _encoder (the encoder's value), chi2."""
        run_or_404(uid)
        cols, next_since = store.inversion_since(uid, since)
        return {"columns": cols, "next_since": next_since}

    @app.get("/api/v1/runs/{uid}/profiles", dependencies=deps)
    def profiles(uid: str, since_seq: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=5000)) -> dict:
        r = run_or_404(uid)
        items = [p for p in list(r.profiles) if p[0] >= since_seq][:limit]
        return {"unit": r.unit, "radial": [] if r.radial is None else np.asarray(r.radial).tolist(),
                "seq_num": [p[0] for p in items], "time": [p[1] for p in items],
                "intensity": [np.asarray(p[2]).tolist() for p in items],
                "sigma": [np.asarray(p[3]).tolist() for p in items]}

    @app.get("/api/v1/runs/{uid}/latest", dependencies=deps)
    def latest(uid: str) -> Response:
        """The latest profile (radial, intensity, sigma; NaN as null) and that frame's peak rows."""
        run_or_404(uid)
        return _json_response(latest_profile(store, uid))

    @app.get("/api/v1/runs/{uid}/frame.png", dependencies=deps)
    def frame_png(uid: str, size: int = Query(320, ge=16, le=2048, description="longest side, pixels"),
                  scale: str = Query("log", pattern="^(log|linear)$")) -> Response:
        run_or_404(uid)
        got = store.latest_frame(uid)
        if got is None:
            raise HTTPException(status_code=404, detail=f"run {uid!r} has no frame yet")
        seq, frame = got
        png = render_frame_png(frame, size=size, log=scale == "log")
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "no-store", "X-Seq-Num": str(seq)})

    def qmap_or_404(uid: str):
        run_or_404(uid)
        got = store.latest_qmap(uid)
        if got is None:
            raise HTTPException(status_code=404, detail=f"run {uid!r} has no q-map (yet)")
        return got

    @app.get("/api/v1/runs/{uid}/qmap", dependencies=deps)
    def qmap(uid: str) -> Response:
        """The latest q-map: {uid, seq_num, unit, dims ["q_z", "q_xy"], q_xy, q_z, intensity (Nz x Nxy)}."""
        seq, q_xy, q_z, image = qmap_or_404(uid)
        return _json_response({"uid": uid, "seq_num": seq, "unit": "1/nm", "dims": ["q_z", "q_xy"],
                               "q_xy": q_xy, "q_z": q_z, "intensity": image})

    @app.get("/api/v1/runs/{uid}/qmap.png", dependencies=deps)
    def qmap_png(uid: str, size: int = Query(480, ge=100, le=2048, description="width, pixels"),
                 scale: str = Query("log", pattern="^(log|linear)$")) -> Response:
        seq, q_xy, q_z, image = qmap_or_404(uid)
        png = render_qmap_png(q_xy, q_z, image, size=size, log=scale == "log")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store", "X-Seq-Num": str(seq)})

    @app.get("/api/v1/runs/{uid}/extras", dependencies=deps)
    def extras(uid: str) -> Response:
        """{"profiles": {name: latest {seq_num, radial, unit, intensity, sigma}}, "scalars":
        {name: {seq_num: [...], value: [...]}}, "qmap": {seq_num} or null}; NaN as null."""
        run_or_404(uid)
        return _json_response(store.extras(uid))

    @app.get("/api/v1/metrics/summary", dependencies=deps)
    def metrics_json() -> dict:
        return metrics_summary(metrics)

    @app.get("/api/v1/events", dependencies=deps)
    async def events(request: Request,
                     run: str = Query("latest", description="a run uid, or 'latest' to follow the newest run"),
                     since: int = Query(0, ge=0, description="peak row index to resume from")) -> StreamingResponse:
        """Server-sent events for the dashboard, sent when something changed:

        - ``runs``: ``{"runs": [summary, ...]}`` (as /api/v1/runs)
        - ``run``: ``{"uid", "reset", "summary", "start"}`` when the followed run changes;
          ``reset`` false when resuming the same run
        - ``peaks``: ``{"uid", "columns", "next_since"}``, new rows as /runs/{uid}/peaks;
          its event id ``"<uid> <next_since>"`` is where a reconnecting browser resumes
        - ``profile``: the latest profile, as /runs/{uid}/latest
        - ``frame``: ``{"uid", "seq_num"}`` when a newer 2D frame can be fetched as PNG
        - ``qmap``: ``{"uid", "seq_num"}`` when a newer q-map (grazing runs) can be fetched as PNG
        - ``status``: ``{"status": /api/v1/status, "metrics": /api/v1/metrics/summary, "time"}``, about 1/s

        Non-finite numbers are sent as null. The stream ends after ``stream_max_s``; the
        browser's EventSource reconnects by itself (``retry: 1000``).
        """
        resume_uid, resume_since = None, since
        last_id = request.headers.get("last-event-id", "")
        if " " in last_id:
            resume_uid, _, n = last_id.partition(" ")
            resume_since = int(n) if n.isdigit() else 0
        elif run != "latest":
            resume_uid = run
        return StreamingResponse(
            _event_stream(store, metrics, status, run, resume_uid, resume_since,
                          stream_interval_s, stream_max_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/metrics", dependencies=deps)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", dependencies=deps)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _given_key(request: Request) -> str:
    """The API key a request carries: X-API-Key, Authorization: Bearer, or query api_key ("" if none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    return request.headers.get("x-api-key") or bearer or request.query_params.get("api_key") or ""


# --- helpers shared by routes and the event stream ---------------------------------------

def latest_profile(store: RunStore, uid: str) -> dict | None:
    """The latest reduced profile of run `uid` and the peak rows of that frame, or None."""
    run = store.get(uid)
    if run is None or not run.profiles:
        return None
    seq, t, intensity, sigma = run.profiles[-1]
    radial = [] if run.radial is None else np.asarray(run.radial)
    n = len(run.peaks["seq_num"])              # that frame's rows are among the newest
    cols, _ = store.peaks_since(uid, max(0, n - 2000))
    idx = [i for i, s in enumerate(cols["seq_num"]) if s == seq]
    rows = {c: [v[i] for i in idx] for c, v in cols.items()}
    return {"uid": uid, "seq_num": seq, "time": t, "unit": run.unit,
            "radial": _finite_list(radial), "intensity": _finite_list(intensity),
            "sigma": _finite_list(sigma), "peaks": rows}


def render_frame_png(frame: np.ndarray, *, size: int = 320, log: bool = True) -> bytes:
    """A detector frame (rows, cols) as a PNG no larger than `size` pixels a side.

    Pixels < 0 or non-finite (module gaps, dummies) are masked; blocks of f x f pixels,
    f = ceil(max(rows, cols) / size), are averaged over their valid pixels. Colour: viridis
    over the 1st-99.8th percentile of log10(1 + counts) (or counts), masked blocks grey.
    """
    import matplotlib
    from matplotlib.image import imsave

    a = np.asarray(frame, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise HTTPException(status_code=422, detail=f"frame of shape {a.shape} is not a 2D image")
    valid = np.isfinite(a) & (a >= 0)
    f = max(1, math.ceil(max(a.shape) / size))
    if f > 1:
        h, w = (-(-a.shape[0] // f)) * f, (-(-a.shape[1] // f)) * f
        pa = np.zeros((h, w))
        pv = np.zeros((h, w))
        pa[:a.shape[0], :a.shape[1]] = np.where(valid, a, 0.0)
        pv[:a.shape[0], :a.shape[1]] = valid
        s = pa.reshape(h // f, f, w // f, f).sum(axis=(1, 3))
        n = pv.reshape(h // f, f, w // f, f).sum(axis=(1, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            a = s / n
        valid = n > 0
    img = np.log10(1.0 + np.where(valid, a, 0.0)) if log else np.where(valid, a, 0.0)
    if valid.any():
        lo, hi = np.percentile(img[valid], [1.0, 99.8])
    else:
        lo, hi = 0.0, 1.0
    hi = hi if hi > lo else lo + 1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#555555")
    buf = io.BytesIO()
    imsave(buf, np.ma.masked_array(img, ~valid), cmap=cmap, vmin=lo, vmax=hi, format="png")
    return buf.getvalue()


def render_qmap_png(q_xy, q_z, image, *, size: int = 480, log: bool = True) -> bytes:
    """A (q_xy, q_z) map (Nz, Nxy) as a PNG ``size`` pixels wide with axes in 1/nm: viridis over
    the 1st-99.8th percentile of log10(I) (I > 0) or I; NaN (missing wedge, no pixel) grey."""
    import matplotlib
    from matplotlib.figure import Figure

    a = np.asarray(image, dtype=np.float64)
    x, z = np.asarray(q_xy, np.float64), np.asarray(q_z, np.float64)
    if a.ndim != 2 or a.shape != (z.size, x.size) or min(a.shape) < 2:
        raise HTTPException(status_code=422, detail=f"q-map of shape {a.shape} does not match its axes")
    with np.errstate(divide="ignore", invalid="ignore"):
        img = np.where(a > 0, np.log10(a), np.nan) if log else a
    valid = np.isfinite(img)
    lo, hi = np.percentile(img[valid], [1.0, 99.8]) if valid.any() else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    dx, dz = (x[-1] - x[0]) / (x.size - 1), (z[-1] - z[0]) / (z.size - 1)
    fig = Figure(figsize=(size / 100, 0.8 * size / 100), dpi=100)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#888888")
    im = ax.imshow(np.ma.masked_invalid(img), origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                   extent=(x[0] - dx / 2, x[-1] + dx / 2, z[0] - dz / 2, z[-1] + dz / 2), interpolation="nearest")
    ax.set_xlabel("q_xy (1/nm)")
    ax.set_ylabel("q_z (1/nm)")
    fig.colorbar(im, ax=ax, label="log10 I" if log else "I")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q·N.

    buckets: (upper bound, cumulative count), ascending, the last one +Inf. None when empty;
    the largest finite bound when the rank falls in the +Inf bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def metrics_summary(metrics: Metrics) -> dict:
    """The service's Prometheus metrics as JSON: counters by label, gauges, and latency
    (count, mean, p50/p95/p99 in s, interpolated within histogram buckets) per stage."""
    def by_label(metric) -> dict:
        out = {}
        for fam in metric.collect():
            for s in fam.samples:
                if fam.type == "counter" and not s.name.endswith("_total"):
                    continue
                key = ",".join(s.labels.values()) or "total"
                out[key] = out.get(key, 0.0) + s.value
        return out

    def total(metric) -> float:
        return float(sum(by_label(metric).values()))

    latency = {}
    for fam in metrics.latency.collect():
        per: dict[str, dict] = {}
        for s in fam.samples:
            stage = s.labels.get("stage", "")
            d = per.setdefault(stage, {"buckets": [], "count": 0.0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                d["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                d["count"] = s.value
            elif s.name.endswith("_sum"):
                d["sum"] = s.value
        for stage, d in per.items():
            b = sorted(d["buckets"])
            latency[stage] = {"count": int(d["count"]),
                              "mean_s": d["sum"] / d["count"] if d["count"] else None,
                              **{f"p{int(q * 100)}_s": _histogram_quantile(b, q) for q in (0.5, 0.95, 0.99)}}
    return {"frames_received": total(metrics.frames_in), "frames_fitted": total(metrics.frames_fitted),
            "frames_final": total(metrics.frames_final), "frames_dropped": total(metrics.frames_dropped),
            "frames_failed": by_label(metrics.frames_failed), "rejected": by_label(metrics.rejected),
            "lost_upstream": by_label(metrics.lost_upstream), "reseeds": total(metrics.reseeds),
            "change_points": total(metrics.change_points), "queue_depth": by_label(metrics.queue_depth),
            "runs_active": total(metrics.runs_active), "tiled_requests": total(metrics.tiled_requests),
            "tiled_failures": total(metrics.tiled_failures), "latency": latency}


def _pick_run(runs: list[dict], wanted: str) -> str | None:
    if wanted != "latest":
        return wanted if any(r["uid"] == wanted for r in runs) else None
    if not runs:
        return None
    return max(runs, key=lambda r: r["created"])["uid"]


async def _event_stream(store: RunStore, metrics: Metrics, status: Callable[[], dict], wanted: str,
                        resume_uid: str | None, resume_since: int, interval: float, max_s: float):
    """The SSE body of /api/v1/events: polls the in-memory store every `interval` s."""
    yield "retry: 1000\n\n"
    deadline = time.monotonic() + max_s
    uid, since = None, 0
    runs_sig = profile_seq = frame_seq = None
    qmap_seq = None
    next_status = 0.0
    while True:
        runs = store.list()
        sig = [(r["uid"], r["status"], r["frames_received"], r["frames_fitted"], r["frames_final"]) for r in runs]
        if sig != runs_sig:
            runs_sig = sig
            yield _sse("runs", {"runs": runs})
        target = _pick_run(runs, wanted)
        if target is not None and target != uid:
            resumed = target == resume_uid
            uid, since = target, (resume_since if resumed else 0)
            profile_seq = frame_seq = qmap_seq = None
            rec = store.get(uid)
            if rec is not None:
                start = {k: rec.start.get(k) for k in ("uid", "time", "plan_name", "scan_id", "sample",
                                                       "modality", "light_schedule_s", "frame_interval")}
                yield _sse("run", {"uid": uid, "reset": not resumed, "summary": rec.summary(),
                                   "start": _jsonable(start)})
        if uid is not None:
            got = store.peaks_since(uid, since)
            if got is not None and got[1] > since:
                cols, since = got
                yield _sse("peaks", {"uid": uid, "columns": {c: _finite_list(v) for c, v in cols.items()},
                                     "next_since": since}, event_id=f"{uid} {since}")
            rec = store.get(uid)
            if rec is not None and rec.profiles and rec.profiles[-1][0] != profile_seq:
                prof = latest_profile(store, uid)
                if prof is not None:
                    profile_seq = prof["seq_num"]
                    yield _sse("profile", prof)
            fr = store.latest_frame(uid)
            if fr is not None and fr[0] != frame_seq:
                frame_seq = fr[0]
                yield _sse("frame", {"uid": uid, "seq_num": frame_seq})
            qm = store.latest_qmap(uid)
            if qm is not None and qm[0] != qmap_seq:
                qmap_seq = qm[0]
                yield _sse("qmap", {"uid": uid, "seq_num": qmap_seq})
        now = time.monotonic()
        if now >= next_status:
            next_status = now + 1.0
            try:
                st = status()
            except Exception as exc:        # live view: report, never break the stream
                st = {"error": repr(exc)}
            yield _sse("status", {"status": st, "metrics": metrics_summary(metrics), "time": time.time()})
        if now >= deadline:
            return
        await asyncio.sleep(interval)


def _sse(event: str, data, event_id: str | None = None) -> str:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head + "data: " + json.dumps(_jsonable(data), allow_nan=False, separators=(",", ":")) + "\n\n"


def _json_response(obj) -> Response:
    return Response(json.dumps(_jsonable(obj), allow_nan=False, separators=(",", ":")),
                     media_type="application/json")


def _finite_list(values) -> list:
    """A list with non-finite floats replaced by None (JSON has no NaN)."""
    out = np.asarray(values).tolist() if isinstance(values, np.ndarray) else list(values)
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in out]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
