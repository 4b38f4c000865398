"""ResultsPublisher -> stock bluesky RemoteDispatcher over loopback 0MQ, LiveTable on it."""

import asyncio
import json
import pickle
import threading

import numpy as np
import pytest
from bluesky.callbacks import LiveTable
from bluesky.callbacks.zmq import RemoteDispatcher
from event_model import DocumentNames, schema_validators

from service.publish.results import ResultsPublisher, msgpack_deserializer

PEAKS = ("lamellar", "pi_stack")
FIELDS = ("center", "center_err", "fwhm", "fwhm_err", "amplitude", "amplitude_err", "chi2")


def peak_rows(seq, final, rng):
    seq = np.repeat(np.asarray(seq, np.int64), len(PEAKS))
    n = len(seq)
    rows = {"seq_num": seq, "time": 1.7e9 + 0.5 * seq, "peak": np.array(PEAKS * (n // 2)),
            "eta": rng.random(n), "converged": np.ones(n, bool),
            "change_point": (seq == 7) & ~np.full(n, final), "final": np.full(n, final)}
    for f in FIELDS:
        rows[f] = rng.standard_normal(n)
    return rows


class Collector:
    """Documents as received; sets ``done`` at the stop of run ``wait_for``."""

    def __init__(self):
        self.docs, self.done, self.wait_for = [], threading.Event(), None

    def __call__(self, name, doc):
        self.docs.append((name, doc))
        if name == "stop" and (self.wait_for is None or doc["run_start"] == self.wait_for):
            self.done.set()


@pytest.mark.parametrize("serializer", ["msgpack", "pickle"])
def test_remote_dispatcher_receives_analysis_run(serializer):
    rng = np.random.default_rng(0)
    pub = ResultsPublisher("tcp://127.0.0.1:*", prefix=b"sf", serializer=serializer)
    deserializer = msgpack_deserializer() if serializer == "msgpack" else pickle.loads
    disp = RemoteDispatcher(pub.address.replace("tcp://", ""), prefix=b"sf",
                            deserializer=deserializer)
    got, lines = Collector(), []
    disp.subscribe(got)
    fields = [f"{p}_center" for p in PEAKS] + ["source_seq_num", "final", "change_point"]
    disp.subscribe(LiveTable(fields, out=lines.append))

    def run():
        try:
            disp.start()
        except asyncio.CancelledError:      # cancelled from the test thread below
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        # Slow joiner: publish throw-away runs until one arrives whole.
        for i in range(100):
            pub.start_run(f"warm-{i}", {}, {}, ["x"])
            pub.stop_run(f"warm-{i}", "success")
            if got.done.wait(0.1):
                break
        else:
            pytest.fail("subscriber never joined")
        got.docs.clear()
        got.done.clear()
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
    finally:
        disp.loop.call_soon_threadsafe(
            lambda: [t.cancel() for t in asyncio.all_tasks(disp.loop)])
        thread.join(5)
        pub.close()

    names = [n for n, _ in got.docs]
    assert names == ["start", "descriptor"] + ["event"] * 40 + ["stop"]
    for name, doc in got.docs:
        schema_validators[DocumentNames[name]].validate(doc)
    start, desc, stop = got.docs[0][1], got.docs[1][1], got.docs[-1][1]
    assert start["uid"] == ana_uid and start["source_run_uid"] == "source-run-1"
    assert start["analysis"] == "scatterflow" and json.loads(start["configuration"]) == config   # a JSON string
    assert desc["name"] == "primary" and desc["run_start"] == ana_uid
    expected_keys = {f"{p}_{f}" for p in PEAKS for f in FIELDS}
    assert expected_keys | {"source_seq_num", "final", "change_point"} <= set(desc["data_keys"])
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": 40}

    # Every (frame, provisional/final) once, in publication order, values exact.
    events = [d for n, d in got.docs if n == "event"]
    want = []
    for rows in published:
        for j in range(0, len(rows["seq_num"]), len(PEAKS)):
            data = {f"{rows['peak'][j + m]}_{f}": rows[f][j + m]
                    for m in range(len(PEAKS)) for f in FIELDS}
            data.update(source_seq_num=int(rows["seq_num"][j]), final=bool(rows["final"][j]),
                        change_point=bool(rows["change_point"][j:j + 2].any()))
            want.append(data)
    assert len(events) == len(want)
    for ev, w in zip(events, want):
        assert ev["descriptor"] == desc["uid"]
        for k, v in w.items():
            assert ev["data"][k] == v, k
    assert [e["seq_num"] for e in events] == list(range(1, 41))
    finals = [e["data"]["source_seq_num"] for e in events if e["data"]["final"]]
    provisional = [e["data"]["source_seq_num"] for e in events if not e["data"]["final"]]
    assert sorted(finals) == sorted(provisional) == list(range(20))

    # LiveTable ran unchanged: header + one row per event, nothing failed to format.
    table = "\n".join(lines)
    print(table)
    assert "failed to format" not in table
    rows_printed = [ln for ln in lines if ln.startswith("|") and "seq_num" not in ln]
    assert len(rows_printed) == 40
    assert f"{events[0]['data']['lamellar_center']:.4f}" in rows_printed[0]


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
