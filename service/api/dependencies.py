"""What routes share: the app's collaborators, the API key check, the run lookup and the
query parameters parsed at the edge (bad values answer 422)."""
from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Query, Request

from ..metrics import Metrics
from ..publish.state import RunRecord, RunStore
from .schemas import Health


@dataclass(frozen=True)
class ApiContext:
    """The collaborators `build_app` received, kept as ``app.state.context``."""
    store: RunStore
    metrics: Metrics
    status: Callable[[], dict]
    health: Callable[[], Health] | None     # None: always "ok" (an app without a service behind it)
    api_key: str | None            # None: no authentication
    started: float                 # s since the epoch
    stream_interval_s: float       # how often an open event stream polls the store
    stream_max_s: float            # how long an event stream stays open


def get_context(request: Request) -> ApiContext:
    return request.app.state.context


Context = Annotated[ApiContext, Depends(get_context)]


def check_api_key(request: Request, ctx: Context) -> None:
    """401 unless the request carries the API key (when one is set)."""
    if ctx.api_key is None:
        return
    if not hmac.compare_digest(given_key(request).encode(), ctx.api_key.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


def given_key(request: Request) -> str:
    """The API key a request carries: X-API-Key, Authorization: Bearer, or query api_key ("" if none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    return request.headers.get("x-api-key") or bearer or request.query_params.get("api_key") or ""


def get_run(uid: str, ctx: Context) -> RunRecord:
    """The run `uid` of the store, or 404."""
    run = ctx.store.get(uid)
    if run is None:
        raise HTTPException(status_code=404, detail=f"no run {uid!r}")
    return run


Run = Annotated[RunRecord, Depends(get_run)]

Since = Annotated[int, Query(ge=0, description="row index to start from")]
FinalOnly = Annotated[bool | None, Query(description="only final (true) or provisional (false) rows")]
ColourScale = Annotated[Literal["log", "linear"], Query(description="colour scale of the image")]
