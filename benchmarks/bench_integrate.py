"""Azimuthal-integration throughput: scatterflow's CSR engine against pyFAI, same run, same frames.

Prints frames/s for Eiger1M (1065x1030) and Eiger4M (2167x2070) float32 frames, 1000 bins in
q_nm^-1, batch 1 and batched, ``bbox`` and ``no`` splitting, against pyFAI's
``integrate1d_ng(method=("bbox"|"no", "csr", "cython"), error_model="poisson")`` and its legacy
``integrate1d_legacy(method="csr")``; also the matrix build times. On CUDA also with and
without the host-to-device copy, and the raw pinned host-to-device copy bandwidth (the PCIe
figure the copy is held to). ``--quick`` runs Eiger1M only with fewer repetitions; ``--json``
also writes every row (benchmarks/gpu_check.sh reads it).

    .venv/bin/python benchmarks/bench_integrate.py [--quick] [--batch 16] [--device auto]
        [--detectors Eiger1M,Eiger4M] [--reps 10] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import numpy as np
import torch

from workers.geometry import Geometry
from workers.integrate import build_integrator_1d

NPT = 1000


def _timeit(fn, reps: int, sync=lambda: None) -> float:
    """Median wall time (s) of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def h2d_bandwidth(pinned: torch.Tensor, device: torch.device, reps: int) -> float:
    """Raw host-to-device copy of a pinned tensor, bytes/s: the PCIe figure for the copy."""
    dst = torch.empty(pinned.shape, dtype=pinned.dtype, device=device)
    t = _timeit(lambda: dst.copy_(pinned, non_blocking=True), reps, torch.cuda.synchronize)
    return pinned.numel() * pinned.element_size() / t


def bench_detector(name: str, batch: int, reps: int, device: torch.device) -> dict:
    """Print the timings of one detector; return them (for --json)."""
    geo = Geometry(dist=0.25, poni1=0.035, poni2=0.04, rot1=0.01, rot2=-0.02, detector=name,
                   wavelength=1e-10)
    ai = geo.to_pyfai()
    rng = np.random.default_rng(0)
    frames = rng.poisson(20.0, size=(batch,) + geo.shape).astype(np.float32)
    frame = frames[0]
    print(f"\n== {name} {geo.shape[0]}x{geo.shape[1]} ({frame.size / 1e6:.2f} Mpx), "
          f"{NPT} bins q_nm^-1, float32 frames, torch threads {torch.get_num_threads()}, "
          f"device {device}")
    out = {"detector": name, "pixels": frame.size, "frame_bytes": frame.nbytes, "batch": batch,
           "device": str(device), "torch_threads": torch.get_num_threads(), "rows": []}
    if device.type == "cuda":
        out["h2d_pinned_bytes_per_s"] = h2d_bandwidth(torch.from_numpy(frames).pin_memory(), device, reps)
        print(f"raw pinned host-to-device copy of the batch: {out['h2d_pinned_bytes_per_s'] / 1e9:.1f} GB/s")
    for method in ("bbox", "no"):
        t0 = time.perf_counter()
        integ = build_integrator_1d(geo, npt=NPT, method=method, device=device)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ai.reset()
        ai.integrate1d_ng(frame, NPT, method=(method, "csr", "cython"), error_model="poisson")
        t_build_pf = time.perf_counter() - t0
        print(f"[{method}] matrix build: ours {t_build:.2f} s (nnz {integ.matrix.nnz}), "
              f"pyFAI {t_build_pf:.2f} s (incl. first integration)")

        t_pf = _timeit(lambda: ai.integrate1d_ng(frame, NPT, method=(method, "csr", "cython"),
                                                 error_model="poisson"), reps)
        t_leg = _timeit(lambda: ai.integrate1d_legacy(frame, NPT, method=(method, "csr", "cython")), reps)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        rows = [(f"pyFAI integrate1d_ng ({method},csr,cython) poisson", t_pf, 1),
                (f"pyFAI integrate1d_legacy ({method},csr,cython)", t_leg, 1)]
        t1 = _timeit(lambda: integ(frame), reps, sync)
        rows.append(("ours batch 1 (numpy in)", t1, 1))
        tb = _timeit(lambda: integ(frames), max(1, reps // 2), sync)
        rows.append((f"ours batch {batch} (numpy in)", tb, batch))
        if device.type == "cuda":
            on_dev = torch.from_numpy(frames).to(device)
            tbd = _timeit(lambda: integ(on_dev), reps, sync)
            rows.append((f"ours batch {batch} (frames on GPU, no H2D)", tbd, batch))
            pinned = torch.from_numpy(frames).pin_memory()
            tbp = _timeit(lambda: integ(pinned), reps, sync)
            rows.append((f"ours batch {batch} (pinned host, with H2D)", tbp, batch))
        for label, t, n in rows:
            per = t / n
            print(f"  {label:<52s} {per * 1e3:8.2f} ms/frame {1.0 / per:9.1f} frames/s  "
                  f"x{t_pf / per:5.2f} vs pyFAI ng, x{t_leg / per:5.2f} vs legacy")
            out["rows"].append({"method": method, "label": label, "batch": n, "seconds_per_frame": per,
                                "fps": 1.0 / per})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Eiger1M only, fewer repetitions")
    parser.add_argument("--batch", type=int, default=16, help="frames per batched call")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--detectors", default=None,
                        help="comma-separated pyFAI detector names (default Eiger1M,Eiger4M; --quick: Eiger1M)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; --quick: 5)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the timings to PATH as JSON")
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    warnings.filterwarnings("ignore")
    logging.getLogger("pyFAI").setLevel(logging.ERROR)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    detectors = ["Eiger1M"] if args.quick else ["Eiger1M", "Eiger4M"]
    if args.detectors:
        detectors = args.detectors.split(",")
    reps = args.reps or (5 if args.quick else 10)
    results = [bench_detector(name, args.batch if not args.quick else min(args.batch, 8), reps, device)
               for name in detectors]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
