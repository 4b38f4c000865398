"""Runs: ``/api/v1/runs`` (summaries of the runs held) and ``/api/v1/runs/{uid}`` (one run's
summary with its start document)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..jsonsafe import jsonable
from .dependencies import Context, Run, check_api_key
from .schemas import RunDetail, RunList

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/api/v1/runs", response_model=RunList, response_model_exclude_unset=True)
def runs(ctx: Context) -> RunList:
    return RunList(runs=ctx.store.list())


@router.get("/api/v1/runs/{uid}", response_model=RunDetail, response_model_exclude_unset=True)
def run(run: Run) -> RunDetail:
    return RunDetail(**run.summary(), start=jsonable(run.start))
