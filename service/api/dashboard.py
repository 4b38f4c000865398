"""The live dashboard: the page at ``/``; its code and the vendored uPlot are served from
``/static`` (mounted by app.py, public)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from .dependencies import check_api_key

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})
