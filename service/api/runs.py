"""Runs: ``/api/v1/runs`` (summaries of the runs held in memory, or of those in Tiled with
``source=catalog``) and ``/api/v1/runs/{uid}`` (one run's summary with its start document, from
memory or, for a run no longer held, from Tiled's ``scatterflow/<uid>``; ``uid`` may be a unique
prefix)."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query

from ..jsonsafe import jsonable
from .dependencies import AUTH_RESPONSES, RUN_RESPONSES, AnyRun, Context, check_api_key
from .schemas import RunDetail, RunList

router = APIRouter(dependencies=[Depends(check_api_key)], responses=AUTH_RESPONSES)


@router.get("/api/v1/runs", summary="Run summaries", response_model=RunList, response_model_exclude_unset=True)
def runs(ctx: Context,
         source: Literal["memory", "catalog"] = Query("memory", description="memory: the runs held (live and "
                                                      "recent, with counts); catalog: every run in Tiled's "
                                                      "scatterflow/, newest first, counts null"),
         offset: int = Query(0, ge=0, description="runs to skip"),
         limit: int = Query(1000, ge=1, le=10_000, description="runs at most")) -> RunList:
    """Run summaries; ``GET /api/v1/runs/{uid}`` gives one with its counts and start document."""
    if source == "memory":
        return RunList(runs=ctx.store.list()[offset:offset + limit])
    if ctx.archive is None:
        raise HTTPException(status_code=400, detail="no Tiled archive configured (tiled.enabled, tiled.uri)")
    from ..publish.archive_reader import ArchiveUnavailable
    try:
        return RunList(runs=ctx.archive.list(offset, limit))
    except ArchiveUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc


@router.get("/api/v1/runs/{uid}", summary="One run: summary and start document",
            response_model=RunDetail, response_model_exclude_unset=True,
            responses=RUN_RESPONSES)
def run(ref: AnyRun, ctx: Context) -> RunDetail:
    """One run's summary (counts, status, the inversion's verdict counts) and its start document,
    from memory or, for a run no longer held, from Tiled; ``uid`` may be a unique prefix."""
    if ref.record is not None:
        return RunDetail(**ref.record.summary(), start=jsonable(ref.record.start))
    from ..publish.archive_reader import ArchiveUnavailable
    try:
        got = ctx.archive.summary(ref.uid)
    except ArchiveUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    if got is None:
        raise HTTPException(status_code=404, detail=f"no run {ref.uid!r}")
    return RunDetail(**got)
