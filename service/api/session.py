"""The dashboard's session, so that no API key rides in a URL: ``POST /api/v1/session`` trades
the key for a cookie (HttpOnly: the page's scripts cannot read it; SameSite=Strict: other sites'
requests do not carry it; Secure over https) that `check_api_key` accepts, and that the
dashboard's fetches, its EventSource and its images then send by themselves. ``GET`` says whether
a request is authenticated, ``DELETE`` ends the session. The cookie lasts until the browser
closes; it holds an HMAC of the key (dependencies.py `session_token`), not the key."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from .dependencies import AUTH_RESPONSES, SESSION_COOKIE, Context, check_api_key, keys_match, session_token
from .schemas import Login, Session

router = APIRouter()


@router.post("/api/v1/session", summary="Log in: trade the API key for a session cookie",
             response_model=Session, responses=AUTH_RESPONSES)
def log_in(login: Login, request: Request, response: Response, ctx: Context) -> Session:
    """Check ``api_key`` and set the session cookie; 401 (and no cookie) for a wrong key. Without
    a key configured, no cookie is needed and none is set."""
    if ctx.api_key is None:
        return Session(authenticated=True, key_required=False)
    if not keys_match(login.api_key.get_secret_value(), ctx.api_key):
        raise HTTPException(status_code=401, detail="wrong API key")
    response.set_cookie(SESSION_COOKIE, session_token(ctx.api_key), path=_cookie_path(request),
                        secure=request.url.scheme == "https", httponly=True, samesite="strict")
    return Session(authenticated=True, key_required=True)


@router.get("/api/v1/session", summary="Is this request authenticated?",
            response_model=Session, responses=AUTH_RESPONSES,
            dependencies=[Depends(check_api_key)])
def session(ctx: Context) -> Session:
    """200 when the request carries the key (or none is needed), else 401."""
    return Session(authenticated=True, key_required=ctx.api_key is not None)


@router.delete("/api/v1/session", summary="Log out: clear the session cookie", response_model=Session)
def log_out(request: Request, response: Response, ctx: Context) -> Session:
    """Clear the session cookie (needs no key: it only ends this browser's session)."""
    response.delete_cookie(SESSION_COOKIE, path=_cookie_path(request), secure=request.url.scheme == "https",
                           httponly=True, samesite="strict")
    return Session(authenticated=ctx.api_key is None, key_required=ctx.api_key is not None)


def _cookie_path(request: Request) -> str:
    """The app's root path (where it is mounted), or "/"."""
    return request.scope.get("root_path") or "/"
