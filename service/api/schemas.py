"""Response models of the REST API: the JSON bodies clients get, documented in /openapi.json.

Non-finite numbers travel as null. Open-ended parts stay open: a run summary carries
``modality``, ``source_run`` and ``detector`` only when the run has them (routes leave unset
fields out), the start document is free-form, and the columns of a table are those of the rows
the workers send (workers/columns.py).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from workers.columns import PEAK_COLUMNS, PHASE_COLUMNS


class WorkerHealth(BaseModel):
    """One worker process as the dispatcher sees it (service/dispatch.py `worker_health`)."""
    index: int
    pid: int | None
    device: str
    node: str = Field("", description='host name (local engine) or "ip/node-id" of its Ray node')
    alive: bool
    ready: bool = Field(description="its ready message came (false while a restarted worker starts)")
    runs: int
    inflight_batches: int
    oldest_inflight_s: float | None = Field(description="age (s) of its oldest unanswered batch; null when idle")
    frames: int = Field(0, description="frames it reduced and fitted")
    fps: float = Field(0.0, description="frames/s it reduced and fitted over the last 30 s")


class Health(BaseModel):
    """``/api/v1/health``: 200 with status "ok"; 503 with "degraded" (results still flow, e.g. Tiled
    writes spooled, a worker restarting) or "stuck" (ingest or a worker has stopped making
    progress), ``problems`` saying what, in words."""
    status: Literal["ok", "degraded", "stuck"]
    uptime_s: float = Field(description="seconds since the service (or, without one, the app) started")
    problems: list[str] = Field(default_factory=list)
    routing_busy_s: float | None = Field(None, description="seconds the ingest routing thread has spent on its "
                                                           "current message; null when idle")
    workers: list[WorkerHealth] = Field(default_factory=list)
    tiled_spool_pending: int | None = Field(None, description="Tiled writes waiting in the local spool; null "
                                                              "without Tiled")


class InversionSummary(BaseModel):
    """A run's per-frame inversion at a glance (workers/inversion/quality.py `InversionTally`)."""
    frames: int = Field(description="frames inverted")
    model: str | None = Field(None, description="the structural model(s), comma-separated")
    good: int | None = Field(None, description="frames the model describes within their errors (chi2 p-value >= "
                                               "inversion.good_p_value)")
    poor: int | None = Field(None, description="frames with a significant misfit of the order of the noise")
    bad: int | None = Field(None, description="frames the model cannot describe (reduced chi2 > inversion.bad_chi2)")
    adequate_fraction: float | None = Field(None, description="fraction of frames not bad")
    converged_fraction: float | None = None
    at_bound_fraction: dict[str, float] | None = Field(None, description="per parameter: fraction of frames on a bound")
    warm_start: dict[str, int] | None = Field(None, description='frames per LM start ("encoder" | "grid")')


class RunSummary(BaseModel):
    """One analysis run as the run store holds it (``source`` "memory"), or as Tiled's
    ``scatterflow/<uid>`` has it (``source`` "catalog": what Tiled does not record is null, and a
    catalogue listing leaves all counts null)."""
    model_config = ConfigDict(extra="allow")

    uid: str
    status: str = Field(description='"running", then complete | incomplete | failed | refused | quarantined, '
                                    'or the abort | fail of its stop document; from Tiled also "interrupted"')
    reason: str
    plan_name: str | None
    scan_id: int | None
    created: float | None = Field(description="s since the epoch (from Tiled: the start document's time)")
    stopped: float | None = Field(description="s since the epoch; null while running, and from Tiled")
    frames_received: int | None
    frames_fitted: int | None
    frames_final: int | None
    frames_failed: dict[str, int] | None = Field(description="frames counted as failed, by reason")
    reseeds: int | None = Field(0, description="fits re-seeded after divergence")
    peak_rows: int | None = Field(description="peak rows since the run started (row indices 0 .. peak_rows - 1)")
    peak_rows_held: int = Field(0, description="the newest peak rows held in memory; older ones are read from Tiled")
    source: Literal["memory", "catalog"] = Field("memory", description="where this summary comes from")
    unit: str | None = Field(description="unit of the profiles' radial axis")
    modality: str | None = Field(None, description="only for runs analysed with a setup")
    source_run: str | None = Field(None, description="only for one detector of a multi-detector run")
    detector: str | None = Field(None, description="only for one detector of a multi-detector run")
    inversion: InversionSummary | None = Field(None, description="only for runs with inversion rows (inversion.enabled)")


class RunList(BaseModel):
    runs: list[RunSummary]


class RunDetail(RunSummary):
    start: dict[str, Any] = Field(description="the run's start document")


class MissingRows(BaseModel):
    """Rows a page leaves out because neither memory nor Tiled has them (now)."""
    first_row: int = Field(description="row index of the first row left out")
    end_row: int = Field(description="row index one past the last row left out")
    reason: str


class TablePage(BaseModel):
    """The cursors and gaps of a page of a row table (peaks, phases, inversion)."""
    next_since: int = Field(description="row index to ask from next (since=)")
    next_seq: int | None = Field(None, description="seq_num to ask from next (since_seq=): one past the last "
                                                   "frame returned; null when no rows came and no since_seq was given")
    missing: MissingRows | None = Field(None, description="rows left out (not held in memory, not in Tiled); "
                                                          "null: the page is whole")


class PeakTable(TablePage):
    columns: dict[str, list[Any]] = Field(
        description="equal-length lists, one row per frame and peak: " + ", ".join(PEAK_COLUMNS))


class Transition(BaseModel):
    """A confirmed phase transition (workers/phase.py)."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    seq_num: int
    time: float | None = Field(description="s; null when the rows carry no time")
    time_sigma: float | None = Field(description="s")
    frame_sigma: float | None = Field(description="frames")
    change_point: bool = Field(description="located at a fit change point")


class PhaseTable(TablePage):
    columns: dict[str, list[Any]] = Field(
        description="equal-length lists, one row per frame: " + ", ".join(PHASE_COLUMNS))
    transitions: list[Transition] = Field(description="the confirmed transitions (the newest 10,000), in time order")


class InversionTable(TablePage):
    columns: dict[str, list[Any]] = Field(
        description="equal-length lists, one row per frame (workers/inversion/refine.py `inversion_rows`): "
                    "seq_num, time (s since the epoch), model; per parameter of the model (sphere_hs: radius "
                    "nm, pd, volfraction, i0, background) <name>, <name>_err (LM standard error; null without "
                    "refinement and on a bound), <name>_encoder (the LM's start), <name>_at_bound; chi2 "
                    "(reduced), p_value, fit_quality (good | poor | bad), converged, warm_start (encoder | "
                    "grid); empty before the first row")


class Profiles(BaseModel):
    unit: str
    radial: list[float] = Field(description="bin centres, in `unit`")
    seq_num: list[int]
    time: list[float] = Field(description="s since the epoch")
    intensity: list[list[float | None]] = Field(description="(frames, bins)")
    sigma: list[list[float | None]] = Field(description="(frames, bins)")


class LatestProfile(BaseModel):
    uid: str
    seq_num: int
    time: float = Field(description="s since the epoch")
    unit: str
    radial: list[float | None]
    intensity: list[float | None]
    sigma: list[float | None]
    peaks: dict[str, list[Any]] = Field(description="that frame's peak rows, columns as /peaks")


class QMap(BaseModel):
    uid: str
    seq_num: int
    unit: Literal["1/nm"]
    dims: list[str] = Field(description='["q_z", "q_xy"]: the axes of intensity')
    q_xy: list[float]
    q_z: list[float]
    intensity: list[list[float | None]] = Field(description="(Nz, Nxy); null: missing wedge, no pixel")


class ExtraProfile(BaseModel):
    seq_num: int
    radial: list[float | None]
    unit: str
    intensity: list[float | None]
    sigma: list[float | None]


class Series(BaseModel):
    seq_num: list[int]
    value: list[float | None]


class QMapRef(BaseModel):
    seq_num: int


class Extras(BaseModel):
    profiles: dict[str, ExtraProfile] = Field(description="latest extra profile by name (in_plane, vertical_cut)")
    scalars: dict[str, Series] = Field(description="per-frame scalar series by name (hermans_orientation)")
    qmap: QMapRef | None = Field(description="the latest q-map's frame, null without one")


class LatencySummary(BaseModel):
    count: int
    mean_s: float | None
    p50_s: float | None = Field(description="interpolated within histogram buckets")
    p95_s: float | None
    p99_s: float | None


class Status(BaseModel):
    """``/api/v1/status``: what the service reports (service/server.py `Service.status`); an app
    built without a service reports what its ``status`` callable returns."""
    model_config = ConfigDict(extra="allow")

    version: str | None = None
    uptime_s: float | None = Field(None, description="s since the service started")
    devices: list[str] | None = Field(None, description="each worker's torch device")
    workers: int | None = None
    worker_restarts: int | None = None
    engine: str | None = Field(None, description='"local" or "ray"')
    worker_pool: list[dict[str, Any]] | None = Field(None, description="per worker: index, node, device, alive, "
                                                                       "ready, runs, frames, fps (frames/s)")
    queues: dict[str, int] | None = Field(None, description="items waiting, by queue")
    frames_received: float | None = None
    frames_fitted: float | None = None
    frames_final: float | None = None
    frames_failed: float | None = None
    rejected: float | None = Field(None, description="messages refused at ingest")
    runs_active: int | None = None
    tiled_uri: str | None = None
    ingest_address: str | None = None
    calibration: dict[str, Any] | None = Field(None, description="the geometry of the last calibrant run, if any")


class Session(BaseModel):
    """The dashboard's session (``/api/v1/session``)."""
    authenticated: bool = Field(description="requests from this browser carry the API key (its cookie)")
    key_required: bool = Field(description="the service asks for an API key (false: open, on loopback)")


class Login(BaseModel):
    """``POST /api/v1/session``: the API key, traded for a session cookie."""
    api_key: SecretStr = Field(description="the service's API key (api.api_key)")


class ErrorDetail(BaseModel):
    """An error answer (4xx, 5xx), in words."""
    detail: str


class MetricsSummary(BaseModel):
    """The Prometheus metrics as JSON: totals, counts by label (``total`` when unlabelled)."""
    frames_received: float
    frames_fitted: float
    frames_final: float
    frames_dropped: float
    frames_failed: dict[str, float]
    rejected: dict[str, float]
    lost_upstream: dict[str, float]
    reseeds: float
    change_points: float
    queue_depth: dict[str, float]
    runs_active: float
    tiled_requests: float
    tiled_failures: float
    latency: dict[str, LatencySummary] = Field(description="arrival to result, by stage")
