"""The dashboard's session, so that no API key rides in a URL: ``POST /api/v1/session`` trades
the key for a cookie (HttpOnly: the page's scripts cannot read it; SameSite=Strict: other sites'
requests do not carry it; Secure over https) that `check_api_key` accepts, and that the
dashboard's fetches, its EventSource and its images then send by themselves. ``GET`` says whether
a request is authenticated, ``DELETE`` ends the session. The cookie lasts until the browser
closes; it holds an HMAC of the key (dependencies.py `session_token`), not the key.

Guessing the key through the log-in is slowed down: a client (by address) with ``MAX_FAILURES``
wrong keys within ``WINDOW_S`` gets 429 with ``Retry-After`` until the oldest of them is
``WINDOW_S`` old, its right key included; every refusal is counted
(``scatterflow_api_logins_refused`` by reason)."""
from __future__ import annotations

import collections
import math
import threading
import time

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from .dependencies import AUTH_RESPONSES, SESSION_COOKIE, Context, check_api_key, keys_match, session_token
from .schemas import ErrorDetail, Login, Session

router = APIRouter()

MAX_FAILURES = 10         # wrong keys per client within WINDOW_S before log-ins are refused
WINDOW_S = 60.0
MAX_CLIENTS = 4096        # clients remembered; beyond, the longest quiet is forgotten


class LoginThrottle:
    """Recent failed log-ins per client address (module docstring); thread-safe."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S,
                 max_clients: int = MAX_CLIENTS, clock=time.monotonic):
        self.max_failures, self.window_s, self.max_clients, self._clock = max_failures, window_s, max_clients, clock
        self._failures: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        with self._lock:
            recent = self._recent(client)
            if len(recent) < self.max_failures:
                return 0.0
            return max(recent[0] + self.window_s - self._clock(), 0.0)

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(self._clock())
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def _recent(self, client: str) -> collections.deque:
        d = self._failures.setdefault(client, collections.deque(maxlen=self.max_failures))
        while d and d[0] <= self._clock() - self.window_s:
            d.popleft()
        return d


@router.post("/api/v1/session", summary="Log in: trade the API key for a session cookie",
             response_model=Session,
             responses={**AUTH_RESPONSES, 429: {"model": ErrorDetail, "description": "too many wrong keys from "
                                                "this address lately (Retry-After: seconds)"}})
def log_in(login: Login, request: Request, response: Response, ctx: Context) -> Session:
    """Check ``api_key`` and set the session cookie; 401 (and no cookie) for a wrong key, 429
    after too many (module docstring). Without a key configured, no cookie is needed and none
    is set."""
    if ctx.api_key is None:
        return Session(authenticated=True, key_required=False)
    throttle: LoginThrottle = request.app.state.login_throttle
    client = request.client.host if request.client is not None else "?"
    wait = throttle.retry_after(client)
    if wait > 0:
        ctx.metrics.logins_refused.labels(reason="throttled").inc()
        raise HTTPException(status_code=429, detail="too many wrong API keys from this address; try again later",
                            headers={"Retry-After": str(math.ceil(wait))})
    if not keys_match(login.api_key.get_secret_value(), ctx.api_key):
        throttle.failed(client)
        ctx.metrics.logins_refused.labels(reason="wrong_key").inc()
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
