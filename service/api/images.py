"""Images of a run: ``frame.png`` (the latest raw 2D frame), ``qmap`` (the latest (q_xy, q_z)
map of a grazing-incidence run, as JSON) and ``qmap.png``, under
``/api/v1/runs/{uid}/``. The PNGs carry the frame's seq_num in ``X-Seq-Num``."""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response

from ..render import render_frame_png, render_qmap_png
from .dependencies import AUTH_RESPONSES, RUN_RESPONSES, ApiContext, ColourScale, Context, Run, check_api_key
from .schemas import QMap

router = APIRouter(dependencies=[Depends(check_api_key)], responses={**AUTH_RESPONSES, **RUN_RESPONSES})
PNG = {200: {"content": {"image/png": {}}, "description": "a PNG; its frame's seq_num in the X-Seq-Num header"},
       422: {"description": "bad query parameters, or the stored data is not an image"}}


@router.get("/api/v1/runs/{uid}/frame.png", summary="Latest raw detector frame (PNG)",
            response_class=Response, responses=PNG)
def frame_png(run: Run, ctx: Context,
              size: int = Query(320, ge=16, le=2048, description="longest side, pixels"),
              scale: ColourScale = "log") -> Response:
    """The run's latest raw detector frame as a PNG (viridis): counts block-averaged so that the
    longest side has at most ``size`` pixels, on a ``log`` (log10(1 + counts), default) or
    ``linear`` colour scale over the 1st-99.8th percentile of the frame; masked pixels (negative:
    module gaps) grey. Its seq_num in ``X-Seq-Num``; 404 before the first frame. Any other query
    parameter (the dashboard's ``seq``) is ignored: it only makes each frame's URL new."""
    got = ctx.store.latest_frame(run.uid)
    if got is None:
        raise HTTPException(status_code=404, detail=f"run {run.uid!r} has no frame yet")
    seq, frame = got
    return _png(lambda: render_frame_png(frame, size=size, log=scale == "log"), seq)


@router.get("/api/v1/runs/{uid}/qmap", summary="Latest (q_xy, q_z) map of a grazing-incidence run (JSON)",
            response_model=QMap)
def qmap(run: Run, ctx: Context) -> QMap:
    """The latest q-map: {uid, seq_num, unit, dims ["q_z", "q_xy"], q_xy, q_z, intensity (Nz x Nxy)}."""
    seq, q_xy, q_z, image = _latest_qmap(ctx, run.uid)
    return QMap(uid=run.uid, seq_num=seq, unit="1/nm", dims=["q_z", "q_xy"],
                q_xy=np.asarray(q_xy).tolist(), q_z=np.asarray(q_z).tolist(), intensity=np.asarray(image).tolist())


@router.get("/api/v1/runs/{uid}/qmap.png", summary="Latest (q_xy, q_z) map of a grazing-incidence run (PNG)",
            response_class=Response, responses=PNG)
def qmap_png(run: Run, ctx: Context, size: int = Query(480, ge=100, le=2048, description="width, pixels"),
             scale: ColourScale = "log") -> Response:
    """The latest q-map drawn with axes in 1/nm; missing wedge and empty bins grey."""
    seq, q_xy, q_z, image = _latest_qmap(ctx, run.uid)
    return _png(lambda: render_qmap_png(q_xy, q_z, image, size=size, log=scale == "log"), seq)


def _latest_qmap(ctx: ApiContext, uid: str) -> tuple:
    """(seq_num, q_xy, q_z, map (Nz, Nxy)) of the run's latest q-map, or 404."""
    got = ctx.store.latest_qmap(uid)
    if got is None:
        raise HTTPException(status_code=404, detail=f"run {uid!r} has no q-map (yet)")
    return got


def _png(render, seq: int) -> Response:
    """The PNG `render()` draws, or 422 when the stored data is not an image."""
    try:
        png = render()
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store", "X-Seq-Num": str(seq)})
