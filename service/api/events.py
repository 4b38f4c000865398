"""Server-sent events for the dashboard: ``/api/v1/events?run=latest|UID&since=N``."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from ..jsonsafe import jsonable
from ..publish.state import RunStore
from .dependencies import AUTH_RESPONSES, ApiContext, Context, check_api_key
from .health import metrics_summary
from .results import latest_profile

router = APIRouter(dependencies=[Depends(check_api_key)], responses=AUTH_RESPONSES)

START_KEYS = ("uid", "time", "plan_name", "scan_id", "sample", "modality", "light_schedule_s", "frame_interval")


@dataclass(frozen=True)
class StreamRequest:
    """What a stream follows: `run` ("latest" or a uid), and the run and peak row it resumes at."""
    run: str
    resume_uid: str | None
    resume_since: int


def stream_request(request: Request,
                   run: str = Query("latest", description="a run uid, or 'latest' to follow the newest run"),
                   since: int = Query(0, ge=0, description="peak row index to resume from")) -> StreamRequest:
    """The query, and the ``Last-Event-ID`` ("<uid> <next_since>") of a reconnecting browser,
    which takes precedence."""
    resume_uid, resume_since = None, since
    last_id = request.headers.get("last-event-id", "")
    if " " in last_id:
        resume_uid, _, n = last_id.partition(" ")
        resume_since = int(n) if n.isdigit() else 0
    elif run != "latest":
        resume_uid = run
    return StreamRequest(run=run, resume_uid=resume_uid, resume_since=resume_since)


@router.get("/api/v1/events", summary="Live updates for the dashboard (server-sent events)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "a stream of server-sent events"}})
async def events(ctx: Context, req: Annotated[StreamRequest, Depends(stream_request)]) -> StreamingResponse:
    """Server-sent events (text/event-stream) for the dashboard about the run ``run`` names
    ("latest": the newest run, followed as new runs start; or a uid), polled every
    ``stream_interval_s`` and sent when something changed; peak rows from row ``since`` on (a
    reconnecting browser's ``Last-Event-ID`` takes precedence). Events, each ``data`` one JSON
    object:

    - ``runs``: ``{"runs": [summary, ...]}`` (as /api/v1/runs)
    - ``run``: ``{"uid", "reset", "summary", "start"}`` when the followed run changes;
      ``reset`` false when resuming the same run
    - ``peaks``: ``{"uid", "columns", "next_since"}``, new rows as /runs/{uid}/peaks;
      its event id ``"<uid> <next_since>"`` is where a reconnecting browser resumes
    - ``profile``: the latest profile, as /runs/{uid}/latest
    - ``frame``: ``{"uid", "seq_num"}`` when a newer 2D frame can be fetched as PNG
    - ``qmap``: ``{"uid", "seq_num"}`` when a newer q-map (grazing runs) can be fetched as PNG
    - ``status``: ``{"status": /api/v1/status, "metrics": /api/v1/metrics/summary, "time"}``, about 1/s

    Non-finite numbers are sent as null. The stream ends after the app's ``stream_max_s``; the
    browser's EventSource reconnects by itself (``retry: 1000``).
    """
    return StreamingResponse(event_stream(ctx, req), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@dataclass
class _Followed:
    """The run a stream follows, its next peak row, and the newest profile, frame and q-map sent."""
    uid: str | None = None
    since: int = 0
    profile_seq: int | None = None
    frame_seq: int | None = None
    qmap_seq: int | None = None


async def event_stream(ctx: ApiContext, req: StreamRequest) -> AsyncIterator[str]:
    """The SSE body: polls the in-memory store every ``ctx.stream_interval_s`` s."""
    yield "retry: 1000\n\n"
    deadline = time.monotonic() + ctx.stream_max_s
    followed = _Followed()
    runs_sig = None
    next_status = 0.0
    while True:
        runs = ctx.store.list()
        sig = [(r["uid"], r["status"], r["frames_received"], r["frames_fitted"], r["frames_final"]) for r in runs]
        if sig != runs_sig:
            runs_sig = sig
            yield sse("runs", {"runs": runs})
        target = _pick_run(runs, req.run)
        if target is not None and target != followed.uid:
            resumed = target == req.resume_uid
            followed = _Followed(uid=target, since=req.resume_since if resumed else 0)
            rec = ctx.store.get(target)
            if rec is not None:
                start = {k: rec.start.get(k) for k in START_KEYS}
                yield sse("run", {"uid": target, "reset": not resumed, "summary": rec.summary(), "start": start})
        if followed.uid is not None:
            for message in _run_updates(ctx.store, followed):
                yield message
        now = time.monotonic()
        if now >= next_status:
            next_status = now + 1.0
            yield sse("status", {"status": _status(ctx), "metrics": metrics_summary(ctx.metrics).model_dump(),
                                 "time": time.time()})
        if now >= deadline:
            return
        await asyncio.sleep(ctx.stream_interval_s)


def _run_updates(store: RunStore, f: _Followed) -> list[str]:
    """The peaks, profile, frame and q-map messages of what is new in run ``f.uid`` (updates `f`)."""
    out = []
    got = store.peaks_since(f.uid, f.since)
    if got is not None and got[1] > f.since:
        cols, f.since = got
        out.append(sse("peaks", {"uid": f.uid, "columns": cols, "next_since": f.since}, event_id=f"{f.uid} {f.since}"))
    rec = store.get(f.uid)
    if rec is not None and rec.profiles and rec.profiles[-1][0] != f.profile_seq:
        prof = latest_profile(store, f.uid)
        if prof is not None:
            f.profile_seq = prof.seq_num
            out.append(sse("profile", prof.model_dump()))
    fr = store.latest_frame(f.uid)
    if fr is not None and fr[0] != f.frame_seq:
        f.frame_seq = fr[0]
        out.append(sse("frame", {"uid": f.uid, "seq_num": f.frame_seq}))
    qm = store.latest_qmap(f.uid)
    if qm is not None and qm[0] != f.qmap_seq:
        f.qmap_seq = qm[0]
        out.append(sse("qmap", {"uid": f.uid, "seq_num": f.qmap_seq}))
    return out


def _status(ctx: ApiContext) -> dict:
    try:
        return ctx.status()
    except Exception as exc:        # live view: report, never break the stream
        return {"error": repr(exc)}


def _pick_run(runs: list[dict], wanted: str) -> str | None:
    """The uid to follow: `wanted` if held, or the newest run for "latest"; None if none."""
    if wanted != "latest":
        return wanted if any(r["uid"] == wanted for r in runs) else None
    if not runs:
        return None
    return max(runs, key=lambda r: r["created"])["uid"]


def sse(event: str, data, event_id: str | None = None) -> str:
    """One text/event-stream message; `data` as JSON, non-finite numbers as null."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head + "data: " + json.dumps(jsonable(data), allow_nan=False, separators=(",", ":")) + "\n\n"
