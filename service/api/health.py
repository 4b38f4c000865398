"""Health, service status and metrics: ``/api/v1/health``, ``/api/v1/status``,
``/api/v1/metrics/summary`` (JSON) and ``/metrics`` (Prometheus text).

``/api/v1/health`` answers 200 only when the service is healthy, 503 when it is "degraded" or
"stuck" (`service.server.Service.health` decides), so that a container healthcheck or a load
balancer sees the truth; neither it nor ``/api/v1/status`` waits on a lock of the service."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..metrics import Metrics, by_label, histogram_quantile, total
from .dependencies import AUTH_RESPONSES, Context, check_api_key
from .schemas import Health, LatencySummary, MetricsSummary, Status

router = APIRouter(dependencies=[Depends(check_api_key)], responses=AUTH_RESPONSES)


@router.get("/api/v1/health", summary="Service health (200 ok, 503 degraded or stuck)",
            response_model=Health, responses={503: {"model": Health}})
def health(ctx: Context) -> JSONResponse:
    """200 and status "ok", or 503 and status "degraded" or "stuck" with the problems."""
    report = ctx.health() if ctx.health is not None else Health(status="ok", uptime_s=time.time() - ctx.started)
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.status == "ok" else 503)


@router.get("/api/v1/status", summary="Service status: workers, queues, counts",
            response_model=Status, response_model_exclude_unset=True)
def get_status(ctx: Context) -> dict:
    """Version, uptime (s), devices and workers, queue depths, frame counts since the service
    started, active runs, the Tiled and ingest addresses and the last calibration, as the service
    reports them (service/server.py)."""
    return ctx.status()


@router.get("/api/v1/metrics/summary", summary="Metrics as JSON: counters, gauges, latency quantiles",
            response_model=MetricsSummary)
def metrics_json(ctx: Context) -> MetricsSummary:
    """The Prometheus metrics of ``/metrics`` as JSON: counters since the service started (frames
    received, fitted, final, dropped; failed, rejected and lost upstream by reason; re-seeds,
    change points, Tiled requests and failures), gauges (queue depth by queue, active runs), and
    per stage (provisional, final, ...) the latency from a frame's arrival to its result: count,
    mean and p50/p95/p99 in s, interpolated within the histogram's buckets."""
    return metrics_summary(ctx.metrics)


@router.get("/metrics", summary="Metrics for Prometheus (text)", response_class=PlainTextResponse)
def prometheus(ctx: Context) -> Response:
    """The service's metrics in Prometheus' text exposition format (``scatterflow_*``), for a
    scrape with ``authorization: {credentials: KEY}``."""
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def metrics_summary(metrics: Metrics) -> MetricsSummary:
    """The service's Prometheus metrics as JSON: counters by label, gauges, and latency
    (count, mean, p50/p95/p99 in s, interpolated within histogram buckets) per stage."""
    return MetricsSummary(
        frames_received=total(metrics.frames_in), frames_fitted=total(metrics.frames_fitted),
        frames_final=total(metrics.frames_final), frames_dropped=total(metrics.frames_dropped),
        frames_failed=by_label(metrics.frames_failed), rejected=by_label(metrics.rejected),
        lost_upstream=by_label(metrics.lost_upstream), reseeds=total(metrics.reseeds),
        change_points=total(metrics.change_points), queue_depth=by_label(metrics.queue_depth),
        runs_active=total(metrics.runs_active), tiled_requests=total(metrics.tiled_requests),
        tiled_failures=total(metrics.tiled_failures), latency=_latency(metrics))


def _latency(metrics: Metrics) -> dict[str, LatencySummary]:
    """Count, mean and quantiles (s) of the latency histogram, by stage."""
    per: dict[str, dict] = {}
    for fam in metrics.latency.collect():
        for s in fam.samples:
            d = per.setdefault(s.labels.get("stage", ""), {"buckets": [], "count": 0.0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                d["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                d["count"] = s.value
            elif s.name.endswith("_sum"):
                d["sum"] = s.value
    out = {}
    for stage, d in per.items():
        b = sorted(d["buckets"])
        out[stage] = LatencySummary(count=int(d["count"]), mean_s=d["sum"] / d["count"] if d["count"] else None,
                                    p50_s=histogram_quantile(b, 0.5), p95_s=histogram_quantile(b, 0.95),
                                    p99_s=histogram_quantile(b, 0.99))
    return out
