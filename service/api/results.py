"""A run's results: ``peaks``, ``phases`` and ``inversion`` (columnar tables paged by row index
or by seq_num, read back from Tiled beyond the rows held in memory, tables.py), ``profiles``,
``latest`` (profile and peak rows of the newest frame) and ``extras`` (a modality's extra
profiles and scalar series), under ``/api/v1/runs/{uid}/``; ``uid`` may be a unique prefix."""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response

from ..jsonsafe import jsonable
from ..publish.state import RunStore
from .dependencies import AUTH_RESPONSES, RUN_RESPONSES, AnyRun, Context, Rows, Run, check_api_key
from .schemas import (
    Extras,
    InversionTable,
    LatestProfile,
    PeakTable,
    PhaseTable,
    Profiles,
)
from .tables import table_page, table_response

router = APIRouter(dependencies=[Depends(check_api_key)], responses={**AUTH_RESPONSES, **RUN_RESPONSES})


@router.get("/api/v1/runs/{uid}/peaks", summary="Fitted peaks per frame (columnar, paged)", response_model=PeakTable)
def peaks(ref: AnyRun, ctx: Context, q: Rows) -> Response:
    """Fitted peaks, one row per frame and peak (columnar; NaN as null).

    Paging: ``since=N`` returns rows from row index N, rows counted in arrival order (provisional
    and final together) since the run started; poll on with ``next_since``. ``since_seq=S`` with
    ``final=true`` (or false) returns that kind of rows of frames seq_num >= S, ordered by seq_num;
    poll on with ``next_seq`` (one past the last frame returned; a frame whose rows arrive after a
    later frame's, e.g. recovered late from the catalogue, is met by ``since`` paging only).
    ``limit`` caps the rows (default 100,000; by seq_num rounded up to whole frames); a page cut
    by it has its cursors at the first row left. Rows older than those held in memory (the
    newest ``api.held_rows`` of each table) are read from Tiled's ``scatterflow/<uid>/peaks``;
    rows neither holds are named in ``missing`` ({first_row, end_row, reason}, row indices),
    null when the page is whole. A run no longer in memory is served from Tiled alone.
    """
    return table_response(*table_page(ctx, ref, "peaks", q))


@router.get("/api/v1/runs/{uid}/phases", summary="Phase labels per frame and transitions (columnar, paged)",
            response_model=PhaseTable)
def phases(ref: AnyRun, ctx: Context, q: Rows) -> Response:
    """Phase label, probability and crystallinity index per frame (columnar, paged as peaks),
    and the confirmed transitions: {from, to, seq_num, time, time_sigma, frame_sigma, change_point}."""
    page, missing = table_page(ctx, ref, "phases", q)
    return table_response(page, missing, transitions=_transitions(ctx, ref))


@router.get("/api/v1/runs/{uid}/inversion", summary="Structural parameters per frame with fit verdicts (columnar, paged)",
            response_model=InversionTable)
def inversion(ref: AnyRun, ctx: Context, q: Rows) -> Response:
    """Structural parameters per frame (inversion.enabled), one row per frame: seq_num, time,
    model; per parameter of the model (sphere_hs: radius nm, pd, volfraction, i0, background)
    <name>, <name>_err (LM standard error), <name>_encoder (the LM's start), <name>_at_bound; chi2
    (reduced), p_value, fit_quality ("good": chi2 p-value >= inversion.good_p_value, default 1e-3;
    "bad": reduced chi2 > inversion.bad_chi2, default 4, the model cannot describe the frame;
    else "poor"), converged, warm_start. A GISAXS radius histogram
    (spheres_histogram_paracrystal_dwba) adds radius_mean (nm), radius_width (std / mean of the
    number distribution), radius_fraction_00 .. radius_fraction_15 (volume fractions on the
    encoder's radius bins), each with _err, and n_modes. Paged as peaks, without ``final`` (every
    row is final); empty columns for a run without inversion."""
    return table_response(*table_page(ctx, ref, "inversion", q))


def _transitions(ctx: Context, ref: AnyRun) -> list:
    """The run's confirmed phase transitions, from memory or from Tiled."""
    from ..publish.archive_reader import ArchiveUnavailable

    if ref.record is not None:
        return ctx.store.transitions(ref.uid) or []
    try:
        return ctx.archive.transitions(ref.uid)
    except ArchiveUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc


@router.get("/api/v1/runs/{uid}/profiles", summary="Reduced profiles held in memory", response_model=Profiles)
def profiles(run: Run, since_seq: int = Query(0, ge=0, description="first seq_num (frame) to return"),
             limit: int = Query(100, ge=1, le=5000, description="profiles at most")) -> Profiles:
    """The reduced profiles held in memory (the newest frames of the run) from frame
    ``since_seq`` on, at most ``limit``: intensity and sigma (frames, bins) on the run's radial
    bins (``unit``), their seq_num and time (s since the epoch); NaN as null."""
    items = [p for p in list(run.profiles) if p[0] >= since_seq][:limit]
    return Profiles(unit=run.unit, radial=_values(run.radial), seq_num=[p[0] for p in items],
                    time=[p[1] for p in items], intensity=[_values(p[2]) for p in items],
                    sigma=[_values(p[3]) for p in items])


@router.get("/api/v1/runs/{uid}/latest", summary="Newest reduced profile and its frame's peaks",
            response_model=LatestProfile | None)
def latest(run: Run, ctx: Context) -> LatestProfile | None:
    """The run's newest reduced profile: its seq_num and time (s since the epoch), the radial
    bin centres in ``unit`` (e.g. q_nm^-1), intensity and sigma per bin (NaN as null), and that
    frame's peak rows (columns as /peaks, provisional and final). null before the first profile;
    404 for a run no longer held in memory. No query parameters; the dashboard gets the same
    body from /api/v1/events (``profile``)."""
    return latest_profile(ctx.store, run.uid)


@router.get("/api/v1/runs/{uid}/extras", summary="A modality's extra profiles and scalar series",
            response_model=Extras)
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
    rows = store.frame_peaks(uid, seq) or {}           # that frame's rows are among the newest
    return LatestProfile(uid=uid, seq_num=seq, time=t, unit=run.unit, radial=_values(run.radial),
                         intensity=_values(intensity), sigma=_values(sigma), peaks=rows)


def _values(array) -> list:
    """An array's values as a (nested) list ([] for None); NaN stays, the response writes null."""
    return [] if array is None else np.asarray(array).tolist()
