"""The API's documentation pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their
JavaScript, CSS and favicon served by the app itself from ``/static/docs`` (the files the
``fastapi-offline`` package ships, kept current with Swagger UI and ReDoc), so that they work on a
beamline network without internet access; no Google fonts. Public, as ``/openapi.json``: they
hold no data. Their URLs are relative to the page, so they work behind a path prefix too."""
from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/static/docs"          # mounted by app.py
_ASSETS = ASSETS_URL.lstrip("/")     # relative to /docs and /redoc

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="openapi.json", title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{_ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{_ASSETS}/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})   # else it asks swagger.io


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="openapi.json", title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{_ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{_ASSETS}/favicon.png",
                          with_google_fonts=False)
