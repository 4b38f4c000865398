"""The REST API over a bounded run store and Tiled: rows a run no longer holds read back from
Tiled exactly as written, a run served from the catalogue after its service restarted, prefixes
of uids, flat memory for long runs and polls that cost what they return.

One embedded Tiled server for the module (a server start is seconds); ground truth is what the
test wrote, or what the first service served before it stopped.
"""
from __future__ import annotations

import functools
import math
import time
import tracemalloc

import httpx
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from event_model import compose_run
from fastapi.testclient import TestClient
from helpers import wait_stopped

from service.api import build_app
from service.metrics import Metrics
from service.publish.rowtable import RowQuery
from service.publish.state import RunStore
from workers.columns import PEAK_COLUMNS, PHASE_COLUMNS

PEAKS = ("lamellar", "pi_stack", "amorphous")
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)


def peak_rows(seq, final: bool, rng=None) -> dict:
    """Peak rows for frames ``seq`` (3 peaks each) as the fitter sends them; random values
    with a few NaN when ``rng`` is given."""
    seq = np.repeat(np.asarray(seq, np.int64), len(PEAKS))
    m = len(seq)
    rows = {c: (rng.standard_normal(m) if rng is not None else np.full(m, 0.5)) for c in PEAK_COLUMNS}
    if rng is not None:
        rows["center_err"][rng.random(m) < 0.05] = np.nan
    rows.update(seq_num=seq, time=1.7e9 + 0.1 * seq, peak=np.tile(PEAKS, m // len(PEAKS)),
                converged=np.ones(m, bool), unidentified=np.zeros(m, np.int64), change_point=np.zeros(m, bool),
                final=np.full(m, final))
    return rows


def phase_rows(seq, final: bool) -> dict:
    seq = np.asarray(seq, np.int64)
    n = len(seq)
    return {"seq_num": seq, "time": 1.7e9 + 0.1 * seq, "phase": np.full(n, "crystalline"), "probability": np.ones(n),
            "crystallinity": np.full(n, 0.7), "crystallinity_sigma": np.full(n, 0.01), "final": np.full(n, final)}


def batches(first: int, end: int, batch: int, lag: int):
    """(provisional seq, final seq) per batch, final ``lag`` frames behind, as the hub sends them."""
    for k in range(first, end, batch):
        seq = np.arange(k, min(k + batch, end))
        done = np.arange(max(first, k - lag), max(first, min(k + batch, end) - lag))
        yield seq, done
    yield np.zeros(0, np.int64), np.arange(max(first, end - lag), end)


def as_json(rows: dict) -> dict:
    """Rows as the API must send them: lists, NaN as None."""
    return {c: [None if isinstance(x, float) and math.isnan(x) else x for x in np.asarray(v).tolist()]
            for c, v in rows.items()}


def concat(parts: list[dict]) -> dict:
    return {c: np.concatenate([p[c] for p in parts]) for c in PEAK_COLUMNS}


def client_for(store, archive=None) -> TestClient:
    return TestClient(build_app(store, Metrics(), dict, archive=archive))


# --------------------------------------------------------------------------- without Tiled

def test_paging_by_row_and_by_seq_num_with_gaps_named():
    """since= pages rows in arrival order, since_seq= one kind of rows by seq_num, both exactly
    the rows written; rows older than the held window are named in `missing`, never dropped silently."""
    store = RunStore(held_rows=200)
    store.start_run("run-1", {"uid": "run-1"})
    rng = np.random.default_rng(0)
    written = []
    for seq, done in batches(1, 201, 8, 8):                  # 200 frames: 1200 rows, 200+ held
        for rows in (peak_rows(seq, False, rng), peak_rows(done, True, rng)):
            if len(rows["seq_num"]):
                store.add_peaks("run-1", rows)
                written.append(rows)
    truth = concat(written)
    n = len(truth["seq_num"])
    base = store.get("run-1").peaks.base
    assert n == 1200 and 0 < base <= n - 200
    client = client_for(store)

    tail = client.get("/api/v1/runs/run-1/peaks", params={"since": n - 10}).json()
    assert tail["columns"] == as_json({c: v[n - 10:] for c, v in truth.items()})
    assert tail["next_since"] == n and tail["missing"] is None

    everything = client.get("/api/v1/runs/run-1/peaks", params={"since": 0}).json()
    assert everything["columns"] == as_json({c: v[base:] for c, v in truth.items()})
    assert everything["missing"]["first_row"] == 0 and everything["missing"]["end_row"] == base
    assert "no Tiled archive" in everything["missing"]["reason"]

    # row paging with a limit: pages join up to the held rows, cursors at the first row left
    got, since = [], base
    while since < n:
        page = client.get("/api/v1/runs/run-1/peaks", params={"since": since, "limit": 50}).json()
        assert len(page["columns"]["seq_num"]) <= 50
        got += page["columns"]["center"]
        since = page["next_since"]
    assert got == as_json({"c": truth["center"][base:]})["c"]

    # final rows of frames >= 190 by seq_num, in pages of whole frames
    fin = truth["final"] & (truth["seq_num"] >= 190)
    order = np.argsort(truth["seq_num"][fin], kind="stable")
    expect = {c: v[fin][order] for c, v in truth.items()}
    got, seq = [], 190
    for _ in range(20):
        page = client.get("/api/v1/runs/run-1/peaks", params={"since_seq": seq, "final": True, "limit": 7}).json()
        if not page["columns"]["seq_num"]:
            break
        rows = len(page["columns"]["seq_num"])
        assert rows % 3 == 0 and rows <= 9                   # 7 rows at most, rounded up to whole frames of 3 peaks
        got += list(zip(page["columns"]["seq_num"], page["columns"]["peak"], page["columns"]["amplitude"]))
        seq = page["next_seq"]
    assert got == list(zip(expect["seq_num"].tolist(), expect["peak"].tolist(), expect["amplitude"].tolist()))
    assert seq == 201

    # the friction issue: final=true&since=10 was a row index over all rows; since_seq is the frame
    page = client.get("/api/v1/runs/run-1/peaks", params={"since_seq": 195, "final": True}).json()
    assert sorted(set(page["columns"]["seq_num"])) == [195, 196, 197, 198, 199, 200]
    assert client.get("/api/v1/runs/run-1/peaks", params={"since_seq": 5}).status_code == 422      # needs final
    assert client.get("/api/v1/runs/run-1/peaks", params={"since_seq": 5, "since": 3}).status_code == 422
    assert client.get("/api/v1/runs/run-1/peaks", params={"limit": 0}).status_code == 422


def test_uid_prefixes_resolve_in_memory():
    store = RunStore()
    for uid in ("abcdef-1", "abcdef-2", "fedcba-1"):
        store.start_run(uid, {"uid": uid})
    store.add_peaks("fedcba-1", peak_rows([1, 2], True))
    client = client_for(store)
    r = client.get("/api/v1/runs/fedc")
    assert r.status_code == 200 and r.json()["uid"] == "fedcba-1" and r.json()["source"] == "memory"
    assert client.get("/api/v1/runs/fed/peaks").json()["columns"]["seq_num"] == [1, 1, 1, 2, 2, 2]
    r = client.get("/api/v1/runs/abc")
    assert r.status_code == 409 and "abcdef-1" in r.json()["detail"] and "abcdef-2" in r.json()["detail"]
    assert client.get("/api/v1/runs/abcdef-2").json()["uid"] == "abcdef-2"
    assert client.get("/api/v1/runs/zzz").status_code == 404


def test_memory_is_flat_and_polls_cost_what_they_return():
    """200,000 frames (3 peaks, provisional and final rows, phases): tracemalloc sees no growth
    once the held window is full; a poll of the newest 10 rows looks at 10 rows, one of all
    held rows at all of them."""
    held = 20_000
    store = RunStore(held_rows=held)
    store.start_run("long", {"uid": "long"})

    def push(first, end):
        for seq, done in batches(first, end, 64, 16):
            for s, final in ((seq, False), (done, True)):
                if len(s):
                    store.add_peaks("long", peak_rows(s, final))
                    store.add_phases("long", phase_rows(s, final), [])

    tracemalloc.start()
    try:
        push(0, 20_000)                         # 120,000 peak rows: the window is full
        full = tracemalloc.get_traced_memory()[0]
        push(20_000, 200_000)                   # 1,080,000 more
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    run = store.get("long")
    chunk_bytes = run.peaks.chunk_rows * 87 + run.phases.chunk_rows * 45
    print(f"traced: {full / 1e6:.2f} MB at 20k frames, {after / 1e6:.2f} MB at 200k frames")
    assert abs(after - full) < chunk_bytes + 200_000           # flat: within one chunk of each table
    assert run.peaks.n == 1_200_000 and held <= run.peaks.held < held + run.peaks.chunk_rows
    assert after < 2 * (held + run.peaks.chunk_rows) * (87 + 45)  # ~ the held rows, nothing per frame
    assert run.frames_final == 200_000

    n = run.peaks.n
    before = run.peaks.scanned
    newest = store.select("long", "peaks", RowQuery(since=n - 10))
    assert run.peaks.scanned - before == 10 and newest.selection.rows.tolist() == list(range(n - 10, n))
    before = run.peaks.scanned
    newest = store.select("long", "peaks", RowQuery(since_seq=199_990, final=True))
    assert sorted(set(newest.selection.columns["seq_num"].tolist())) == list(range(199_990, 200_000))
    assert run.peaks.scanned - before <= 2 * run.peaks.chunk_rows      # the newest chunk or two
    before = run.peaks.scanned
    store.select("long", "peaks", RowQuery(since=0))
    assert run.peaks.scanned - before == run.peaks.held


def test_event_scalars_and_series_are_bounded():
    store = RunStore(held_rows=1000)
    store.start_run("s", {"uid": "s"})
    for s in range(5000):
        store.frame_received("s", s, {"det_time_offset": 0.1 * s, "temp": 20.0})
    store.add_extras("s", np.arange(5000), None, {}, {"hermans": np.linspace(0, 1, 5000)})
    run = store.get("s")
    assert run.scalars.get(4999) == {"det_time_offset": pytest.approx(499.9), "temp": 20.0}
    assert 1000 <= len(run.scalars) < 1100 and run.frames_received == 5000
    assert run.scalars.get(3, {}) == {}                               # no longer held
    series = store.extras("s")["scalars"]["hermans"]
    assert 1000 <= len(series["seq_num"]) < 1100 and series["seq_num"][-1] == 4999


# --------------------------------------------------------------------------- with Tiled

@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    from service.publish.tiled_server import EmbeddedTiled
    server = EmbeddedTiled(tmp_path_factory.mktemp("tiled"), api_key="resttestkey")
    yield server
    server.close()


@pytest.mark.slow
def test_old_rows_are_read_back_from_tiled_exactly(tiled, tmp_path):
    """A store holding only the newest 300 rows; polls for older rows are served from the run's
    scatterflow/<uid>/peaks table in Tiled with the exact values written."""
    from service.publish.archive_reader import ArchiveReader
    from service.publish.tiled import TiledPublisher

    uid = "feedbeef-0001"
    store = RunStore(held_rows=300)
    rng = np.random.default_rng(7)
    written = []
    with TiledPublisher(tiled.uri, tiled.api_key, spool_dir=tmp_path / "spool", flush_rows=2000,
                        flush_seconds=0.5) as pub:
        for u in (uid, "feedbeef-0002"):
            store.start_run(u, {"uid": u, "time": 1.7e9})
            pub.start_run(u, {"uid": u, "time": 1.7e9, "plan_name": "count"}, {})
        for seq, done in batches(1, 401, 8, 8):             # 400 frames: 2400 rows, as the hub fans them out
            for rows in (peak_rows(seq, False, rng), peak_rows(done, True, rng)):
                if len(rows["seq_num"]):
                    store.add_peaks(uid, rows)
                    pub.add_peaks(uid, rows)
                    written.append(rows)
        store.add_phases(uid, phase_rows(np.arange(1, 401), True), [])
        pub.add_table(uid, "phases", phase_rows(np.arange(1, 401), True))
        pub.stop_run(uid, "success")
        assert pub.flush(60)
    truth = concat(written)
    n = len(truth["seq_num"])
    base = store.get(uid).peaks.base
    assert base > n - 400                                        # most rows only in Tiled
    archive = ArchiveReader(tiled.uri, tiled.api_key)
    client = client_for(store, archive)

    page = client.get(f"/api/v1/runs/{uid}/peaks", params={"since": 0}).json()
    assert page["missing"] is None and page["next_since"] == n
    assert page["columns"] == as_json(truth)                     # every value, NaN as null, in order

    fin = truth["final"]
    order = np.argsort(truth["seq_num"][fin], kind="stable")
    expect = as_json({c: v[fin][order] for c, v in truth.items()})
    got, seq = {c: [] for c in PEAK_COLUMNS}, 0
    while True:
        page = client.get(f"/api/v1/runs/{uid}/peaks", params={"since_seq": seq, "final": True, "limit": 500}).json()
        if not page["columns"]["seq_num"]:
            break
        for c in PEAK_COLUMNS:
            got[c] += page["columns"][c]
        seq = page["next_seq"]
    assert got == expect and seq == 401
    assert archive.reads == 1                                    # the finished run's table read once, then cached

    page = client.get(f"/api/v1/runs/{uid}/phases", params={"since": 0}).json()      # held whole
    assert page["columns"]["seq_num"] == list(range(1, 401)) and set(page["columns"]) == set(PHASE_COLUMNS)

    r = client.get("/api/v1/runs/feedbeef")                      # a prefix of two runs in Tiled and memory
    assert r.status_code == 409 and uid in r.json()["detail"]


@pytest.mark.slow
def test_run_served_from_tiled_after_a_restart(tiled, tmp_path, free_port):
    """A run analysed by one Service (real pipeline, 10 reduced profiles) is served, after that
    Service is closed and another started on the same Tiled, with the rows the first served."""
    from service.config import load_settings
    from service.server import Service
    from service.sim import AzoCycle

    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")

    def settings(name):
        return load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"},
                             tiled={"uri": tiled.uri, "api_key": tiled.api_key, "bluesky_runs": False,
                                    "directory": str(tmp_path / name), "flush_seconds": 0.2},
                             results={"address": None}, api={"port": free_port(), "held_rows": 1000},
                             phases={"enabled": False},
                             fit={"q_range": [2.0, 4.6], "background": {"kind": "power_law"},
                                  "peaks": [{"name": "lamellar", "center": 3.2, "fwhm": 0.2,
                                             "center_min": 2.7, "center_max": 3.6}],
                                  "regularizer": {"window": 4}})

    first = Service(settings("first")).start()
    try:
        time.sleep(1.0)                                          # 0MQ slow joiner
        cycle, q = AzoCycle(schedule=((0.0, "uv"),)), np.linspace(1.5, 6.0, 300)
        bundle = compose_run(metadata={"plan_name": "profiles"})
        desc = bundle.compose_descriptor(name="primary", data_keys={
            k: {"source": "sim", "dtype": "array", "shape": [300]} for k in ("q", "intensity", "sigma")})
        rng = np.random.default_rng(3)
        for name, doc in (("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)):
            pub.send(b" " + name.encode() + b" " + pack(doc))
        for i in range(10):
            counts = rng.poisson(20 * cycle.profile(q, float(i))).astype(float)
            pub.send(b" event " + pack(desc.compose_event(
                data={"q": q, "intensity": counts, "sigma": np.sqrt(np.maximum(counts, 1))},
                timestamps={k: 0.0 for k in ("q", "intensity", "sigma")}, seq_num=i + 1)))
        pub.send(b" stop " + pack(bundle.compose_stop()))
        uid = bundle.start_doc["uid"]
        assert wait_stopped(first, uid).status == "complete"
        api = f"http://127.0.0.1:{first.api_port}/api/v1/runs/{uid}"
        live_run = httpx.get(api).json()
        live_rows = httpx.get(f"{api}/peaks", params={"since": 0}).json()["columns"]
        live_final = httpx.get(f"{api}/peaks", params={"since_seq": 0, "final": True}).json()["columns"]
    finally:
        first.close()                                            # flushes Tiled
        pub.close(linger=0)
    assert live_run["frames_final"] == 10 and live_final["seq_num"] == list(range(1, 11))

    second = Service(settings("second")).start()
    try:
        assert second.store.get(uid) is None
        client = httpx.Client(base_url=f"http://127.0.0.1:{second.api_port}")      # the new service's own API
        run = client.get(f"/api/v1/runs/{uid[:8]}").json()       # a prefix, as the report CLI takes
        assert run["uid"] == uid and run["source"] == "catalog" and run["status"] == "complete"
        assert (run["frames_fitted"], run["frames_final"], run["peak_rows"]) == (10, 10, live_run["peak_rows"])
        assert run["start"]["uid"] == uid and run["plan_name"] == "profiles"
        page = client.get(f"/api/v1/runs/{uid}/peaks", params={"since": 0}).json()
        assert page["columns"] == live_rows and page["missing"] is None
        assert client.get(f"/api/v1/runs/{uid}/peaks", params={"since_seq": 0, "final": True}).json()[
            "columns"] == live_final
        listed = client.get("/api/v1/runs", params={"source": "catalog"}).json()["runs"]
        assert uid in [r["uid"] for r in listed]
        assert client.get(f"/api/v1/runs/{uid}/profiles").status_code == 404        # memory only
    finally:
        second.close()
