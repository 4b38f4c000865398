"""Prometheus metrics of the service, in one registry owned by the service process.

Worker processes report back through the dispatcher, so no multiprocess mode is needed.
"""
from __future__ import annotations

import math

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector,
                               generate_latest)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    """All counters of one service instance (a fresh registry each, so tests can run several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.documents = Counter("scatterflow_documents", "Documents accepted, by name", ["name"], registry=r)
        self.rejected = Counter("scatterflow_rejected", "Messages or documents refused at ingest, by reason",
                                ["reason"], registry=r)
        self.frames_in = Counter("scatterflow_frames_received", "Frames accepted for reduction", registry=r)
        self.frames_fitted = Counter("scatterflow_frames_fitted", "Frames reduced and fitted (provisional)", registry=r)
        self.frames_final = Counter("scatterflow_frames_final", "Frames whose final (regularized) fit was published",
                                    registry=r)
        self.frames_failed = Counter("scatterflow_frames_failed", "Accepted frames that failed, by reason",
                                     ["reason"], registry=r)
        self.frames_dropped = Counter("scatterflow_frames_dropped", "Frames dropped by drop-oldest back-pressure",
                                      registry=r)
        self.lost_upstream = Counter("scatterflow_lost_upstream", "Documents missing upstream (seq_num gaps, no start)",
                                     ["kind"], registry=r)
        self.events_recovered = Counter("scatterflow_events_recovered", "Events lost upstream whose frames were "
                                        "fetched from the catalogue (catalog.recover)", registry=r)
        self.events_unrecoverable = Counter("scatterflow_events_unrecoverable", "Events lost upstream the "
                                            "catalogue did not have in time (catalog.recover)", registry=r)
        self.profiles_resampled = Counter("scatterflow_profiles_resampled", "Reduced profiles resampled onto their "
                                          "run's q grid (the run's first profile's)", registry=r)
        self.reseeds = Counter("scatterflow_fit_reseeds", "Fits re-seeded after divergence", registry=r)
        self.change_points = Counter("scatterflow_change_points", "Change points flagged in final fits", registry=r)
        self.phase_frames = Counter("scatterflow_phase_frames", "Frames with a final phase label, by phase",
                                    ["phase"], registry=r)
        self.phase_transitions = Counter("scatterflow_phase_transitions", "Phase transitions confirmed, by phases",
                                         ["from_phase", "to_phase"], registry=r)
        self.queue_depth = Gauge("scatterflow_queue_depth", "Items waiting, by queue", ["queue"], registry=r)
        self.runs_active = Gauge("scatterflow_runs_active", "Runs open", registry=r)
        self.latency = Histogram("scatterflow_latency_seconds",
                                 "Frame arrival to published fit, by stage (provisional, final)",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_frames = Histogram("scatterflow_batch_frames", "Frames per batch reduced by a worker",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.worker_seconds = Counter("scatterflow_worker_seconds", "Worker wall time, by stage "
                                      "(integrate, fit, phases, inversion, snapshots)", ["stage"], registry=r)
        self.runs_refused = Counter("scatterflow_runs_refused", "Runs refused at start, by reason "
                                    "(limits, setup_error, too_many_runs, ...)", ["reason"], registry=r)
        self.runs_evicted = Counter("scatterflow_runs_evicted", "Open runs closed to make room for new ones "
                                    "(ingest.max_open_runs)", registry=r)
        self.runs_quarantined = Counter("scatterflow_runs_quarantined", "Runs whose worker died twice while "
                                        "reducing them, stopped instead of replayed", registry=r)
        self.tiled_spooled = Counter("scatterflow_tiled_spooled", "Tiled writes spooled to local disk while "
                                     "Tiled was unreachable", registry=r)
        self.stale_segments_removed = Counter("scatterflow_stale_segments_removed", "Shared-memory frame files "
                                              "of dead scatterflow processes removed at start", registry=r)
        self.runs_interrupted_at_start = Counter("scatterflow_runs_interrupted_at_start", "Runs an earlier "
                                                 "(killed) process left running in Tiled, marked interrupted",
                                                 registry=r)
        self.logins_refused = Counter("scatterflow_api_logins_refused", "Dashboard log-ins refused, by reason "
                                      "(wrong_key; throttled: too many wrong keys from one address)", ["reason"],
                                      registry=r)
        self.publish_errors = Counter("scatterflow_publish_errors", "Results a sink refused, by sink "
                                      "(state, results, tiled, calibration)", ["sink"], registry=r)
        self.worker_frames = Counter("scatterflow_worker_frames", "Frames reduced and fitted, by worker (process or "
                                     "Ray actor), its node and device", ["worker", "node", "device"], registry=r)
        self.tiled_requests = Counter("scatterflow_tiled_requests", "Write requests sent to Tiled", registry=r)
        self.tiled_failures = Counter("scatterflow_tiled_failures", "Tiled write failures (retried or spooled)",
                                      registry=r)
        for kind in ("event", "stream_datum", "start"):       # a series from the start, not from the first loss
            self.lost_upstream.labels(kind)
        ProcessCollector(registry=r)                          # process_* (CPU, memory, open files)
        PlatformCollector(registry=r)                         # python_info
        Info("scatterflow_build", "Version of the service and of the libraries its numbers depend on",
             registry=r).info(build_info())

    def render(self) -> bytes:
        return generate_latest(self.registry)


    def latency_quantile(self, stage: str, q: float) -> float | None:
        """Quantile ``q`` of the arrival-to-result latency of ``stage`` (s), interpolated in
        the histogram's buckets (`histogram_quantile`); None before the first frame."""
        buckets = sorted((float(s.labels["le"]), s.value) for m in self.latency.collect() for s in m.samples
                         if s.name.endswith("_bucket") and s.labels.get("stage") == stage)
        return histogram_quantile(buckets, q)


def build_info() -> dict[str, str]:
    """scatterflow's version and those of torch, pyFAI, numpy, bluesky, event-model and tiled."""
    from importlib.metadata import PackageNotFoundError, version
    info = {}
    for name, dist in (("version", "scatterflow"), ("torch", "torch"), ("pyfai", "pyFAI"), ("numpy", "numpy"),
                       ("bluesky", "bluesky"), ("event_model", "event-model"), ("tiled", "tiled")):
        try:
            info[name] = version(dist)
        except PackageNotFoundError:
            info[name] = "none"
    return info


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
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


def by_label(metric) -> dict[str, float]:
    """A counter's totals or a gauge's values by their labels' values joined with "," ("total"
    when unlabelled)."""
    out: dict[str, float] = {}
    for fam in metric.collect():
        for s in fam.samples:
            if fam.type == "counter" and not s.name.endswith("_total"):
                continue
            key = ",".join(s.labels.values()) or "total"
            out[key] = out.get(key, 0.0) + s.value
    return out


def total(metric) -> float:
    """A counter's or gauge's sum over its labels."""
    return float(sum(by_label(metric).values()))
