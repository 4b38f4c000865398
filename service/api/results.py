"""A run's results: ``peaks``, ``phases`` and ``inversion`` (columnar tables, ``since=`` for
incremental polling), ``profiles``, ``latest`` (profile and peak rows of the newest frame) and
``extras`` (a modality's extra profiles and scalar series), under ``/api/v1/runs/{uid}/``."""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query

from ..jsonsafe import jsonable
from ..publish.state import RunStore
from .dependencies import Context, FinalOnly, Run, Since, check_api_key
from .schemas import (
    Extras,
    InversionTable,
    LatestProfile,
    PeakTable,
    PhaseTable,
    Profiles,
)

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/api/v1/runs/{uid}/peaks", response_model=PeakTable)
def peaks(run: Run, ctx: Context, since: Since = 0, final: FinalOnly = None) -> PeakTable:
    """Fitted peaks, one row per frame and peak (columnar; NaN as null)."""
    cols, next_since = ctx.store.peaks_since(run.uid, since, final)
    return PeakTable(columns=cols, next_since=next_since)


@router.get("/api/v1/runs/{uid}/phases", response_model=PhaseTable)
def phases(run: Run, ctx: Context, since: Since = 0, final: FinalOnly = None) -> PhaseTable:
    """Phase label, probability and crystallinity index per frame (columnar, like peaks), and
    the confirmed transitions: {from, to, seq_num, time, time_sigma, frame_sigma, change_point}."""
    cols, next_since, transitions = ctx.store.phases_since(run.uid, since, final)
    return PhaseTable(columns=cols, next_since=next_since, transitions=transitions)


@router.get("/api/v1/runs/{uid}/inversion", response_model=InversionTable)
def inversion(run: Run, ctx: Context, since: Since = 0) -> InversionTable:
    """Structural parameters per frame (inversion.enabled): radius (nm), pd, volfraction, i0,
    background, each with _err (LM standard error) and _encoder (the encoder's value), chi2."""
    cols, next_since = ctx.store.inversion_since(run.uid, since)
    return InversionTable(columns=cols, next_since=next_since)


@router.get("/api/v1/runs/{uid}/profiles", response_model=Profiles)
def profiles(run: Run, since_seq: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=5000)) -> Profiles:
    """The reduced profiles held (the newest frames) from frame `since_seq` on, at most `limit`."""
    items = [p for p in list(run.profiles) if p[0] >= since_seq][:limit]
    return Profiles(unit=run.unit, radial=_values(run.radial), seq_num=[p[0] for p in items],
                    time=[p[1] for p in items], intensity=[_values(p[2]) for p in items],
                    sigma=[_values(p[3]) for p in items])


@router.get("/api/v1/runs/{uid}/latest", response_model=LatestProfile | None)
def latest(run: Run, ctx: Context) -> LatestProfile | None:
    """The latest profile (radial, intensity, sigma; NaN as null) and that frame's peak rows;
    null before the first profile."""
    return latest_profile(ctx.store, run.uid)


@router.get("/api/v1/runs/{uid}/extras", response_model=Extras)
def extras(run: Run, ctx: Context) -> Extras:
    """{"profiles": {name: latest {seq_num, radial, unit, intensity, sigma}}, "scalars":
    {name: {seq_num: [...], value: [...]}}, "qmap": {seq_num} or null}; NaN as null."""
    got = ctx.store.extras(run.uid)
    if got is None:
        raise HTTPException(status_code=404, detail=f"no run {run.uid!r}")
    return Extras(**jsonable(got))


def latest_profile(store: RunStore, uid: str) -> LatestProfile | None:
    """The latest reduced profile of run `uid` and the peak rows of that frame, or None."""
    run = store.get(uid)
    if run is None or not run.profiles:
        return None
    seq, t, intensity, sigma = run.profiles[-1]
    n = len(run.peaks["seq_num"])              # that frame's rows are among the newest
    cols, _ = store.peaks_since(uid, max(0, n - 2000))
    idx = [i for i, s in enumerate(cols["seq_num"]) if s == seq]
    rows = {c: [v[i] for i in idx] for c, v in cols.items()}
    return LatestProfile(uid=uid, seq_num=seq, time=t, unit=run.unit, radial=_values(run.radial),
                         intensity=_values(intensity), sigma=_values(sigma), peaks=rows)


def _values(array) -> list:
    """An array's values as a (nested) list ([] for None); NaN stays, the response writes null."""
    return [] if array is None else np.asarray(array).tolist()
