"""The live dashboard: its JSON/PNG/SSE routes in-process, and the page itself in headless
Chromium against the real service (0MQ proxy, ingest, worker process, hub) fed by a bluesky
RunEngine driving the simulated beamline, logged in through the page's API key form; the
inversion panel against the app served over HTTP.

The browser test needs Debian's `chromium` and `chromium-driver` (apt) and the `selenium`
package; it is skipped, saying which is missing, when they are not there.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import build_app
from service.metrics import LATENCY_BUCKETS, Metrics
from service.metrics import histogram_quantile
from service.publish.state import PEAK_COLUMNS, RunStore

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver")
                     if p and os.path.exists(p)), None)
SCREENSHOT_COPY = Path("/tmp/sf/dashboard.png")
KEY = "dashboard-test-key"


def peak_rows(seq, final, peak="a", center=None):
    seq = np.asarray(seq, np.int64)
    n = len(seq)
    rows = {"seq_num": seq, "time": 100.0 + seq, "peak": np.array([peak] * n),
            **{c: np.linspace(1, 2, n) for c in PEAK_COLUMNS[3:11]},
            "converged": np.ones(n, bool), "change_point": np.zeros(n, bool), "final": np.full(n, final)}
    if center is not None:
        rows["center"] = np.asarray(center, float)
    return rows


def parse_sse(text: str) -> list[tuple[str, str | None, dict]]:
    """(event, id, data) per message of a text/event-stream body (the WHATWG format)."""
    out = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            fields[key] = value
        if "data" in fields:
            out.append((fields.get("event", "message"), fields.get("id"), json.loads(fields["data"])))
    return out


@pytest.fixture
def app_parts():
    store, metrics = RunStore(), Metrics()
    app = build_app(store, metrics, lambda: {"ok": True}, stream_interval_s=0.05, stream_max_s=0.3)
    return store, metrics, TestClient(app)


def test_static_files_and_page(app_parts):
    _, _, client = app_parts
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in ("static/vendor/uplot/uPlot.iife.min.js", "static/dashboard.js", "static/dashboard.css"):
        assert src in page.text                                  # relative: works behind a path prefix
        r = client.get("/" + src)
        assert r.status_code == 200 and len(r.content) > 1000
    assert "https://" not in page.text and "http://" not in page.text        # nothing from a CDN
    assert "MIT" in client.get("/static/vendor/uplot/LICENSE").text


def test_frame_png(app_parts):
    store, _, client = app_parts
    store.start_run("u1", {"uid": "u1"})
    assert client.get("/api/v1/runs/u1/frame.png").status_code == 404        # no frame yet
    frame = np.full((640, 480), 10, np.int32)
    frame[:, 240:] = 10_000                                     # right half 1000x brighter
    frame[:, 236:244] = 10_000
    frame[300:340, :] = -1                                      # a module gap (masked)
    store.set_latest_frame("u1", 7, frame)
    r = client.get("/api/v1/runs/u1/frame.png", params={"size": 320})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seq-num"] == "7"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    assert img.shape == (320, 240, 3)                           # 2x2 blocks
    viridis = matplotlib.colormaps["viridis"]
    lo = np.round(np.array(viridis(0.0)[:3]) * 255)
    hi = np.round(np.array(viridis(1.0)[:3]) * 255)
    assert np.abs(img[10, 10] - lo).max() <= 1                  # dim side: bottom of the scale
    assert np.abs(img[10, 200] - hi).max() <= 1                 # bright side: top of the scale
    assert (img[160] == 0x55).all()                             # gap rows (300-339 -> 150-169): grey
    small = client.get("/api/v1/runs/u1/frame.png", params={"size": 100, "scale": "linear"})
    assert Image.open(io.BytesIO(small.content)).size == (480 // 7 + 1, 640 // 7 + 1)   # f = ceil(640/100)
    assert client.get("/api/v1/runs/u1/frame.png", params={"scale": "cubic"}).status_code == 422


def test_store_keeps_latest_frames_of_newest_runs():
    store = RunStore()
    for i in range(6):
        store.start_run(f"u{i}", {})
        store.get(f"u{i}").created = 1000.0 + i                           # strictly ordered
        store.set_latest_frame(f"u{i}", 5, np.full((2, 2), i))
    assert [store.latest_frame(f"u{i}") is not None for i in range(6)] == [False, False, True, True, True, True]
    store.set_latest_frame("u5", 4, np.zeros((2, 2)))                     # older frame: ignored
    seq, frame = store.latest_frame("u5")
    assert seq == 5 and frame[0, 0] == 5
    assert store.latest_frame("nope") is None


def test_histogram_quantile_matches_prometheus_rule():
    # Prometheus histogram_quantile: linear interpolation within the bucket holding rank q*N
    m = Metrics()
    for v in [0.003] * 50 + [0.015] * 50:
        m.latency.labels("provisional").observe(v)
    r = TestClient(build_app(RunStore(), m, dict)).get("/api/v1/metrics/summary").json()
    lat = r["latency"]["provisional"]
    assert lat["count"] == 100 and lat["mean_s"] == pytest.approx(0.009)
    assert lat["p50_s"] == pytest.approx(0.005)                 # rank 50: top of the first bucket
    assert lat["p95_s"] == pytest.approx(0.01 + 0.01 * 45 / 50)  # in (0.01, 0.02]
    buckets = [(le, c) for le, c in zip(LATENCY_BUCKETS + (float("inf"),), [1] * 13)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.0025)
    assert histogram_quantile([(1.0, 0), (float("inf"), 4)], 0.5) == 1.0   # beyond the last bound
    assert histogram_quantile([(1.0, 0), (float("inf"), 0)], 0.5) is None


def test_event_stream_incremental_and_resumable(app_parts):
    store, metrics, client = app_parts
    store.start_run("old", {"uid": "old", "time": 1.0})
    time.sleep(0.01)
    store.start_run("new", {"uid": "new", "time": 2.0, "plan_name": "count"})
    store.add_peaks("new", peak_rows([1, 2, 3], False, center=[3.0, np.nan, 3.2]))
    store.add_profiles("new", [3], [103.0], np.linspace(1, 5, 10), "q_nm^-1", np.ones((1, 10)), np.full((1, 10), 0.1))
    store.set_latest_frame("new", 3, np.ones((20, 20), np.int32))
    with client.stream("GET", "/api/v1/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    kinds = [e[0] for e in events]
    assert {"runs", "run", "peaks", "profile", "frame", "status"} <= set(kinds)
    run = next(d for k, _, d in events if k == "run")
    assert run["uid"] == "new" and run["reset"] is True        # 'latest' follows the newest run
    _, pid, peaks = next(e for e in events if e[0] == "peaks")
    assert pid == "new 3" and peaks["next_since"] == 3
    assert peaks["columns"]["center"] == [3.0, None, 3.2]     # NaN travels as null
    prof = next(d for k, _, d in events if k == "profile")
    assert prof["seq_num"] == 3 and prof["peaks"]["seq_num"] == [3] and len(prof["radial"]) == 10
    assert next(d for k, _, d in events if k == "frame") == {"uid": "new", "seq_num": 3}

    # the browser reconnects with Last-Event-ID: only rows after it come again
    store.add_peaks("new", peak_rows([1, 2], True))
    with client.stream("GET", "/api/v1/events", headers={"Last-Event-ID": pid}) as r:
        again = parse_sse(r.read().decode())
    assert next(d for k, _, d in again if k == "run")["reset"] is False
    cols = next(d for k, _, d in again if k == "peaks")["columns"]
    assert cols["seq_num"] == [1, 2] and cols["final"] == [True, True]

    # a pinned run, and the polling fallback for the same rows
    with client.stream("GET", "/api/v1/events", params={"run": "old"}) as r:
        pinned = parse_sse(r.read().decode())
    assert next(d for k, _, d in pinned if k == "run")["uid"] == "old"
    assert not [e for e in pinned if e[0] == "peaks"]
    assert client.get("/api/v1/runs/new/peaks", params={"since": 3}).json()["columns"]["seq_num"] == [1, 2]


def test_api_key_reaches_dashboard_routes():
    """The page is public (it asks for the key); its data need the key, in a header or the
    session cookie, never in the URL."""
    store = RunStore()
    client = TestClient(build_app(store, Metrics(), dict, api_key="k3y", stream_max_s=0.1))
    assert client.get("/").status_code == 200
    for path in ("/api/v1/events", "/api/v1/metrics/summary", "/api/v1/session"):
        assert client.get(path).status_code == 401
        assert client.get(path, params={"api_key": "k3y"}).status_code == 401
    assert client.get("/api/v1/metrics/summary", headers={"x-api-key": "k3y"}).status_code == 200
    assert client.post("/api/v1/session", json={"api_key": "k3y"}).status_code == 200      # cookie kept
    assert client.get("/api/v1/metrics/summary").status_code == 200


def test_bad_stream_options():
    with pytest.raises(ValueError, match="stream_interval_s"):
        build_app(RunStore(), Metrics(), dict, stream_interval_s=0)
    with pytest.raises(ValueError, match="stream_max_s"):
        build_app(RunStore(), Metrics(), dict, stream_max_s=-1)


# --- the page in a real browser against the real service ----------------------------------

def _browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium/chromedriver binary (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service as ChromeService
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=ChromeService(executable_path=CHROMEDRIVER))


def log_in(driver, key: str) -> None:
    """Through the page's key form, as a person would: a wrong key first (refused, said so), then
    `key`; waits until the event stream is connected. The key is in no URL the page loads."""
    form = _wait(lambda: driver.find_element("id", "login-panel").is_displayed(), 20, "no key form on a 401")
    assert form and not driver.execute_script("return window.scatterflow.counts().connected")
    field = driver.find_element("id", "login-key")
    field.send_keys("not-the-key")
    driver.find_element("css selector", "#login-form button").click()
    _wait(lambda: "wrong API key" in driver.find_element("id", "login-error").text, 10, "wrong key not refused")
    assert not driver.get_cookies()
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "#login-form button").click()
    _wait(lambda: driver.execute_script("return window.scatterflow.counts().connected"),
          20, "dashboard did not connect its event stream after logging in")
    assert not driver.find_element("id", "login-panel").is_displayed()
    (cookie,) = driver.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and key not in cookie["value"]
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not [u for u in urls if "api_key" in u or key in u]


def assert_no_browser_errors(driver) -> None:
    """No severe console message but the 401s of the log-in (the page asks for the key on them)."""
    logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
            and not ("api/v1/session" in e["message"] and "401" in e["message"])]
    assert not logs, logs


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise TimeoutError(f"{what} (last: {last!r})")


@pytest.mark.slow
def test_dashboard_in_chromium_with_live_service(tmp_path, free_port, monkeypatch):
    import msgpack
    import msgpack_numpy
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    from service.commands.loopback import start_proxy
    from service.config import load_settings
    from service.publish.hub import PublishHub
    from service.server import Service
    from service.sim import make_beamline, operando_cycle, write_default_poni

    driver = _browser(tmp_path)
    from selenium.webdriver.support.ui import Select

    if "set_latest_frame" not in PublishHub.frame_accepted.__code__.co_names:
        # until the hub keeps the latest raw frame itself (service/publish/hub.py)
        accepted = PublishHub.frame_accepted

        def frame_accepted(self, frame):
            accepted(self, frame)
            self.store.set_latest_frame(frame.run_uid, frame.seq_num, frame.data)
        monkeypatch.setattr(PublishHub, "frame_accepted", frame_accepted)

    class NoTiledService(Service):            # the dashboard reads the in-memory state only
        def _start_tiled(self):
            return None

    n_frames, npt = 24, 400
    poni = write_default_poni(tmp_path / "geometry.poni")
    det, light = make_beamline(frame_interval=1.0, seed=5)
    np.save(tmp_path / "mask.npy", det.simulator.mask)
    in_port, out_port = start_proxy()
    settings = load_settings(None, **{
        "ingest": {"address": f"tcp://127.0.0.1:{out_port}"},
        "geometry": {"poni": poni, "mask": str(tmp_path / "mask.npy")},
        "reduction": {"npt": npt},
        "fit": {"regularizer": {"window": 4}},
        "api": {"port": free_port(), "api_key": KEY},
        "results": {"address": None},
    })
    service = NoTiledService(settings).start()
    shots = []
    try:
        url = f"http://127.0.0.1:{service.api_port}/"
        driver.get(url)                                          # the page is up before the run
        log_in(driver, KEY)
        time.sleep(1.0)                                          # 0MQ slow joiner

        RE = RunEngine({}, context_managers=[])                  # not the main thread: no SIGINT handler
        publisher = Publisher(f"127.0.0.1:{in_port}",
                              serializer=functools.partial(msgpack.packb, default=msgpack_numpy.encode))
        RE.subscribe(publisher)
        uids = []
        plan = operando_cycle(det, light, n_frames=n_frames, schedule=[(0, "dark"), (8, "uv"), (16, "visible")],
                              delay=0.4)
        runner = threading.Thread(target=lambda: uids.extend(RE(plan)), daemon=True)
        runner.start()

        counts = lambda: driver.execute_script("return window.scatterflow.counts()")   # noqa: E731
        early = _wait(lambda: (c := counts())["provisional"] >= 3 * 4 and c, 90, "no fitted frames on the page")
        shots.append(tmp_path / "dashboard-early.png")
        driver.save_screenshot(str(shots[-1]))
        runner.join(120)
        publisher.close()
        uid = uids[0]
        _wait(lambda: service.store.get(uid).status != "running", 60, "run did not finish")
        store_rows, _ = service.store.peaks_since(uid, 0, final=True)
        n_peaks = len(set(store_rows["peak"]))
        late = _wait(lambda: (c := counts())["final"] == n_peaks * n_frames and c, 30,
                     "final fits did not all reach the page")
        _wait(lambda: counts()["frameShown"] is not None, 15, "the frame image did not load")
        late = counts()

        # the plots grew while frames arrived, and hold what the API holds
        assert early["uid"] == late["uid"] == uid                     # followed the new run by itself
        assert early["provisional"] < late["provisional"] == n_peaks * n_frames
        assert late["peaks"] == n_peaks == 3
        assert late["changePoints"] == int(np.sum(store_rows["change_point"]))
        assert late["profileBins"] == npt and late["profileSeq"] == n_frames
        for peak in ("lamellar", "pi_pi"):
            shown = driver.execute_script(
                f"return window.scatterflow.state.cards.get('{peak}').charts[0].data[2]")
            mine = sorted((s, c) for s, c, p in zip(store_rows["seq_num"], store_rows["center"],
                                                    store_rows["peak"]) if p == peak)
            np.testing.assert_allclose(shown, [c for _, c in mine], rtol=1e-12)
        assert driver.execute_script("return document.getElementById('frame-img').naturalWidth") > 100
        assert driver.execute_script("return window.scatterflow.counts().frameShown") >= 1
        # received / fitted / final in the health panel (refreshed once a second)
        _wait(lambda: f"{n_frames} / {n_frames} / {n_frames}" in driver.find_element("id", "health").text,
              10, "health panel did not show the finished run")
        assert "live" in driver.find_element("id", "conn").text
        assert "frames failed: this run / since service start 0 / 0" in driver.find_element("id", "health").text
        # the phase timeline: each frame's final label behind the crystallinity, the transitions listed
        phase_cols, _, transitions = service.store.phases_since(uid, 0, final=True)
        shown = _wait(lambda: (c := counts())["phaseRows"] == len(phase_cols["seq_num"]) and c, 10,
                      "phases not on the page")
        assert shown["phaseRows"] == n_frames and shown["transitions"] == len(transitions) >= 1
        assert driver.find_element("id", "phase-panel").is_displayed()
        listed = driver.find_element("id", "phase-transitions").text.splitlines()
        assert [line.split(" at frame ")[0] for line in listed] == [f"{t['from']} → {t['to']}" for t in transitions]
        # trajectory charts share the page width between the peaks (not a quarter of it each)
        page = driver.execute_script("return document.getElementById('trajectories').clientWidth")
        cards = driver.execute_script("return [...document.querySelectorAll('.peak-card')].map(c => c.clientWidth)")
        assert len(cards) == 3 and sum(cards) > 0.9 * page
        charts = driver.execute_script("return [...document.querySelectorAll('.peak-card canvas')].map("
                                       "c => c.getBoundingClientRect().width)")
        assert charts and max(charts) <= max(cards)                   # no chart wider than its card
        # x axis in seconds since the run started: same points, times of the events
        Select(driver.find_element("id", "x-mode")).select_by_value("time")
        xs = _wait(lambda: driver.execute_script(
            "const c = window.scatterflow.state.cards.get('lamellar'); return c && c.charts[0].data[0]"),
            5, "trajectories not redrawn against time")
        assert len(xs) == n_frames and np.all(np.diff(xs) > 0) and 0 <= xs[0] < 30
        Select(driver.find_element("id", "x-mode")).select_by_value("frame")
        _wait(lambda: driver.execute_script(
            "const c = window.scatterflow.state.cards.get('lamellar'); return c && c.charts[0].data[0][0] === 1"),
            5, "trajectories not redrawn against frame")
        shots.append(tmp_path / "dashboard.png")
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots[-1]))
        for shot in shots:
            assert Image.open(shot).size[0] >= 1000
        try:
            SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shots[-1], SCREENSHOT_COPY)
        except OSError:
            pass
        assert_no_browser_errors(driver)
        # logging out closes the stream and asks for the key again
        driver.find_element("id", "logout").click()
        _wait(lambda: driver.find_element("id", "login-panel").is_displayed(), 10, "log-out did not show the form")
        assert not counts()["connected"] and not driver.get_cookies()
    finally:
        driver.quit()
        service.close()


def test_inversion_panel_in_chromium(tmp_path):
    """The inversion panel against the app over real HTTP: hidden while the run has no inversion
    rows; then each parameter of the model per frame with its band, the verdict strip with its
    counts and the model's name; new rows fetched from where the last poll ended (since=)."""
    from live_app import serve
    from test_api_docs import inversion_columns

    driver = _browser(tmp_path)
    store = RunStore()
    store.start_run("u1", {"uid": "u1", "plan_name": "growth", "time": 100.0})
    app = build_app(store, Metrics(), dict, stream_interval_s=0.1, stream_max_s=5)
    counts = lambda: driver.execute_script("return window.scatterflow.counts()")   # noqa: E731
    try:
        with serve(app) as base:
            driver.get(base + "/")
            _wait(lambda: counts()["connected"] and counts()["uid"] == "u1", 20, "dashboard did not connect")
            _wait(lambda: driver.execute_script("return window.scatterflow.state.inversion.last > 0"), 10,
                  "inversion never polled")
            assert not driver.find_element("id", "inversion-panel").is_displayed()

            chi2 = [1.0] * 6 + [1.6, 1.7] + [12.0, 15.0]            # 6 good, 2 poor, 2 bad
            store.add_inversion("u1", inversion_columns(range(1, 11), np.linspace(5, 7, 10), chi2))
            _wait(lambda: counts()["inversionRows"] == 10, 15, "inversion rows not on the page")
            assert driver.find_element("id", "inversion-panel").is_displayed()
            assert counts()["inversionParams"] == 5                  # radius, pd, volfraction, i0, background
            assert "sphere_hs" in driver.find_element("id", "inversion-model").text
            assert driver.find_element("id", "inversion-counts").text.split() == ["good", "6", "poor", "2", "bad", "2"]
            assert "reduced χ² > 4" in driver.find_element("id", "inversion-panel").text
            radius = driver.execute_script(
                "return window.scatterflow.state.inversion.charts.get('radius').data")
            np.testing.assert_allclose(radius[1], np.linspace(5, 7, 10))
            np.testing.assert_allclose(np.subtract(radius[3], radius[2]), 2 * 0.02 * np.linspace(5, 7, 10))

            store.add_inversion("u1", inversion_columns([11, 12], [7.2, 7.4], [1.0, 30.0]))
            _wait(lambda: counts()["inversionRows"] == 12, 15, "new inversion rows not on the page")
            inv = driver.execute_script("const i = window.scatterflow.state.inversion; "
                                        "return {since: i.since, seqs: i.rows.map(r => r.seq_num)}")
            assert inv == {"since": 12, "seqs": list(range(1, 13))}  # each frame once: polled from since
            assert driver.find_element("id", "inversion-counts").text.split()[-1] == "3"
            driver.save_screenshot(str(tmp_path / "inversion.png"))
            assert_no_browser_errors(driver)
            driver.get("about:blank")                                # closes the event stream
    finally:
        driver.quit()
