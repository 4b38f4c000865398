"""Adaptive plans against the real service: RunEngine + simulated beamline -> bluesky's 0MQ Proxy
(thread) -> `Service` in-process (real worker process, results stream, REST API) -> followers
(0MQ and REST) -> plan stubs that switch the simulated light. Decisions are checked against the
simulator's truth carried in the event documents (``det_lamellar_area_truth``)."""
import functools
import socket
import threading
import time

import msgpack
import msgpack_numpy
import numpy as np
import pytest

pytestmark = pytest.mark.slow
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
FADE, RECOVER = 30.0, 45.0          # lamellar area: 60 crystalline, 6 under UV (flux 1, 1 s)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service with everything but Tiled (not under test here; the embedded server costs
    10-20 s to start): results stream and REST API on free ports, fed by a bluesky Proxy."""
    from bluesky.callbacks.zmq import Proxy

    from service.config import TiledConfig, load_settings
    from service.server import Service
    from service.sim import FrameSimulator

    class NoTiledService(Service):          # for a Service without the tiled.enabled setting
        def _start_tiled(self):
            self.tiled = None
            return None

    tmp = tmp_path_factory.mktemp("adaptive")
    mask = tmp / "mask.npy"
    np.save(mask, FrameSimulator().mask)
    in_port, out_port = _port(), _port()
    threading.Thread(target=Proxy(in_port, out_port).start, name="0mq-proxy", daemon=True).start()
    settings = load_settings(**{
        "ingest": {"address": f"tcp://127.0.0.1:{out_port}"},
        "geometry": {"mask": str(mask)},                  # PONI from the start document
        "reduction": {"npt": 600},
        "fit": {"regularizer": {"window": 8}},
        "workers": {"device": "cpu"},
        "api": {"port": _port()},
        "results": {"address": f"tcp://127.0.0.1:{_port()}"},
        **({"tiled": {"enabled": False}} if "enabled" in TiledConfig.model_fields else {}),
    })
    svc = (Service if "enabled" in TiledConfig.model_fields else NoTiledService)(settings).start()
    svc.proxy_in = in_port
    time.sleep(1.0)                                       # slow joiner: service SUB -> proxy
    yield svc
    svc.close()


@pytest.fixture
def rest_url(service):
    return f"http://127.0.0.1:{service.api_port}"


@pytest.fixture
def follower(service):
    from service.plans.feedback import ResultsFollower
    f = ResultsFollower(service.settings.results.address)
    assert f.wait_connected(5)
    yield f
    f.close()


class Beamline:
    """Simulated detector + light, a RunEngine publishing to the proxy, the documents kept."""

    def __init__(self, service, **cycle_kwargs):
        from bluesky import RunEngine
        from bluesky.callbacks.zmq import Publisher

        from service.sim import AzoCycle, make_beamline
        self.det, self.light = make_beamline(cycle=AzoCycle(**cycle_kwargs), frame_interval=1.0, seed=5)
        self.RE = RunEngine({}, call_returns_result=True)
        self.publisher = Publisher(f"127.0.0.1:{service.proxy_in}", serializer=pack)
        self.RE.subscribe(self.publisher)
        self.docs = []
        self.RE.subscribe(lambda name, doc: self.docs.append((name, doc)))
        time.sleep(0.3)                                   # slow joiner: publisher -> proxy

    def events(self):
        """Per event (seq_num order): light state and the truth of the lamellar area."""
        ev = [d for n, d in self.docs if n == "event"]
        return ([e["data"]["light_state"] for e in ev],
                np.array([e["data"]["det_lamellar_area_truth"] for e in ev]))

    def close(self):
        self.publisher.close()


def test_adaptive_cycle_follows_fitted_area(service, follower, rest_url):
    from service.plans.feedback import RestFollower
    from service.plans.stubs import adaptive_uv_cycle

    bl = Beamline(service)
    rest = RestFollower(rest_url, interval=0.1)
    max_lag = 2
    try:
        t0 = time.monotonic()
        res = bl.RE(adaptive_uv_cycle(bl.det, bl.light, follower, fade_threshold=FADE,
                                      recover_threshold=RECOVER, max_frames=60, dark_frames=3,
                                      max_lag=max_lag, delay=0.05, timeout=40)).plan_result
        elapsed = time.monotonic() - t0
        uid = res.uid
        lights, truth = bl.events()
        print(f"{res.frames} frames in {elapsed:.1f} s; switched after {res.switched_after}; "
              f"{res.phases}")
        stop = [d for n, d in bl.docs if n == "stop"][0]
        assert stop["exit_status"] == "success"
        assert len(lights) == res.frames <= 60
        # light history in the data: dark, UV, visible, each from where the plan switched
        n_fade, n_rec = res.switched_after["fade"], res.switched_after["recover"]
        assert lights == ["dark"] * 3 + ["uv"] * (n_fade - 3) + ["visible"] * (n_rec - n_fade)

        # fade: the frame whose fit triggered the switch really had faded (truth), the switch
        # came within max_lag + 1 frames of that frame, and that frame is at most one frame
        # after the first frame whose true area crossed the threshold
        fade = res.phases["fade"].value
        seq = np.arange(1, len(truth) + 1)
        assert 3 < fade.seq_num <= n_fade
        assert fade.value < FADE and abs(fade.value - truth[fade.seq_num - 1]) < 4 * fade.err + 1.0
        assert truth[fade.seq_num - 1] < FADE + 1.5
        crossing = seq[(seq > 3) & (truth < FADE)][0]
        assert crossing - 1 <= fade.seq_num <= crossing + 1
        assert n_fade - fade.seq_num <= max_lag + 1
        assert truth[n_fade - 1] < FADE                  # the last UV frame: still faded
        # recovery: the same the other way, and the run ended there
        rec = res.phases["recover"].value
        assert n_fade < rec.seq_num <= n_rec == res.frames
        assert rec.value > RECOVER and truth[rec.seq_num - 1] > RECOVER - 1.5
        crossing = seq[(seq > n_fade) & (truth > RECOVER)][0]
        assert crossing - 1 <= rec.seq_num <= crossing + 1
        assert n_rec - rec.seq_num <= max_lag + 1 and truth[n_rec - 1] > RECOVER

        # the analysis run completes; both followers end with the same final values
        assert follower.wait_for(uid, lambda r: r.status == "complete", 30)
        assert rest.wait_for(uid, lambda r: r.status == "complete", 30)
        for f in (follower, rest):
            final = f.history(uid, "lamellar", "area", final=True)
            assert sorted(v.seq_num for v in final) == list(range(1, res.frames + 1))
        zmq_final = sorted(follower.history(uid, "lamellar", "center", final=True))
        assert sorted(rest.history(uid, "lamellar", "center", final=True)) == zmq_final
        assert follower.latest(uid, "lamellar", "area", final=True).seq_num == res.frames
        assert follower.stats["lost"] == 0 and follower.stats["orphans"] == 0

        # a follower that joins after the run missed its start: REST fallback fills it in
        from service.plans.feedback import ResultsFollower
        with ResultsFollower(service.settings.results.address, rest_url=rest_url,
                             rest_grace=0.2) as late:
            assert late.wait_for(uid, lambda r: r.status == "complete"
                                 and r.last_seq[True] == res.frames, 10)
            assert sorted(late.history(uid, "lamellar", "center", final=True)) == zmq_final
    finally:
        rest.close()
        bl.close()


def test_timeout_and_frame_budget(service, follower):
    import bluesky.plan_stubs as bps

    from service.plans.stubs import FeedbackTimeout, _cycle_metadata, wait_for_fit

    bl = Beamline(service)
    out = {}
    never = lambda v, e: v < -1e9                                   # noqa: E731

    def plan():
        uid = yield from bps.open_run(_cycle_metadata(bl.det, bl.light, "timeout_test", {}))
        yield from bps.trigger_and_read([bl.det, bl.light])
        # keeps acquiring for the whole timeout, then returns a false result
        out["timeout"] = yield from wait_for_fit(follower, uid, "lamellar", "area", never,
                                                 timeout=1.5, detectors=[bl.det, bl.light], delay=0.05,
                                                 after_seq=1, raise_on_timeout=False)
        # frame budget exhausted before the timeout
        out["budget"] = yield from wait_for_fit(follower, uid, "lamellar", "area", never,
                                                timeout=60, detectors=[bl.det, bl.light],
                                                after_seq=1 + out["timeout"].reads, max_reads=3,
                                                raise_on_timeout=False)
        # no detectors: waits, then raises
        t = time.monotonic()
        try:
            yield from wait_for_fit(follower, uid, "lamellar", "center", never, timeout=1.0, poll=0.05)
        except FeedbackTimeout as exc:
            out["raised"], out["raised_after"] = exc, time.monotonic() - t
        yield from wait_for_fit(follower, uid, "lamellar", "fwhm", never, timeout=0.5)
        yield from bps.close_run()

    try:
        with pytest.raises(FeedbackTimeout, match="lamellar fwhm condition not met"):
            bl.RE(plan())
    finally:
        bl.close()
    r = out["timeout"]
    assert not r and r.reason == "timeout" and r.value is None
    assert 1.5 <= r.waited_s < 3.0 and r.reads >= 5              # the experiment went on
    b = out["budget"]
    assert not b and b.reason == "max_reads" and b.reads == 3
    assert 1.0 <= out["raised_after"] < 2.0 and out["raised"].result.reads == 0
    assert out["raised"].result.reason == "timeout"
    events = [d for n, d in bl.docs if n == "event"]
    assert len(events) == 1 + r.reads + 3
    stop = [d for n, d in bl.docs if n == "stop"][0]
    assert stop["exit_status"] == "fail" and "fwhm" in stop["reason"]


def test_change_point_switches_light_over_rest(service, rest_url):
    """Step kinetics (instant switching): the UV switch is a change point; the REST follower
    sees it and the stub turns the light off within max_lag + 1 frames."""
    import bluesky.plan_stubs as bps

    from service.plans.feedback import RestFollower
    from service.plans.stubs import _cycle_metadata, switch_on_change_point

    bl = Beamline(service, step=True)
    rest = RestFollower(rest_url, interval=0.05)
    out = {}

    def plan():
        uid = yield from bps.open_run(_cycle_metadata(bl.det, bl.light, "change_point_test", {}))
        for _ in range(5):
            yield from bps.trigger_and_read([bl.det, bl.light])
            yield from bps.sleep(0.05)
        yield from bps.mv(bl.light, "uv")
        out["res"] = yield from switch_on_change_point(
            rest, uid, bl.light, "dark", timeout=20, detectors=[bl.det, bl.light], delay=0.05,
            after_seq=5, max_lag=1, max_reads=20)
        yield from bps.trigger_and_read([bl.det, bl.light])
        yield from bps.close_run()
        return uid

    try:
        uid = bl.RE(plan()).plan_result
    finally:
        bl.close()
    res = out["res"]
    lights, truth = bl.events()
    print(res, lights, np.round(truth, 1))
    assert truth[4] == pytest.approx(60, rel=1e-9) and truth[5] == pytest.approx(6, rel=1e-9)
    assert res and res.value.seq_num == 6                    # the first UV frame
    n = 5 + res.reads
    assert lights == ["dark"] * 5 + ["uv"] * res.reads + ["dark"]
    assert n - res.value.seq_num <= 1 + 1
    assert rest.wait_for(uid, lambda r: r.status == "complete", 30)
    assert 6 in rest.change_points(uid)
    rest.close()


def test_follower_against_publisher():
    """ResultsFollower on the ResultsPublisher alone: latest = highest seq_num, history, change
    points, status; a follower that joined late counts the events it cannot place."""
    from service.plans.feedback import ResultsFollower
    from service.publish.results import ResultsPublisher

    def rows(seq, final, value):
        seq = np.asarray(seq, np.int64)
        n = len(seq)
        r = {"seq_num": seq, "time": seq * 1.0, "peak": np.array(["lamellar"] * n),
             "eta": np.zeros(n), "converged": np.ones(n, bool), "change_point": seq == 3,
             "final": np.full(n, final), "chi2": np.ones(n)}
        for f in ("center", "fwhm", "amplitude"):
            r[f], r[f + "_err"] = value + seq * 0.1, np.full(n, 0.01)
        return r

    with ResultsPublisher("tcp://127.0.0.1:*") as pub, ResultsFollower(pub.address) as f:
        assert f.wait_connected(5)
        pub.start_run("src-1", {}, {}, ["lamellar"])
        pub.publish_rows("src-1", rows([1, 2, 3, 4], False, 1.0))
        pub.publish_rows("src-1", rows([1, 2], True, 2.0))
        assert f.wait_for("src-1", lambda r: r.events == 6, 5)
        assert f.latest("src-1", "lamellar", "center") == (4, pytest.approx(1.4), 0.01)
        assert f.latest("src-1", "lamellar", "area", final=True) == (2, pytest.approx(2.2), 0.01)
        assert f.latest("src-1", "pi_pi", "center") is None
        assert [v.seq_num for v in f.history("src-1", "lamellar", "fwhm")] == [1, 2, 3, 4]
        assert f.change_points("src-1") == [3]
        assert f.status("src-1") == "running" and f.status("other") == "unseen"
        with ResultsFollower(pub.address) as late:
            assert late.wait_connected(5)
            pub.publish_rows("src-1", rows([5], False, 1.0))
            pub.stop_run("src-1")
            assert f.wait_for("src-1", lambda r: r.status == "complete", 5)
            assert late.wait_for("x", lambda r: late.stats["orphans"] == 1, 5)
            assert late.latest("src-1", "lamellar", "center") is None
        assert f.latest("src-1", "lamellar", "center").seq_num == 5
        assert f.stats["lost"] == 0 and f.stats["orphans"] == 0 and f.stats["decode_errors"] == 0


def test_bad_options():
    from service.plans.feedback import ResultsFollower, RestFollower
    from service.plans.stubs import adaptive_uv_cycle, wait_for_fit

    with pytest.raises(ValueError, match="address"):
        ResultsFollower("127.0.0.1:5579")
    with pytest.raises(ValueError, match="prefix"):
        ResultsFollower(prefix=b"a b")
    with pytest.raises(ValueError, match="deserializer"):
        ResultsFollower(deserializer="json")
    with pytest.raises(ValueError, match="base_url"):
        RestFollower("localhost:8000")
    with pytest.raises(ValueError, match="param"):
        next(wait_for_fit(None, "u", "lamellar", "height", lambda v, e: True, timeout=1))
    with pytest.raises(ValueError, match="timeout"):
        next(wait_for_fit(None, "u", "lamellar", "area", lambda v, e: True, timeout=-1))
    with pytest.raises(ValueError, match="max_lag"):
        next(wait_for_fit(None, "u", "lamellar", "area", lambda v, e: True, timeout=1, max_lag=-1))
    with pytest.raises(ValueError, match="fade_threshold"):
        next(adaptive_uv_cycle(None, None, None, fade_threshold=50, recover_threshold=40, max_frames=10))
