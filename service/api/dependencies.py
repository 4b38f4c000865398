"""What routes share: the app's collaborators, the API key check, the run lookup (a uid or a
unique prefix of one, in memory or in Tiled) and the query parameters parsed at the edge (bad
values answer 422)."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, HTTPException, Query, Request

from ..metrics import Metrics
from ..publish.rowtable import RowQuery
from ..publish.state import RunRecord, RunStore
from .schemas import ErrorDetail, Health

if TYPE_CHECKING:                  # imported by whoever builds one (it pulls in tiled's client)
    from ..publish.archive_reader import ArchiveReader

LIMIT = 100_000                    # rows per response unless `limit` says otherwise
MAX_LIMIT = 1_000_000


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
    archive: ArchiveReader | None = None   # runs and old rows read back from Tiled; None: memory only


def get_context(request: Request) -> ApiContext:
    return request.app.state.context


Context = Annotated[ApiContext, Depends(get_context)]


#: The dashboard's session cookie (service/api/session.py): HttpOnly, SameSite=Strict.
SESSION_COOKIE = "scatterflow_session"

#: What routes behind the key answer without it, for /openapi.json.
AUTH_RESPONSES = {401: {"model": ErrorDetail, "description": "missing or wrong API key (X-API-Key, Authorization: "
                                                             "Bearer, or the dashboard's session cookie)"}}
#: What routes naming a run answer when it cannot be found, for /openapi.json.
RUN_RESPONSES = {404: {"model": ErrorDetail, "description": "no such run (or it lacks these data)"},
                 409: {"model": ErrorDetail, "description": "the uid prefix matches several runs"},
                 503: {"model": ErrorDetail, "description": "Tiled does not answer and memory lacks the run"}}


def check_api_key(request: Request, ctx: Context) -> None:
    """401 unless the request carries the API key (when one is set): header ``X-API-Key: KEY``,
    ``Authorization: Bearer KEY``, or the session cookie ``POST /api/v1/session`` set. Never a
    query parameter: URLs end up in access logs and browser history."""
    if ctx.api_key is None:
        return
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not (keys_match(given_key(request), ctx.api_key) or keys_match(cookie, session_token(ctx.api_key))):
        raise HTTPException(status_code=401, detail="missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


def given_key(request: Request) -> str:
    """The API key a request's headers carry: X-API-Key or Authorization: Bearer ("" if none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    return request.headers.get("x-api-key") or bearer


def keys_match(given: str, expected: str) -> bool:
    """`given` equals `expected`, compared in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())


def session_token(api_key: str) -> str:
    """The session cookie's value for `api_key`: an HMAC of it, so that the browser never stores
    the key itself, and a new key ends every session."""
    return hmac.new(api_key.encode(), b"scatterflow dashboard session", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class RunRef:
    """A run a request names: its full uid, and its record when the store holds it (None: the run
    is only in Tiled, under ``scatterflow/<uid>``)."""
    uid: str
    record: RunRecord | None


def resolve_run(uid: str, ctx: Context) -> RunRef:
    """The run ``uid`` names: a run held in memory, else one in Tiled, else the one run (in
    either) whose uid starts with ``uid``. 404 if none, 409 if several, 503 if Tiled does not
    answer and memory has none."""
    from ..publish.archive_reader import ArchiveUnavailable

    record = ctx.store.get(uid)
    if record is not None:
        return RunRef(uid, record)
    matches = set(ctx.store.uids(uid))
    if ctx.archive is not None:
        try:
            if ctx.archive.has(uid):
                return RunRef(uid, None)
            matches |= set(ctx.archive.keys(uid))
        except ArchiveUnavailable as exc:
            if not matches:
                raise HTTPException(status_code=503, detail=str(exc)) from exc
    if not matches:
        where = "in memory or in Tiled" if ctx.archive is not None else "in memory (no Tiled archive configured)"
        raise HTTPException(status_code=404, detail=f"no run {uid!r} {where}")
    if len(matches) > 1:
        shown = sorted(matches)
        raise HTTPException(status_code=409, detail=f"run uid prefix {uid!r} is ambiguous: {len(shown)} runs match "
                                                    f"({', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''})")
    full = matches.pop()
    return RunRef(full, ctx.store.get(full))


AnyRun = Annotated[RunRef, Depends(resolve_run)]


def get_run(ref: AnyRun) -> RunRecord:
    """The run a request names, held in memory; 404 for a run only in Tiled."""
    if ref.record is None:
        raise HTTPException(status_code=404, detail=f"run {ref.uid!r} is no longer held in memory; Tiled has it "
                                                    f"under scatterflow/{ref.uid} (REST serves its summary, peaks, "
                                                    f"phases and inversion)")
    return ref.record


Run = Annotated[RunRecord, Depends(get_run)]


def row_query(
        since: int | None = Query(None, ge=0, description="row index to start from: rows in arrival order, "
                                                         "provisional and final counted together (next_since)"),
        since_seq: int | None = Query(None, ge=0, description="lowest seq_num (frame) to return; rows ordered by "
                                                             "seq_num; needs final=true or false (next_seq)"),
        final: bool | None = Query(None, description="only final (true) or provisional (false) rows"),
        limit: int = Query(LIMIT, ge=1, le=MAX_LIMIT, description="rows at most (by seq_num: whole frames)")) -> RowQuery:
    """The rows a table poll asks for; since and since_seq together answer 422."""
    if since is not None and since_seq is not None:
        raise HTTPException(status_code=422, detail="give since (a row index) or since_seq (a seq_num), not both")
    return RowQuery(since=since, since_seq=since_seq, final=final, limit=limit)


Rows = Annotated[RowQuery, Depends(row_query)]
ColourScale = Annotated[Literal["log", "linear"], Query(description="colour scale of the image")]
