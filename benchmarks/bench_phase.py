"""Benchmark: live phase identification against the simulator's truth.

Workload: simulated azopolymer light cycles (``service.sim.AzoCycle``), 90 frames at 1 s,
reduced profiles of 500 points (q 1.5-20 1/nm) with Poisson noise at three levels (counts per
unit of I(q): 5, 30, 300), fitted as the service does (``TrajectoryFitter``, default peaks).
Two families of cycles:
  * demo:   the demo's film (default peaks, crystallinity floor 0.1), random time constants
            (3-15 s) and switch times, one cycle in three abrupt (``step=True``);
  * varied: the training distribution of ``service/train/phase.py`` with another seed (floor,
            peaks and background jittered; some cycles start part-way switched).
Methods: the shipped classifier checkpoint, the rules of the default phase spec, and the
baseline (main peak's area normalised to the first 5 frames, thresholds at the demo truth's
phase boundaries). Metrics: fraction of frames whose final label equals the truth's phase;
transition-time errors in frames (each truth boundary crossing matched to the nearest estimated
crossing of the same boundary and direction within 10 frames; missed and false crossings
counted); labelling time per frame (tracker updates only; fitting excluded, reported apart).

    python benchmarks/bench_phase.py [--cycles 4] [--seed 0] [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from service.sim import AzoCycle
from service.train.phase import evaluate_cycle, load_phase_checkpoint, random_cycle

LEVELS = (5.0, 30.0, 300.0)
METHODS = ("classifier", "rules", "baseline")


def demo_cycle(rng: np.random.Generator, k: int) -> AzoCycle:
    t_uv = rng.uniform(6.0, 14.0)
    t_vis = t_uv + rng.uniform(25.0, 40.0)
    return AzoCycle(tau_uv=rng.uniform(3.0, 15.0), tau_vis=rng.uniform(3.0, 15.0), step=(k % 3 == 2),
                    schedule=((0.0, "dark"), (t_uv, "uv"), (t_vis, "visible"), (t_vis + 30.0, "dark")))


def run(n_cycles: int, seed: int, checkpoint) -> dict:
    rng = np.random.default_rng(seed)
    q = np.linspace(1.5, 20.0, 500)
    times = np.arange(90.0)
    results = {}
    for family in ("demo", "varied"):
        for level in LEVELS:
            acc = {m: {"correct": [], "errors": [], "missed": 0, "false": 0, "ms": []} for m in METHODS}
            fit_s = 0.0
            for k in range(n_cycles):
                cycle = demo_cycle(rng, k) if family == "demo" else random_cycle(rng, times[-1])
                r = evaluate_cycle(cycle, times, q, level, rng, checkpoint)
                fit_s += r["fit_s"]
                for m in METHODS:
                    if m in r:
                        acc[m]["correct"].append(r[m]["correct"])
                        acc[m]["errors"].extend(r[m]["errors"].tolist())
                        acc[m]["missed"] += r[m]["missed"]
                        acc[m]["false"] += r[m]["false"]
                        acc[m]["ms"].append(r[m]["ms_per_frame"])
                n_cross = len(r["crossings"])
            results[(family, level)] = (acc, 1e3 * fit_s / (n_cycles * len(times)))
            print(f"  {family} {level:g}: done ({n_cross} crossings in the last cycle)", flush=True)
    return results


def print_table(results: dict) -> None:
    head = (f"{'cycles':7s} {'counts':>6s} {'method':10s} {'correct':>8s} {'|err| med':>9s} {'p90':>5s} "
            f"{'max':>5s} {'bias':>6s} {'missed':>6s} {'false':>5s} {'ms/frame':>8s}")
    print(head)
    print("-" * len(head))
    for (family, level), (acc, fit_ms) in results.items():
        for m in METHODS:
            a = acc[m]
            if not a["correct"]:
                continue
            e = np.abs(np.array(a["errors"])) if a["errors"] else np.array([math.nan])
            bias = float(np.mean(a["errors"])) if a["errors"] else math.nan
            print(f"{family:7s} {level:6g} {m:10s} {np.mean(a['correct']):8.3f} {np.median(e):9.2f} "
                  f"{np.quantile(e, 0.9):5.2f} {np.max(e):5.2f} {bias:+6.2f} {a['missed']:6d} {a['false']:5d} "
                  f"{np.mean(a['ms']):8.3f}")
        print(f"{'':7s} {'':6s} (fitting: {fit_ms:.1f} ms/frame, not included above)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=4, help="cycles per family and noise level (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="classifier checkpoint (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_phase_checkpoint(args.checkpoint)
    if ckpt is None:
        print("no checkpoint found: classifier rows are left out")
    t0 = time.perf_counter()
    results = run(args.cycles, args.seed, ckpt)
    print(f"\n{args.cycles} cycles x 90 frames per row group, torch threads {args.threads}, "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print_table(results)


if __name__ == "__main__":
    main()
