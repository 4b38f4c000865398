"""The live dashboard: the page at ``/``; its code and the vendored uPlot are served from
``/static`` (mounted by app.py). Both are public: they hold no data, and the page asks for the
API key (session.py) when the API answers 401."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})
