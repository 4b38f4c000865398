"""Benchmark: the REST run store over a long live run: memory, and what polls cost.

Workload: one run of ``--frames`` frames (default 10^6) pushed through `RunStore` as the hub
does it: batches of ``--batch`` frames (default 16; the dispatcher sends 1 to 64), each batch's
provisional peak rows (3 peaks a frame) and phase rows, the final rows of the frames ``--lag``
frames back (the regularizer's window), and every frame's event scalars (5 fields) as it
arrives. The store holds the newest ``--held-rows`` rows per table (ApiConfig.held_rows).

Prints memory before and after (process RSS from /proc, and what tracemalloc traced while
pushing; ``--no-tracemalloc`` pushes faster without it), the time per frame pushed, and the
time of polls through the REST app in-process (FastAPI TestClient, JSON included; median of
``--repeat``): the newest 100 final rows (since_seq), the newest 100 rows (since), and all
final rows of the held window. ``--compare-old N`` pushes N frames through the store as it was
at ``--old-rev`` (default 86ab41d, the last commit with python lists per column; needs git).

    python benchmarks/bench_store.py [--frames 1000000] [--batch 16] [--held-rows 100000]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from service.publish.state import RunStore
from workers.columns import PEAK_COLUMNS

PEAKS = np.array(["lamellar", "pi_stack", "amorphous"])


def rss_mb() -> float:
    """Resident set size of this process, MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rows(seq: np.ndarray, final: bool, rng: np.random.Generator) -> dict:
    s = np.repeat(seq, len(PEAKS))
    m = len(s)
    rows = {c: rng.standard_normal(m) for c in PEAK_COLUMNS}
    rows.update(seq_num=s, time=1.7e9 + 0.1 * s, peak=np.tile(PEAKS, len(seq)), converged=np.ones(m, bool),
                change_point=np.zeros(m, bool), final=np.full(m, final))
    return rows


def phase_rows(seq: np.ndarray, final: bool) -> dict:
    n = len(seq)
    return {"seq_num": seq, "time": 1.7e9 + 0.1 * seq, "phase": np.full(n, "crystalline"),
            "probability": np.full(n, 0.9), "crystallinity": np.full(n, 0.7),
            "crystallinity_sigma": np.full(n, 0.01), "final": np.full(n, final)}


def push(store, uid: str, first: int, end: int, batch: int, lag: int, rng) -> None:
    """Frames [first, end) as the hub sends them: scalars per frame, rows per batch."""
    for k in range(first, end, batch):
        seq = np.arange(k, min(k + batch, end))
        for s in seq.tolist():
            store.frame_received(uid, s, {"det_time_offset": 0.1 * s, "temp": 20.0, "x": 1.0, "y": 2.0, "i0": 1e5})
        store.add_peaks(uid, peak_rows(seq, False, rng))
        store.add_phases(uid, phase_rows(seq, False), [])
        done = np.arange(max(first, k - lag), max(first, min(k + batch, end) - lag))
        if len(done):
            store.add_peaks(uid, peak_rows(done, True, rng))
            store.add_phases(uid, phase_rows(done, True), [])
    done = np.arange(max(first, end - lag), end)
    store.add_peaks(uid, peak_rows(done, True, rng))
    store.add_phases(uid, phase_rows(done, True), [])


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def polls(store, uid: str, frames: int, repeat: int) -> None:
    """Polls of the peaks table: the route's own work (select, page, JSON body), and the same
    GET through FastAPI's TestClient in-process, beside GET /api/v1/health as its overhead."""
    import json

    from fastapi.testclient import TestClient

    from service.api import build_app
    from service.api.dependencies import RunRef
    from service.api.tables import table_page, table_response
    from service.metrics import Metrics
    from service.publish.rowtable import RowQuery

    app = build_app(store, Metrics(), dict)
    client, ctx = TestClient(app), app.state.context
    run = store.get(uid)
    ref = RunRef(uid, run)
    first_held = int(store.select(uid, "peaks", RowQuery(since=run.peaks.base, limit=1)).selection.columns["seq_num"][0])
    cases = [("newest 100 final rows (since_seq=frames-34, final=true, limit=100)",
              {"since_seq": frames - 34, "final": True, "limit": 100}),
             ("newest 100 rows (since=peak_rows-100)", {"since": run.peaks.n - 100}),
             ("all final rows held (since_seq=first held, final=true)",
              {"since_seq": first_held, "final": True, "limit": 1_000_000})]
    print(f"  GET /api/v1/health (TestClient overhead): {median_s(lambda: client.get('/api/v1/health'), repeat) * 1e3:.1f} ms")
    for name, params in cases:
        q = RowQuery(**params)
        body = table_response(*table_page(ctx, ref, "peaks", q)).body
        rows = len(json.loads(body)["columns"]["seq_num"])
        route = median_s(lambda q=q: table_response(*table_page(ctx, ref, "peaks", q)), repeat)
        http = median_s(lambda p=params: client.get(f"/api/v1/runs/{uid}/peaks", params=p), repeat)
        print(f"  poll {name}: {rows} rows, {len(body) / 1e6:.2f} MB JSON; route {route * 1e3:.2f} ms, "
              f"GET {http * 1e3:.1f} ms")


def old_store(frames: int, batch: int, lag: int, repeat: int, rev: str) -> None:
    """The store as it was before the bounded tables (git ``rev``:service/publish/state.py)."""
    try:
        text = subprocess.run(["git", "show", f"{rev}:service/publish/state.py"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"old store: not available ({exc})")
        return
    if "RowTable" in text:
        print(f"old store: {rev} already has the bounded store; nothing to compare")
        return
    path = Path(tempfile.mkdtemp()) / "old_state.py"
    path.write_text(text.replace("from ..jsonsafe import jsonable", "from service.jsonsafe import jsonable"))
    spec = importlib.util.spec_from_file_location("old_state", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_state"] = mod
    spec.loader.exec_module(mod)
    store = mod.RunStore()
    store.start_run("old", {"uid": "old"})
    tracemalloc.start()
    t0 = time.perf_counter()
    push(store, "old", 0, frames, batch, lag, np.random.default_rng(0))
    dt = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"old store, {frames} frames: traced {traced / 1e6:.1f} MB ({traced / frames:.0f} B per frame), "
          f"{dt / frames * 1e6:.1f} us per frame (traced)")
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        store.peaks_since("old", 0, final=True)
        t.append(time.perf_counter() - t0)
    print(f"  old peaks_since(0, final=True), store only: {statistics.median(t) * 1e3:.0f} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lag", type=int, default=16)
    p.add_argument("--held-rows", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-tracemalloc", action="store_true")
    p.add_argument("--compare-old", type=int, default=0, metavar="N")
    p.add_argument("--old-rev", default="86ab41d")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    store = RunStore(held_rows=args.held_rows)
    store.start_run("long", {"uid": "long"})
    push(store, "long", 0, 1000, args.batch, args.lag, rng)          # warm up (imports, first chunks)
    store.start_run("long", {"uid": "long"})
    rss0 = rss_mb()
    print(f"{args.frames} frames x {len(PEAKS)} peaks, batches of {args.batch}, final {args.lag} frames back, "
          f"held_rows {args.held_rows}")
    print(f"RSS before: {rss0:.1f} MB")
    if not args.no_tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    marks = sorted({args.frames // 10, args.frames // 2, args.frames})
    done = 0
    for mark in marks:
        push(store, "long", done, mark, args.batch, args.lag, rng)
        done = mark
        traced = tracemalloc.get_traced_memory()[0] / 1e6 if tracemalloc.is_tracing() else float("nan")
        print(f"  after {mark:>9} frames: RSS {rss_mb():.1f} MB, traced {traced:.1f} MB")
    dt = time.perf_counter() - t0
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    run = store.get("long")
    tables = {"peaks": run.peaks, "phases": run.phases, "scalars": run.scalars.table}
    held = ", ".join(f"{k} {t.held} rows {t.nbytes / 1e6:.1f} MB" for k, t in tables.items())
    print(f"RSS after: {rss_mb():.1f} MB (+{rss_mb() - rss0:.1f} MB); held: {held}")
    print(f"push: {dt / args.frames * 1e6:.1f} us per frame{'' if args.no_tracemalloc else ' (traced)'}; "
          f"peak rows {run.peaks.n}, frames final {run.frames_final}")
    polls(store, "long", args.frames, args.repeat)
    if args.compare_old:
        old_store(args.compare_old, args.batch, args.lag, args.repeat, args.old_rev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
