"""TiledPublisher against a real embedded Tiled server, read back with a fresh client.

Two server starts in all (each spawns `tiled catalog init` in a subprocess): one shared
server, restarted once on the same directory and port by the outage test.
"""

import re

import numpy as np
import pytest

pytest.importorskip("tiled")

from tiled.client import from_uri  # noqa: E402

from service.publish.tiled import TiledPublisher, layout, ops, spool  # noqa: E402
from service.publish.tiled_server import EmbeddedTiled  # noqa: E402
from workers.columns import PEAK_COLUMNS  # noqa: E402

from helpers import one_tiled_attempt  # noqa: E402

pytestmark = pytest.mark.slow
N_BINS = 100
PEAKS = ("lamellar", "pi_stack")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A dict holding the live server (the outage test swaps in a restarted one)."""
    holder = {"dir": tmp_path_factory.mktemp("tiled")}
    holder["srv"] = EmbeddedTiled(holder["dir"])
    yield holder
    holder["srv"].close()


def peak_rows(seq, final, rng):
    """PeakRows for frames ``seq`` and both peaks, as the fitter emits them."""
    seq = np.repeat(np.asarray(seq, np.int64), len(PEAKS))
    n = len(seq)
    rows = {"seq_num": seq, "time": 1.7e9 + 0.1 * seq,
            "peak": np.array(PEAKS * (n // len(PEAKS))),
            "converged": rng.random(n) > 0.1, "unidentified": rng.integers(0, 3, n),
            "change_point": rng.random(n) > 0.9,
            "final": np.full(n, final)}
    for c in ("center", "center_err", "fwhm", "fwhm_err", "amplitude", "amplitude_err",
              "eta", "chi2"):
        rows[c] = rng.standard_normal(n)
    assert set(rows) == set(PEAK_COLUMNS)
    return rows


def write_run(pub, uid, frames, rng, *, batch=10, lag=16, stop=True):
    """Stream ``frames`` (seq, time, I, sigma); provisional rows now, final ones ``lag`` later.

    Returns the peak rows in the order written (what Tiled must hold)."""
    seq, t, q, inten, sig = frames
    written = []
    for k in range(0, len(seq), batch):
        s = slice(k, k + batch)
        pub.add_profiles(uid, seq[s], t[s], q, inten[s], sig[s], "q_nm^-1")
        prov = peak_rows(seq[s], False, rng)
        pub.add_peaks(uid, prov)
        written.append(prov)
        done = seq[max(0, k - lag):max(0, k + batch - lag)]
        if len(done):
            fin = peak_rows(done, True, rng)
            pub.add_peaks(uid, fin)
            written.append(fin)
    fin = peak_rows(seq[max(0, len(seq) - lag):], True, rng)
    pub.add_peaks(uid, fin)
    written.append(fin)
    if stop:
        pub.stop_run(uid, "success")
    return {c: np.concatenate([w[c] for w in written]) for c in PEAK_COLUMNS}


def make_frames(n, rng, start=0):
    seq = np.arange(start, start + n, dtype=np.int64)
    q = np.linspace(0.05, 5.0, N_BINS)
    inten = rng.gamma(2.0, 50.0, (n, N_BINS)).astype(np.float32)
    sig = np.sqrt(inten).astype(np.float32)
    return seq, 1.7e9 + 0.1 * seq, q, inten, sig


def assert_run(client, uid, frames, rows):
    """Everything Tiled holds for ``uid`` equals what was written, in order, exactly."""
    seq, t, q, inten, sig = frames
    run = client["scatterflow"][uid]
    assert set(run) == {"q", "profiles", "sigma", "frames", "peaks", "change_points"}
    np.testing.assert_array_equal(run["q"].read(), q)
    assert run["q"].metadata["unit"] == "q_nm^-1"
    np.testing.assert_array_equal(run["profiles"].read(), inten)
    np.testing.assert_array_equal(run["sigma"].read(), sig)
    fr = run["frames"].read()
    np.testing.assert_array_equal(fr["seq_num"].to_numpy(), seq)
    np.testing.assert_array_equal(fr["time"].to_numpy(), t)
    pk = run["peaks"].read()
    assert list(pk.columns) == list(PEAK_COLUMNS)
    for c in PEAK_COLUMNS:
        np.testing.assert_array_equal(pk[c].to_numpy(), rows[c], err_msg=c)
    cp = run["change_points"].read()
    np.testing.assert_array_equal(cp["seq_num"].to_numpy(), rows["seq_num"][rows["change_point"]])
    np.testing.assert_array_equal(cp["final"].to_numpy(), rows["final"][rows["change_point"]])
    md = run.metadata
    assert md["status"] == "complete" and md["exit_status"] == "success"
    assert md["start"]["uid"] == uid and md["configuration"]["reduction"]["npt"] == N_BINS
    assert set(md["software"]) >= {"scatterflow", "torch", "pyFAI"}


def write_requests(directory):
    """Write requests (POST/PUT/PATCH) in the server's own access log."""
    log = (directory / "access.log").read_text()
    return len(re.findall(r'"\S*(?:POST|PUT|PATCH) ', log))


def test_roundtrip_batched(server, tmp_path):
    rng = np.random.default_rng(1)
    srv = server["srv"]
    frames = make_frames(250, rng)
    before = write_requests(srv.directory)
    config = {"reduction": {"npt": N_BINS, "unit": "q_nm^-1"}}
    with TiledPublisher(srv.uri, srv.api_key, spool_dir=tmp_path / "spool",
                        flush_rows=200, flush_seconds=0.5) as pub:
        pub.start_run("run-a", {"uid": "run-a", "time": 1.7e9, "scan_id": np.int64(7)},
                      config)
        rows = write_run(pub, "run-a", frames, rng)
        assert pub.flush(30)
    assert pub.frames_written == 250 and pub.rows_written == len(rows["seq_num"]) == 1000
    assert pub.spooled == 0 and pub.errors == 0
    # 250 frames and 1000 peak rows took a few dozen requests, not one per frame.
    server_writes = write_requests(srv.directory) - before
    assert server_writes <= 60, server_writes
    assert pub.requests <= 80, pub.requests
    fresh = from_uri(srv.uri, api_key=srv.api_key)
    assert_run(fresh, "run-a", frames, rows)


def test_outage_spools_then_flushes(server, tmp_path, monkeypatch):
    """Server closed mid-run and restarted on the same directory and port: no loss, no
    duplicates. A second publisher that never reached the server closes with its writes
    spooled; a third one on the same spool directory (as after a process restart) drains
    them. (Drains run one after the other: tiled's DuckDB table storage shares one
    connection between requests, and concurrent writers can get spurious 500s.)"""
    import tiled.client.utils

    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
    rng = np.random.default_rng(2)
    srv = server["srv"]
    config = {"reduction": {"npt": N_BINS}}
    frames = make_frames(120, rng)
    pub = TiledPublisher(srv.uri, srv.api_key, spool_dir=tmp_path / "spool",
                         flush_rows=50, flush_seconds=0.2, probe_seconds=0.2,
                         retry_backoff=0.05)
    pub.start_run("run-b", {"uid": "run-b"}, config)
    seq, t, q, inten, sig = frames
    half = (seq[:60], t[:60], q, inten[:60], sig[:60])
    rows1 = write_run(pub, "run-b", half, rng, stop=False)
    assert pub.flush(30) and pub.spooled == 0
    srv.close()
    # Tiled down: the rest of the run goes to the spool.
    rest = (seq[60:], t[60:], q, inten[60:], sig[60:])
    rows2 = write_run(pub, "run-b", rest, rng, stop=True)
    late = TiledPublisher(srv.uri, srv.api_key, spool_dir=tmp_path / "spool2")
    other = make_frames(30, rng)
    late.start_run("run-c", {"uid": "run-c"}, config)
    rows_c = write_run(late, "run-c", other, rng)
    late.close(timeout=1.0)                                   # gives up, files stay
    assert pub.flush(30)
    assert pub.spool_pending > 0 and pub.failures > 0 and late.spool_pending > 0
    assert late.frames_written == 0
    assert {p.suffix for p in (tmp_path / "spool").iterdir()} == {".npz", ".parquet"}

    server["srv"] = srv = EmbeddedTiled(server["dir"], api_key=srv.api_key, port=srv.port)
    assert pub.drain(30)
    pub.close()
    assert pub.frames_written == 120 and pub.errors == 0
    again = TiledPublisher(srv.uri, srv.api_key, spool_dir=tmp_path / "spool2")
    assert again.spool_pending == late.spool_pending
    assert again.drain(30)
    again.close()
    assert again.frames_written == 30 and again.errors == 0
    assert not any((tmp_path / "spool").iterdir()) and not any((tmp_path / "spool2").iterdir())
    fresh = from_uri(srv.uri, api_key=srv.api_key)
    rows_b = {c: np.concatenate([rows1[c], rows2[c]]) for c in PEAK_COLUMNS}
    assert_run(fresh, "run-b", frames, rows_b)
    assert_run(fresh, "run-c", other, rows_c)
    assert "run-a" in fresh["scatterflow"]          # the earlier run survived the restart


def test_spool_file_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    table = layout.rows_to_table(peak_rows([4, 5], True, rng))
    op = ops.Op("table", "u1", {"key": "peaks", "offset": 7}, table=table)
    back = spool.load_op(spool.save_op(op, tmp_path / "000000001-table"))
    assert back.meta == op.meta and back.uid == "u1" and back.table.equals(table)
    arrays = {"intensity": rng.random((3, 4)).astype(np.float32), "seq_num": np.arange(3)}
    op = ops.Op("profiles", "u1", {"offset": 3, "unit": "q_nm^-1"}, arrays=arrays)
    back = spool.load_op(spool.save_op(op, tmp_path / "000000002-profiles"))
    assert back.meta == op.meta
    for k, v in arrays.items():
        assert back.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(back.arrays[k], v)


@pytest.mark.parametrize("kw", [{"flush_rows": 0}, {"flush_seconds": 0},
                                {"queue_size": 0}, {"max_retries": -1}])
def test_bad_options(kw, tmp_path):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TiledPublisher("http://127.0.0.1:9/api/v1", spool_dir=tmp_path, **kw)


def test_bad_rows(tmp_path):
    rows = peak_rows([1], False, np.random.default_rng(0))
    del rows["eta"]
    with pytest.raises(ValueError, match="eta"):
        layout.rows_to_table(rows)


def test_unknown_run_rejected(tmp_path):
    with one_tiled_attempt():               # nothing listens on port 9: no 5 s of tiled's retries at close
        pub = TiledPublisher("http://127.0.0.1:9/api/v1", spool_dir=tmp_path)
        with pytest.raises(ValueError, match="not started"):
            pub.add_peaks("nope", peak_rows([1], False, np.random.default_rng(0)))
        with pytest.raises(ValueError, match="not started"):
            pub.stop_run("nope", "success")
        with pytest.raises(ValueError, match="exit_status"):
            pub.stop_run("nope", "done")
        pub.close(timeout=0.5)


def test_peak_schema_is_the_layout_schema():
    """The peaks table schema (derived from workers.columns) is the one Tiled runs hold."""
    import pyarrow as pa

    f64, b = pa.float64(), pa.bool_()
    expected = pa.schema([("seq_num", pa.int64()), ("time", f64), ("peak", pa.string()),
                          ("center", f64), ("center_err", f64), ("fwhm", f64), ("fwhm_err", f64),
                          ("amplitude", f64), ("amplitude_err", f64), ("eta", f64), ("chi2", f64),
                          ("converged", b), ("unidentified", pa.int64()), ("change_point", b), ("final", b)])
    assert layout.PEAK_SCHEMA.equals(expected)


def test_flush_defaults_are_the_config_defaults(tmp_path):
    from service.config import TiledConfig

    with one_tiled_attempt():
        pub = TiledPublisher("http://127.0.0.1:9/api/v1", spool_dir=tmp_path)
        try:
            assert (pub.flush_rows, pub.flush_seconds) == (TiledConfig().flush_rows, TiledConfig().flush_seconds)
        finally:
            pub.close(timeout=0.5)


def test_buffer_ops_carry_positions():
    """Two flushes of one run: each op starts where the previous one of its array or table
    ended; change points are the flagged peak rows."""
    from service.publish.tiled.buffer import PeakTable, ProfileRows, RunBuffer

    rng = np.random.default_rng(4)
    buf = RunBuffer("u1")
    q = np.linspace(0.1, 1.0, 5)
    offsets = []
    for seq in ([0, 1, 2], [3, 4]):
        buf.add(ProfileRows.parse(seq, np.zeros(len(seq)), q, np.ones((len(seq), 5)), np.ones((len(seq), 5)), "q_nm^-1"))
        rows = peak_rows(seq, False, rng)
        rows["change_point"][:] = False
        rows["change_point"][0] = True
        buf.add(PeakTable(layout.rows_to_table(rows)))
        assert buf.buffered == 2 * len(seq)
        offsets.append([(op.kind, op.meta.get("key"), op.meta["offset"]) for op in buf.take_ops()])
        assert buf.buffered == 0 and buf.first_buffered is None
    assert offsets == [[("profiles", None, 0), ("table", "peaks", 0), ("table", "change_points", 0)],
                       [("profiles", None, 3), ("table", "peaks", 6), ("table", "change_points", 1)]]


def test_event_normalizer_validates_as_the_schema():
    """EventNormalizer empties an event's ``data`` and ``timestamps`` before validating it: the
    same verdict as the full check only while the event schema leaves their values free."""
    import jsonschema
    from event_model import DocumentNames, compose_run, schema_validators, schemas

    from service.publish.catalog_writer import FREE_FORM, EventNormalizer

    partial = schemas[DocumentNames.event]["$defs"]["PartialEvent"]["properties"]
    assert all({k: v for k, v in partial[key].items() if k not in ("title", "description")}
               == {"type": "object", "additionalProperties": True} for key in FREE_FORM)
    desc = compose_run().compose_descriptor(
        name="profiles", data_keys={"intensity": {"dtype": "array", "shape": [800], "source": "s"}})
    good = desc.compose_event(data={"intensity": np.arange(800.0)}, timestamps={"intensity": 1.7e9})
    events = [good, {**good, "data": [1.0]}, {**good, "timestamps": None}, {**good, "seq_num": "1"},
              {**good, "extra": 1}, {k: v for k, v in good.items() if k != "time"}]
    verdicts = []
    for doc in events:
        full = schema_validators[DocumentNames.event].is_valid(doc)
        try:
            EventNormalizer().emit(DocumentNames.event, doc)
            ours = True
        except jsonschema.ValidationError:
            ours = False
        verdicts.append((full, ours))
    assert verdicts == [(True, True)] + [(False, False)] * 5


def test_catalog_writer_roundtrip(server):
    """An analysis run through ResultsPublisher and CatalogWriter (batches of 8 events) reads back
    from Tiled with every row of every stream: final and provisional fits, 800-bin profiles."""
    from tiled.queries import Key

    from service.publish.catalog_writer import CatalogWriter
    from service.publish.results import ResultsPublisher

    rng = np.random.default_rng(5)
    srv, n, bins = server["srv"], 20, 800
    writer = CatalogWriter(srv.client(), batch_size=8)
    pub = ResultsPublisher(None, also=writer.put)
    pub.start_run("src-cw", {"uid": "src-cw", "time": 1.7e9}, {}, PEAKS)
    seq, radial = np.arange(1, n + 1), np.linspace(0.1, 5.0, bins)
    intensity, sigma = rng.random((n, bins)), rng.random((n, bins))
    for k in range(0, n, 5):
        s = slice(k, k + 5)
        pub.publish_profiles("src-cw", seq[s], 1.7e9 + seq[s], radial, "q_nm^-1", intensity[s], sigma[s])
        pub.publish_rows("src-cw", peak_rows(seq[s], False, rng))
        pub.publish_rows("src-cw", peak_rows(seq[s], True, rng))
    pub.stop_run("src-cw")
    writer.close()
    assert (writer.written, writer.failed, writer.dropped) == (pub.documents, 0, 0)
    (run,) = from_uri(srv.uri, api_key=srv.api_key).search(Key("start.source_run_uid") == "src-cw").values()
    for stream in ("primary", "provisional"):
        assert np.asarray(run[stream].read()["source_seq_num"]).tolist() == seq.tolist()
    profiles = run["profiles"].read()
    assert np.asarray(profiles["source_seq_num"]).tolist() == seq.tolist()
    np.testing.assert_array_equal(np.asarray(profiles["intensity"]), intensity)
    np.testing.assert_array_equal(np.asarray(profiles["sigma"]), sigma)
    np.testing.assert_array_equal(np.asarray(profiles["radial"]), np.tile(radial, (n, 1)))
    assert run.metadata["stop"]["exit_status"] == "success"
