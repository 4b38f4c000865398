"""`scatterflow bench`: the real service end to end at a set frame rate, with pyFAI + lmfit as baseline."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end throughput and latency of the service",
                       description="Publish simulated frames through bluesky's 0MQ proxy into the service and "
                                   "measure sustained frames/s, Gpixel/s, latency p50/p99 to the published fit, "
                                   "drops and CPU use; pyFAI + lmfit per frame in the same run as baseline.")
    p.add_argument("--detector", default="Eiger1M", choices=["Pilatus300k", "Eiger1M", "Eiger4M"])
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--rate", type=float, default=50.0, help="frames/s the sender publishes (0: as fast as it can)")
    p.add_argument("--mode", default="inline", choices=["inline", "hdf5"], help="frames in the events or in an HDF5 file")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="worker processes on this host, or Ray actors on a private one-node Ray (run it inside "
                        "`unshare -n sh -c 'ip link set lo up && ...'` so Ray stays on loopback)")
    p.add_argument("--warmup", type=int, default=8, help="frames of an unmeasured run first (matrix build, first calls)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the pyFAI + lmfit baseline (it needs lmfit: pip install 'scatterflow[bench]')")
    p.add_argument("--no-tiled", action="store_true",
                   help="run the service without its Tiled archive (where tiled is not installed)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    p.add_argument("--workdir", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ..bench.baseline import BaselineUnavailable, require_lmfit
    from ..bench.endtoend import run_bench
    if not args.no_baseline:
        try:
            require_lmfit()
        except BaselineUnavailable as exc:
            print(f"scatterflow bench: {exc}", file=sys.stderr)
            return 2
    console = Console()
    with Progress(console=console) as progress:
        fitted = progress.add_task("fitted", total=args.frames)
        final = progress.add_task("final ", total=args.frames)

        def update(n_fit, n_final):
            progress.update(fitted, completed=n_fit)
            progress.update(final, completed=n_final)

        r = run_bench(detector=args.detector, frames=args.frames, rate=args.rate, mode=args.mode,
                      workers=args.workers, baseline=not args.no_baseline, workdir=args.workdir,
                      warmup=args.warmup, progress=update, engine=args.engine, tiled=not args.no_tiled)
    if args.json:
        write_json(r, args.json)
    table = Table(title=f"scatterflow bench: {r.detector} ({r.pixels / 1e6:.2f} Mpx), frames {r.mode}, "
                        f"{r.engine} engine")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("frames sent / fitted / final", f"{r.frames} / {r.fitted} / {r.final}"),
            ("requested rate", f"{r.rate_requested:.0f} frames/s" if r.rate_requested else "max"),
            ("sender time", f"{r.send_seconds:.2f} s"),
            ("sustained rate", f"{r.fps:.1f} frames/s, {r.fps * r.pixels / 1e9:.3f} Gpixel/s"),
            ("backlog when the sender stopped", f"{r.backlog} frames"
             + (f" ({r.backlog / r.rate_requested:.2f} s)" if r.rate_requested else "")),
            ("latency to provisional fit p50 / p99", f"{r.latency_provisional[0] * 1e3:.0f} / {r.latency_provisional[1] * 1e3:.0f} ms"),
            ("latency to final fit p50 / p99", f"{r.latency_final[0] * 1e3:.0f} / {r.latency_final[1] * 1e3:.0f} ms"),
            ("lost upstream / dropped / failed / rejected", f"{r.lost:.0f} / {r.dropped:.0f} / {r.failed:.0f} / {r.rejected:.0f}"
             + ("" if r.stopped else ", stop document lost")),
            ("CPU (service + workers)", f"{r.cpu_seconds:.1f} s, {1e3 * r.cpu_seconds / max(r.fitted, 1):.1f} ms/frame, "
                                        f"{100 * r.cpu_seconds / max(r.seconds, 1e-9) / r.cores:.0f} % of {r.cores} cores"),
            ("CPU ms/frame: service / workers / engine / sender / proxy",
             " / ".join(f"{1e3 * r.cpu_split[k] / max(r.fitted, 1):.1f}"
                        for k in ("service", "workers", "engine", "sender", "proxy"))),
            ("batches: count, mean frames per batch", f"{r.batches:.0f}, {r.mean_batch:.1f}"),
            ("worker wall ms/frame by stage", ", ".join(f"{k} {1e3 * v / max(r.fitted, 1):.1f}"
                                                        for k, v in sorted(r.stage_seconds.items()))),
            ("service CPU ms/frame by thread", ", ".join(
                f"{k} {1e3 * v / max(r.fitted, 1):.1f}" for k, v in sorted(r.thread_seconds.items(), key=lambda kv: -kv[1])
                if 1e3 * v / max(r.fitted, 1) >= 0.5)),
            ("Tiled write requests", f"{r.tiled_requests} ({r.tiled_requests / max(r.seconds, 1e-9):.1f}/s)"),
            ("worker devices", ", ".join(r.devices))]
    if r.baseline_fps:
        rows.append(("baseline pyFAI integrate1d + lmfit, per frame", f"{r.baseline_fps:.1f} frames/s"))
        rows.append(("speed-up over baseline", f"{r.fps / r.baseline_fps:.1f}x"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return 0


def write_json(r, path) -> None:
    """The run's figures as JSON (for scripts: benchmarks/gpu_check.sh): every BenchResult field,
    plus frames/s and Gpixel/s; NaN (no latency measured) is written as null."""
    import dataclasses
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return float(v) if hasattr(v, "dtype") else v     # numpy scalars
    out = dataclasses.asdict(r) | {"fps": r.fps, "gpixel_per_s": r.fps * r.pixels / 1e9}
    with open(path, "w") as f:
        json.dump(clean(out), f, indent=1)
