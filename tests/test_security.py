"""Security: the REST API is read-only and behind its key (a header, or the dashboard's session
cookie; never a query parameter), exposure without a key is a one-line configuration error, and
keys never reach logs, status, run metadata or the spool."""
import logging
import secrets
import time

import httpx
import numpy as np
import pytest
from event_model import compose_run
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api import build_app
from service.config import is_loopback, load_settings
from service.errors import ConfigError
from service.metrics import Metrics
from service.publish.state import PEAK_COLUMNS, RunStore

from live_app import serve

KEY = "sf" + secrets.token_hex(16)
PUBLIC = {"/", "/docs", "/redoc"}          # the dashboard's page and the API docs: no data
SESSION = "/api/v1/session"                # POST logs in, DELETE logs out: they set and clear a cookie


def populated_app(api_key):
    """The app over a store with one run holding a profile, peak rows and a frame, so that every
    route can answer 200."""
    store, metrics = RunStore(), Metrics()
    store.start_run("u1", {"uid": "u1", "plan_name": "count"})
    store.add_profiles("u1", [1], [0.0], np.linspace(1, 2, 5), "q_nm^-1", np.ones((1, 5)), np.ones((1, 5)))
    n = 2
    store.add_peaks("u1", {"seq_num": np.array([1, 1]), "time": np.zeros(n), "peak": np.array(["a", "b"]),
                           **{c: np.ones(n) for c in PEAK_COLUMNS[3:11]}, "converged": np.ones(n, bool),
                           "change_point": np.zeros(n, bool), "final": np.zeros(n, bool)})
    store.set_latest_frame("u1", 1, np.arange(64, dtype=np.float32).reshape(8, 8))
    app = build_app(store, metrics, lambda: {"ok": True}, api_key=api_key, stream_interval_s=0.01,
                    stream_max_s=0.05)
    return app, TestClient(app)


def concrete_paths(app):
    """Every GET route behind the key, with its path parameters filled in (uid -> the stored run)."""
    return [r.path.replace("{uid}", "u1") for r in app.routes
            if isinstance(r, APIRoute) and "GET" in r.methods and r.path not in PUBLIC]


def test_every_route_is_read_only():
    app, client = populated_app(KEY)
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 10
    for r in routes:
        assert r.methods <= ({"GET", "POST", "DELETE"} if r.path == SESSION else {"GET", "HEAD"}), (r.path, r.methods)
    auth = {"X-API-Key": KEY}
    for path in [*concrete_paths(app), *PUBLIC, "/static/dashboard.js", "/static/docs/swagger-ui.css"]:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            if path == SESSION and method in ("POST", "DELETE"):
                continue
            assert client.request(method, path, headers=auth).status_code == 405, (method, path)


@pytest.mark.parametrize("header", [{}, {"X-API-Key": "wrong"}, {"Authorization": f"Bearer {KEY}x"},
                                    {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY[:-1]},
                                    {"Cookie": f"scatterflow_session={KEY}"}])     # the cookie holds no key
def test_every_route_refuses_a_missing_or_wrong_key(header):
    app, client = populated_app(SecretStr(KEY))        # as the configuration hands it over
    for path in concrete_paths(app):
        r = client.get(path, headers=header)
        assert r.status_code == 401, (path, header, r.status_code)
        assert KEY not in r.text
        assert client.get(path, params={"api_key": KEY}).status_code == 401, path     # never in a URL


CORE = {"/api/v1/health", "/api/v1/status", "/api/v1/runs", "/api/v1/runs/u1", "/api/v1/runs/u1/peaks",
        "/api/v1/runs/u1/profiles", "/api/v1/runs/u1/latest", "/api/v1/runs/u1/frame.png",
        "/api/v1/metrics/summary", "/api/v1/events", "/metrics", SESSION}


def answer_all(client, paths, **kw):
    """Every path answers 200 (routes added later may answer 404 when the stored run lacks their data)."""
    assert CORE <= set(paths)
    for path in paths:
        r = client.get(path, **kw)
        assert r.status_code == 200 if path in CORE else r.status_code in (200, 404), (path, kw, r.status_code)


@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_every_route_answers_with_the_key(how):
    app, client = populated_app(KEY)
    answer_all(client, concrete_paths(app),
               headers={"x-api-key": {"X-API-Key": KEY}, "bearer": {"Authorization": f"Bearer {KEY}"}}[how])
    for path in [*PUBLIC, "/static/dashboard.js", "/static/docs/swagger-ui-bundle.js"]:
        assert client.get(path).status_code == 200, path     # the dashboard's page and code, the docs: public


def test_session_cookie_over_http():
    """Over real HTTP: the dashboard trades the key for a cookie (POST /api/v1/session) that alone
    opens every route, the event stream and the frame PNG included; a wrong key gets 401 and no
    cookie; the cookie is HttpOnly and SameSite=Strict, Secure when the request came over https
    (here through a TLS-terminating proxy on loopback: X-Forwarded-Proto), and holds no key; DELETE
    ends the session."""
    app, _ = populated_app(KEY)
    with serve(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/api/v1/runs").status_code == 401
        assert client.get(SESSION).status_code == 401
        for bad in ({"api_key": "wrong"}, {"api_key": ""}, {"api_key": KEY[:-1]}):
            r = client.post(SESSION, json=bad)
            assert r.status_code == 401 and "set-cookie" not in r.headers and not client.cookies, bad
            assert r.json() == {"detail": "wrong API key"}
        assert client.post(SESSION, json={"key": KEY}).status_code == 422             # names the missing field
        assert client.post(SESSION, content=b"not json").status_code == 422
        assert not client.cookies

        r = client.post(SESSION, json={"api_key": KEY})
        assert r.status_code == 200 and r.json() == {"authenticated": True, "key_required": True}
        cookie = r.headers["set-cookie"]
        attrs = {a.strip().partition("=")[0].lower(): a.strip().partition("=")[2] for a in cookie.split(";")}
        assert attrs["samesite"].lower() == "strict" and "httponly" in attrs and "secure" not in attrs
        assert attrs["path"] == "/" and KEY not in cookie and "max-age" not in attrs     # until the browser closes
        answer_all(client, concrete_paths(app))                                          # the cookie alone
        with client.stream("GET", "/api/v1/events") as events:
            assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
        assert client.get("/api/v1/runs/u1/frame.png").headers["content-type"] == "image/png"

        over_https = httpx.post(f"{base}{SESSION}", json={"api_key": KEY}, headers={"X-Forwarded-Proto": "https"})
        assert "secure" in over_https.headers["set-cookie"].lower()

        r = client.delete(SESSION)
        assert r.status_code == 200 and r.json() == {"authenticated": False, "key_required": True}
        assert 'scatterflow_session=""' in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()
        assert not client.cookies and client.get("/api/v1/runs").status_code == 401
        assert httpx.get(f"{base}/api/v1/runs", params={"api_key": KEY}).status_code == 401   # never in a URL


def test_wrong_keys_are_throttled_per_address():
    """Over real HTTP: ten wrong keys in a minute from one address, and the eleventh log-in, the
    right key too, gets 429 with Retry-After (at most the window); every refusal is counted by
    reason in /metrics; other addresses are not held back, and the window's end frees the address
    (the throttle's own clock, advanced by hand)."""
    from service.api.session import MAX_FAILURES, WINDOW_S, LoginThrottle

    app, _ = populated_app(KEY)
    with serve(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(MAX_FAILURES):
            assert client.post(SESSION, json={"api_key": "guess"}).status_code == 401
        r = client.post(SESSION, json={"api_key": KEY})
        assert r.status_code == 429 and not client.cookies
        assert 0 < int(r.headers["retry-after"]) <= WINDOW_S
        text = client.get("/metrics", headers={"X-API-Key": KEY}).text
        assert f'scatterflow_api_logins_refused_total{{reason="wrong_key"}} {float(MAX_FAILURES)}' in text
        assert 'scatterflow_api_logins_refused_total{reason="throttled"} 1.0' in text
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(MAX_FAILURES):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == WINDOW_S and throttle.retry_after("10.0.0.2") == 0.0
    now[0] = WINDOW_S / 2
    assert throttle.retry_after("10.0.0.1") == WINDOW_S / 2
    now[0] = WINDOW_S + 0.1
    assert throttle.retry_after("10.0.0.1") == 0.0


def test_dashboard_never_puts_the_key_in_a_url():
    """The page and its code hold no ``api_key=`` (the key travels in the log-in POST's body only)."""
    _, client = populated_app(KEY)
    for path in ("/", "/static/dashboard.js"):
        r = client.get(path)
        assert r.status_code == 200 and "api_key=" not in r.text, path


def test_no_key_configured_means_open_on_loopback():
    app, client = populated_app(None)
    assert client.get("/api/v1/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get(SESSION).json() == {"authenticated": True, "key_required": False}
    r = client.post(SESSION, json={"api_key": "anything"})            # nothing to check, no cookie
    assert r.json() == {"authenticated": True, "key_required": False} and "set-cookie" not in r.headers
    _, client = populated_app(SecretStr(""))           # an empty key is no key
    assert client.get("/api/v1/runs").status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "beamline-ws.example.org", "", "127.0.0.1.nip.io"])
def test_exposed_api_without_key_is_a_one_line_config_error(tmp_path, monkeypatch, host):
    monkeypatch.delenv("SCATTERFLOW_API__API_KEY", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"api: {{host: '{host}', port: 8000}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "api.api_key" in msg and repr(host) in msg
    with pytest.raises(ConfigError):
        load_settings(cfg, api={"host": host, "api_key": ""})       # empty is not a key
    monkeypatch.setenv("SCATTERFLOW_API__API_KEY", KEY)              # the environment provides it
    s = load_settings(cfg)
    assert s.api.api_key.get_secret_value() == KEY


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_hosts_need_no_key(host):
    assert is_loopback(host)
    assert load_settings(None, api={"host": host}).api.api_key is None


def test_key_masked_in_settings_and_config_errors(tmp_path):
    s = load_settings(None, api={"host": "0.0.0.0", "api_key": KEY})
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.api), str(s.model_dump(mode="json"))):
        assert KEY not in text
    cfg = tmp_path / "c.yaml"                     # an error elsewhere in the section does not echo the key
    cfg.write_text(f"api: {{host: 0.0.0.0, api_key: {KEY}, port: not-a-port}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert KEY not in str(info.value) and "api.port" in str(info.value)


def test_tiled_key_masked_in_settings():
    s = load_settings(None, tiled={"api_key": KEY})
    assert KEY not in repr(s)


def test_service_never_logs_or_serves_its_keys(free_port, tmp_path, caplog, capfd, monkeypatch):
    """The real service (ingest, dispatcher with a worker process, hub, Tiled publisher, REST)
    started with both keys, a run routed through it: neither key appears in the log (all
    loggers at DEBUG), stdout/stderr, /api/v1/status, the run metadata sent to Tiled and the
    results stream, or the Tiled spool on disk (Tiled is unreachable, so writes are spooled)."""
    from service.server import Service
    tiled_key = "tk" + secrets.token_hex(16)
    caplog.set_level(logging.DEBUG)
    import tiled.client.utils                                 # spool at once: no Tiled server is listening
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{free_port()}"}, results={"address": None},
                             api={"port": free_port(), "api_key": KEY},
                             tiled={"uri": f"http://127.0.0.1:{free_port()}/api/v1", "api_key": tiled_key,
                                    "directory": str(tmp_path / "tiled"), "flush_seconds": 0.05},
                             workers={"count": 1, "device": "cpu"})
    service = Service(settings).start()
    try:
        bundle = compose_run(metadata={"plan_name": "count", "sample": "film"})
        service.router.route("start", bundle.start_doc)
        service.router.route("stop", bundle.compose_stop())
        base = f"http://127.0.0.1:{service.api_port}"
        status = httpx.get(f"{base}/api/v1/status", headers={"X-API-Key": KEY}, timeout=10)
        runs = httpx.get(f"{base}/api/v1/runs", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert status.status_code == 200 and runs.status_code == 200
        assert httpx.get(f"{base}/api/v1/status", timeout=10).status_code == 401
        deadline = time.monotonic() + 10
        spool = tmp_path / "tiled" / "spool"
        while time.monotonic() < deadline and not any(spool.glob("*")):
            time.sleep(0.1)
        config_sent = str(service.hub.config)
    finally:
        if getattr(service, "tiled", None) is not None:
            service.tiled.close(timeout=0.5)                  # the spool stays; no 30 s drain attempt
        service.close()
    out, err = capfd.readouterr()
    spooled = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    assert spooled, "nothing was spooled: the metadata path was not exercised"
    assert "tiled" in config_sent and "api" in config_sent
    for key in (KEY, tiled_key):
        assert key not in caplog.text
        assert key not in out and key not in err
        assert key not in status.text and key not in runs.text
        assert key not in config_sent
        assert key.encode() not in spooled


def test_embedded_tiled_on_its_port_with_its_key_in_an_owner_only_file(free_port, tmp_path, caplog):
    """Without tiled.api_key the embedded server's random key is written to <directory>/api_key
    (mode 0600, not logged), on the configured tiled.port: another process's stock tiled client
    reads the service's data with it."""
    import stat

    from tiled.client import from_uri

    from service.server import Service
    caplog.set_level(logging.DEBUG)
    port = free_port()
    service = Service(load_settings(None, tiled={"directory": str(tmp_path / "tiled"), "port": port}))
    service._start_tiled()
    try:
        key_file = tmp_path / "tiled" / "api_key"
        assert service.tiled_key_file == key_file and service.tiled_uri == f"http://127.0.0.1:{port}/api/v1"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert len(key) == 64 and key not in caplog.text and str(key_file) in caplog.text
        assert "scatterflow" not in from_uri(f"http://127.0.0.1:{port}/api/v1", api_key=key)   # reads, empty
    finally:
        for close in reversed(service._closers):
            close()


def test_ingest_through_a_curve_proxy_only_with_its_keys(free_port, tmp_path):
    """bluesky's own Proxy with CURVE on its out side (ServerCurve, only this client's public key
    allowed): ingest configured with its key pair and the proxy's public key receives a
    RunEngine's documents encrypted; a subscriber without keys receives nothing."""
    import threading

    import zmq.auth
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Proxy, Publisher, ServerCurve
    from bluesky.plans import count
    from ophyd.sim import det

    from service.config import IngestConfig
    from service.ingest import DocumentRouter, ZmqSubscriber

    from helpers import RecordingSink
    from test_ingest import pack

    server_dir, clients_dir = tmp_path / "server", tmp_path / "clients"
    server_dir.mkdir(), clients_dir.mkdir()
    _, server_secret = zmq.auth.create_certificates(server_dir, "proxy")
    client_public, client_secret = zmq.auth.create_certificates(tmp_path, "scatterflow")
    (clients_dir / "scatterflow.key").write_bytes(open(client_public, "rb").read())
    in_port, out_port = free_port(), free_port()
    proxy = Proxy(in_port, out_port, out_curve=ServerCurve(secret_path=server_secret,
                                                           client_public_keys=clients_dir, allow=None))
    threading.Thread(target=proxy.start, daemon=True).start()

    def subscriber(**curve):
        sink = RecordingSink()
        config = IngestConfig(address=f"tcp://127.0.0.1:{out_port}", **curve)
        sub = ZmqSubscriber(config, DocumentRouter(sink, Metrics(), config), Metrics())
        sub.start()
        return sink, sub
    keyed, keyed_sub = subscriber(curve_secret_key=str(client_secret),
                                  curve_server_public_key=str(server_dir / "proxy.key"))
    plain, plain_sub = subscriber()
    publisher = Publisher(f"127.0.0.1:{in_port}", serializer=pack)
    try:
        # 0MQ slow joiners and the CURVE handshake: a message nobody routes (refused, counted) until
        # the keyed subscriber receives one
        deadline = time.monotonic() + 20
        while keyed_sub.received == 0 and time.monotonic() < deadline:
            publisher("warm-up-not-a-document", {})
            time.sleep(0.2)
        warmups = plain_sub.received
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(publisher)
        (uid,) = RE(count([det], num=3))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not keyed.stopped:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        keyed_sub.stop(), plain_sub.stop()
        publisher.close()
    assert keyed.started == [uid] and [(u, s["exit_status"]) for u, s in keyed.stops] == [(uid, "success")]
    assert plain.started == [] and plain_sub.received == warmups == 0
    with pytest.raises(ValueError, match="go together"):
        IngestConfig(curve_secret_key=str(client_secret))
