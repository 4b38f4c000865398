"""Runs: ``/api/v1/runs`` (summaries of the runs held in memory, or of those in Tiled with
``source=catalog``) and ``/api/v1/runs/{uid}`` (one run's summary with its start document, from
memory or, for a run no longer held, from Tiled's ``scatterflow/<uid>``; ``uid`` may be a unique
prefix)."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query

from ..jsonsafe import jsonable
from .dependencies import AnyRun, Context, check_api_key
from .schemas import RunDetail, RunList

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/api/v1/runs", response_model=RunList, response_model_exclude_unset=True)
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


@router.get("/api/v1/runs/{uid}", response_model=RunDetail, response_model_exclude_unset=True)
def run(ref: AnyRun, ctx: Context) -> RunDetail:
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
