"""ResultsPublisher -> stock bluesky RemoteDispatcher over loopback 0MQ, LiveTable,
BestEffortCallback and LivePlot on it."""

import asyncio
import contextlib
import json
import pickle
import threading
import traceback

import numpy as np
import pytest
from bluesky.callbacks import LiveTable
from bluesky.callbacks.zmq import RemoteDispatcher
from event_model import DocumentNames, schema_validators

from service.publish.results import ResultsPublisher, msgpack_deserializer

PEAKS = ("lamellar", "pi_stack")
FIELDS = ("center", "center_err", "fwhm", "fwhm_err", "amplitude", "amplitude_err")


def peak_rows(seq, final, rng):
    seq = np.repeat(np.asarray(seq, np.int64), len(PEAKS))
    n = len(seq)
    rows = {"seq_num": seq, "time": 1.7e9 + 0.5 * seq, "peak": np.array(PEAKS * (n // 2)),
            "eta": rng.random(n), "converged": np.ones(n, bool),
            "change_point": (seq == 7) & ~np.full(n, final), "final": np.full(n, final)}
    for f in FIELDS:
        rows[f] = rng.standard_normal(n)
    rows["chi2"] = np.repeat(rng.random(n // 2) + 0.5, 2)    # the frame's, on each peak's row
    return rows


class Collector:
    """Documents as received; sets ``done`` at the stop of run ``wait_for``."""

    def __init__(self):
        self.docs, self.done, self.wait_for = [], threading.Event(), None

    def __call__(self, name, doc):
        self.docs.append((name, doc))
        if name == "stop" and (self.wait_for is None or doc["run_start"] == self.wait_for):
            self.done.set()


@contextlib.contextmanager
def dispatching(pub, deserializer, *callbacks):
    """A stock RemoteDispatcher on ``pub`` in a thread, ``callbacks`` subscribed, joined (slow
    joiner: throw-away runs until one arrives whole); yields the Collector. The callbacks'
    exceptions are recorded in ``got.errors`` (the dispatcher's loop would lose them)."""
    disp = RemoteDispatcher(pub.address.replace("tcp://", ""), prefix=pub.prefix,
                            deserializer=deserializer)
    got = Collector()
    got.errors = []

    def guarded(cb):
        def call(name, doc):
            try:
                cb(name, doc)
            except Exception:
                got.errors.append((name, traceback.format_exc()))
        return call

    disp.subscribe(got)
    for cb in callbacks:
        disp.subscribe(guarded(cb))

    def run():
        try:
            disp.start()
        except asyncio.CancelledError:      # cancelled from the test thread below
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for i in range(100):
            pub.start_run(f"warm-{i}", {}, {}, [])
            pub.stop_run(f"warm-{i}", "success")
            if got.done.wait(0.1):
                break
        else:
            pytest.fail("subscriber never joined")
        got.docs.clear()
        got.done.clear()
        got.errors.clear()
        yield got
    finally:
        disp.loop.call_soon_threadsafe(
            lambda: [t.cancel() for t in asyncio.all_tasks(disp.loop)])
        thread.join(5)


@pytest.mark.parametrize("serializer", ["msgpack", "pickle"])
def test_remote_dispatcher_receives_analysis_run(serializer):
    rng = np.random.default_rng(0)
    pub = ResultsPublisher("tcp://127.0.0.1:*", prefix=b"sf", serializer=serializer)
    deserializer = msgpack_deserializer() if serializer == "msgpack" else pickle.loads
    lines = []
    fields = [f"{p}_center" for p in PEAKS] + ["source_seq_num", "chi2_red", "change_point"]
    with dispatching(pub, deserializer, LiveTable(fields, out=lines.append)) as got, \
            contextlib.closing(pub):
        lines.clear()
        src = {"uid": "source-run-1", "scan_id": 42, "plan_name": "count"}
        config = {"fit": {"peaks": list(PEAKS)}, "reduction": {"npt": 500}}
        ana_uid = pub.start_run("source-run-1", src, config, PEAKS)
        got.wait_for = ana_uid
        published = []
        for k in range(0, 20, 5):                          # 4 batches of 5 frames
            batch = [peak_rows(range(k, k + 5), False, rng)]
            if k >= 5:
                batch.append(peak_rows(range(k - 5, k), True, rng))
            for rows in batch:
                assert pub.publish_rows("source-run-1", rows) == 5
                published.append(rows)
        last = peak_rows(range(15, 20), True, rng)
        pub.publish_rows("source-run-1", last)
        published.append(last)
        pub.stop_run("source-run-1", "success")
        assert got.done.wait(10), "stop document not received"
    assert got.errors == []

    names = [n for n, _ in got.docs]
    assert names == ["start", "descriptor", "descriptor"] + ["event"] * 40 + ["stop"]
    for name, doc in got.docs:
        schema_validators[DocumentNames[name]].validate(doc)
    start, desc, pdesc, stop = got.docs[0][1], got.docs[1][1], got.docs[2][1], got.docs[-1][1]
    assert start["uid"] == ana_uid and start["source_run_uid"] == "source-run-1"
    assert start["analysis"] == "scatterflow" and json.loads(start["configuration"]) == config   # a JSON string
    assert start["scan_id"] == 42                                   # the source run's
    assert desc["name"] == "primary" and desc["run_start"] == ana_uid
    assert pdesc["name"] == "provisional" and pdesc["run_start"] == ana_uid
    frame_keys = {"source_seq_num", "source_time", "chi2_red", "converged", "change_point"}
    expected_keys = {f"{p}_{f}" for p in PEAKS for f in FIELDS} | frame_keys
    assert set(desc["data_keys"]) == expected_keys
    assert set(pdesc["data_keys"]) == {k if k in ("source_seq_num", "source_time") else "provisional_" + k
                                       for k in expected_keys}
    assert all(k["description"] for d in (desc, pdesc) for k in d["data_keys"].values())
    assert "whole-profile" in desc["data_keys"]["chi2_red"]["description"]
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": 20, "provisional": 20}

    # Every (frame, provisional/final) once, in publication order, in its stream, values exact.
    events = [d for n, d in got.docs if n == "event"]
    want = []
    for rows in published:
        fin = bool(rows["final"][0])
        pre = "" if fin else "provisional_"
        for j in range(0, len(rows["seq_num"]), len(PEAKS)):
            data = {f"{pre}{rows['peak'][j + m]}_{f}": rows[f][j + m]
                    for m in range(len(PEAKS)) for f in FIELDS}
            data.update({"source_seq_num": int(rows["seq_num"][j]), pre + "chi2_red": rows["chi2"][j],
                         pre + "change_point": bool(rows["change_point"][j:j + 2].any()),
                         pre + "converged": True})
            want.append((desc if fin else pdesc, data))
    assert len(events) == len(want)
    for ev, (d, w) in zip(events, want):
        assert ev["descriptor"] == d["uid"]
        assert set(ev["data"]) == set(d["data_keys"])
        for k, v in w.items():
            assert ev["data"][k] == v, k
    finals = [e for e in events if e["descriptor"] == desc["uid"]]
    provisional = [e for e in events if e["descriptor"] == pdesc["uid"]]
    assert [e["seq_num"] for e in finals] == [e["seq_num"] for e in provisional] == list(range(1, 21))
    assert [e["data"]["source_seq_num"] for e in finals] == list(range(20))
    assert [e["data"]["source_seq_num"] for e in provisional] == list(range(20))

    # LiveTable (stream "primary"): header + one row per final event, nothing failed to format.
    table = "\n".join(lines)
    print(table)
    assert "failed to format" not in table
    rows_printed = [ln for ln in lines if ln.startswith("|") and "seq_num" not in ln]
    assert len(rows_printed) == 20
    assert f"{finals[0]['data']['lamellar_center']:.4f}" in rows_printed[0]




def test_bad_options():
    with pytest.raises(ValueError, match="serializer"):
        ResultsPublisher("tcp://127.0.0.1:*", serializer="json")
    with pytest.raises(ValueError, match="prefix"):
        ResultsPublisher("tcp://127.0.0.1:*", prefix=b"a b")
    with ResultsPublisher("tcp://127.0.0.1:*") as pub:
        with pytest.raises(ValueError, match="no analysis run"):
            pub.publish_rows("nope", {})
        pub.start_run("r", {}, {}, ["a"])
        with pytest.raises(ValueError, match="not in"):
            pub.publish_rows("r", peak_rows([1], False, np.random.default_rng(0)))


def test_stock_callbacks_on_a_fitted_run(capsys):
    """A real series (tests/test_temporal.py: drift and a step) fitted by TrajectoryFitter and
    published as it comes: BestEffortCallback (table and plots, Agg) and
    LivePlot("a_center", x="source_seq_num") on a stock RemoteDispatcher raise nothing;
    ``primary`` is exactly the final rows, one event per frame in seq order, ``provisional``
    the per-frame fits; the start carries the source's scan_id; LivePlot's line is the final
    centres against seq_num and BestEffortCallback's table has the hinted fields."""
    import matplotlib

    matplotlib.use("Agg")
    from bluesky.callbacks import LivePlot
    from bluesky.callbacks.best_effort import BestEffortCallback
    from test_temporal import Q, SPEC, simulate

    from workers.specs import RegularizerSpec
    from workers.temporal import TrajectoryFitter, concat_rows

    y, s, *_ = simulate(600, 11)
    tf = TrajectoryFitter(SPEC, RegularizerSpec(window=8, penalty="huber", strength=2.0))
    batches = [tf.update(Q, y[i:i + 8], s[i:i + 8], np.arange(i, i + 8), 100.0 + np.arange(i, i + 8))
               for i in range(0, 48, 8)] + [tf.finish()]
    rows = concat_rows(batches)
    fin, prov = rows["final"], ~rows["final"]
    assert fin.sum() == prov.sum() == 48

    bec, plot = BestEffortCallback(), LivePlot("a_center", x="source_seq_num")
    bec.disable_plots()                 # its plots are LivePlots too: one, below, is enough
    pub = ResultsPublisher("tcp://127.0.0.1:*")
    with dispatching(pub, msgpack_deserializer(), bec, plot) as got, contextlib.closing(pub):
        ana_uid = pub.start_run("src-7", {"uid": "src-7", "scan_id": 7}, {}, ["a"])
        got.wait_for = ana_uid
        for b in batches:
            pub.publish_rows("src-7", b)
        pub.stop_run("src-7")
        assert got.done.wait(30), "stop document not received"
    assert got.errors == []

    start = got.docs[0][1]
    assert start["scan_id"] == 7 and start["hints"]["dimensions"] == [[["source_seq_num"], "primary"]]
    desc = {d["name"]: d for n, d in got.docs if n == "descriptor"}
    assert desc["primary"]["object_keys"]["a"] == [f"a_{f}" for f in FIELDS]
    assert desc["primary"]["hints"] == {"a": {"fields": ["a_center"]}, "frame": {"fields": ["chi2_red"]}}
    assert all(v == {"fields": []} for v in desc["provisional"]["hints"].values())
    by_stream = {name: [d["data"] for n, d in got.docs if n == "event" and d["descriptor"] == desc[name]["uid"]]
                 for name in desc}
    for name, mask, pre in (("primary", fin, ""), ("provisional", prov, "provisional_")):
        ev = by_stream[name]
        assert [e["source_seq_num"] for e in ev] == rows["seq_num"][mask].tolist()
        for f in FIELDS:
            assert [e[f"{pre}a_{f}"] for e in ev] == rows[f][mask].tolist(), f
        assert [e[pre + "chi2_red"] for e in ev] == rows["chi2"][mask].tolist()
        assert [e[pre + "converged"] for e in ev] == rows["converged"][mask].tolist()
        assert [e["source_time"] for e in ev] == rows["time"][mask].tolist()
    assert [e["source_seq_num"] for e in by_stream["primary"]] == list(range(48))   # one per frame, in order
    assert all(e["converged"] for e in by_stream["primary"])   # the joint fits converged (see test_window_fit)

    # LivePlot drew one clean line: the final centres against seq_num, nothing provisional.
    x, yv = plot.current_line.get_data()
    assert list(x) == list(range(48)) and list(yv) == rows["center"][fin].tolist()
    # BestEffortCallback's table: the dimension and the hinted fields, one row per final event.
    assert list(bec._table._fields) == ["source_seq_num", "a_center", "chi2_red"]
    out = capsys.readouterr().out
    assert "a_center" in out and "chi2_red" in out and "New stream: 'provisional'" in out
    assert f"{by_stream['primary'][0]['a_center']:.4f}"[:6] in out
