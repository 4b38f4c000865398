"""Benchmark: batched warm-started LM vs scipy curve_fit and lmfit, frame by frame.

Workload: 3 pseudo-Voigt peaks + linear background on 1000 points (q 10-20 1/nm), Poisson
noise, slowly drifting parameters; every method starts each frame from the previous frame's
result (warm start). All timings are taken in the same run, so ratios are meaningful even on
a loaded machine.

    python benchmarks/bench_fit.py [--quick] [--device cpu|cuda] [--threads N]

``--series``: the regularised trajectory instead. A series of 2000 frames (3 pseudo-Voigt +
line, 800 points, a step of one centre at mid-series; CPU seconds, fairer than wall time on a
shared machine) fitted by ``scatterflow fit``'s path
(in-process, start-up excluded, and the command in a subprocess, start-up included; both with
``--batch`` frames per update and one torch thread, the command's default), by the same path
without the regularizer (the per-frame fits alone), by warm per-frame curve_fit on the same
frames and by lmfit on the first ``--lmfit-frames``; ratios to curve_fit, the regularizer's
cost relative to the per-frame fits, and accuracy: centre RMSE against the truth relative to
curve_fit's, pull std.

    python benchmarks/bench_fit.py --series [--frames 2000] [--batch 64] [--repeats 2]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from workers.fit import fit_batch
from workers.profiles import BackgroundSpec, ModelSpec, PeakModel, PeakSpec

CENTERS, FWHM, AREAS, ETAS = (12.0, 15.0, 18.0), (0.40, 0.55, 0.30), (200.0, 300.0, 100.0), (0.3, 0.6, 0.5)


def make_data(n_frames: int, n_points: int = 1000, seed: int = 0, step: float = 0.0):
    """q (N,), counts (F, N), sigma (F, N), truth (F, 14) as float64 numpy; ``step`` (1/nm) moves
    the second centre from the middle frame on."""
    rng = np.random.default_rng(seed)
    q = np.linspace(10.0, 20.0, n_points)
    spec = ModelSpec(tuple(PeakSpec(f"p{i}", "pseudo_voigt", center=c, fwhm=w)
                           for i, (c, w) in enumerate(zip(CENTERS, FWHM))), BackgroundSpec("polynomial", 1))
    s = np.linspace(0.0, 1.0, n_frames)[:, None]
    cols = []
    for c, w, a, e in zip(CENTERS, FWHM, AREAS, ETAS):
        cols += [c + 0.05 * np.sin(2 * np.pi * s), w * (1 + 0.1 * s), a * (1 + 0.3 * s), e + 0 * s]
    cols += [100.0 + 0 * s, 10.0 + 0 * s]
    truth = np.concatenate(cols, axis=1)
    truth[n_frames // 2:, 4] += step
    model = PeakModel(spec).bind(torch.tensor(q))
    lam = model.evaluate(torch.tensor(truth)).numpy()
    y = rng.poisson(lam).astype(float)
    return q, y, np.sqrt(np.maximum(y, 1.0)), truth, spec


def _pv(x, c, w, a, eta):
    g = a * math.sqrt(4 * math.log(2) / math.pi) / w * np.exp(-4 * math.log(2) * (x - c) ** 2 / w ** 2)
    lo = a * (2 / (math.pi * w)) / (1 + 4 * (x - c) ** 2 / w ** 2)
    return eta * lo + (1 - eta) * g


def bench_curve_fit(q, y, sigma, p_start, n, clock=time.perf_counter):
    """Warm per-frame curve_fit of the first n frames: s per frame and (params, stderr) per frame."""
    from scipy.optimize import curve_fit
    x0, xs = 15.0, 5.0

    def f(x, *p):
        out = p[12] + p[13] * (x - x0) / xs
        for k in range(3):
            out = out + _pv(x, *p[4 * k:4 * k + 4])
        return out
    p = p_start.copy()
    res = []
    t0 = clock()
    for i in range(n):
        p, cov = curve_fit(f, q, y[i], p0=p, sigma=sigma[i], absolute_sigma=False)
        res.append((p.copy(), np.sqrt(np.diag(cov))))
    return (clock() - t0) / n, res


def bench_lmfit(q, y, sigma, p_start, n, clock=time.perf_counter):
    from lmfit.models import LinearModel, PseudoVoigtModel
    mod = LinearModel(prefix="bg_")
    for k in range(3):
        mod = mod + PseudoVoigtModel(prefix=f"p{k}_")
    pars = mod.make_params()
    for k in range(3):
        c, w, a, e = p_start[4 * k:4 * k + 4]
        pars[f"p{k}_center"].set(value=c)
        pars[f"p{k}_sigma"].set(value=w / 2, min=1e-4)
        pars[f"p{k}_amplitude"].set(value=a)
        pars[f"p{k}_fraction"].set(value=e, min=0, max=1)
    pars["bg_intercept"].set(value=p_start[12] - p_start[13] * 15.0 / 5.0)
    pars["bg_slope"].set(value=p_start[13] / 5.0)
    t0 = clock()
    for i in range(n):
        out = mod.fit(y[i], pars, x=q, weights=1.0 / sigma[i])
        pars = out.params
    return (clock() - t0) / n


def bench_batched(q, y, sigma, p_warm, spec, device, dtype, repeats=1):
    model = PeakModel(spec)
    args = [torch.tensor(a, dtype=dtype, device=device) for a in (q, y, sigma, p_warm)]
    best, res = math.inf, None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fit_batch(model, *args)
        _ = res.params.cpu()
        best = min(best, time.perf_counter() - t0)
    return best / y.shape[0], res


SERIES_PEAKS = """\
background: {kind: polynomial, degree: 1}
peaks:
  - {name: p0, shape: pseudo_voigt, center: 12.0, fwhm: 0.40, center_min: 11.5, center_max: 12.5}
  - {name: p1, shape: pseudo_voigt, center: 15.0, fwhm: 0.55, center_min: 14.5, center_max: 15.5}
  - {name: p2, shape: pseudo_voigt, center: 18.0, fwhm: 0.30, center_min: 17.5, center_max: 18.5}
regularizer: {window: 16, penalty: huber, strength: 2.0}
"""


def _fit_path(q, y, sigma, spec, reg, batch) -> float:
    """CPU s for TrajectoryFitter over the series in batches, then finish (one torch thread)."""
    from workers.temporal import TrajectoryFitter
    n = len(y)
    t0 = time.process_time()
    tf = TrajectoryFitter(spec, reg)
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        tf.update(q, y[sl], sigma[sl], np.arange(n)[sl], np.arange(n)[sl] * 0.1)
    tf.finish()
    return time.process_time() - t0


def bench_series(a) -> int:
    """The regularised trajectory of a 2000-frame series against per-frame curve_fit and lmfit."""
    import os
    import resource
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import pandas as pd

    from service.commands import fit as cmd
    from workers.specs import RegularizerSpec
    n = a.frames
    q, y, sigma, truth, _ = make_data(n, 800, seed=1, step=0.05)
    tmp = Path(tempfile.mkdtemp(prefix="bench_series_"))
    np.savez(tmp / "profiles.npz", q=q, I=y, sigma=sigma, time=np.arange(n) * 0.1)
    (tmp / "peaks.yaml").write_text(SERIES_PEAKS)
    argv = ["fit", str(tmp / "profiles.npz"), "--peaks", str(tmp / "peaks.yaml"), "-o", str(tmp / "out.csv"),
            "--device", "cpu", "--batch", str(a.batch), "--no-plot", "--quiet"]
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    spec, reg = cmd._fit_specs(tmp / "peaks.yaml")
    import rich.progress  # noqa: F401  (imported by the command: start-up, not fitting)
    times = {k: [] for k in ("ours", "cli", "cli_wall", "path", "per_frame", "cf")}
    for _ in range(a.repeats):       # interleaved: the machine's load moves between methods alike
        t0 = time.process_time()
        args = parser.parse_args(argv)
        assert args.func(args) == 0                       # sets one torch thread on CPU
        times["ours"].append(time.process_time() - t0)
        times["path"].append(_fit_path(q, y, sigma, spec, reg, a.batch))
        times["per_frame"].append(_fit_path(q, y, sigma, spec, RegularizerSpec(window=1, penalty="none"), a.batch))
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run([sys.executable, "-m", "service.cli", *argv], check=True, env=dict(os.environ),
                       stdout=subprocess.DEVNULL)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        times["cli_wall"].append(time.perf_counter() - t0)
        times["cli"].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        cf_t, cf_res = bench_curve_fit(q, y, sigma, truth[0], n, clock=time.process_time)
        times["cf"].append(cf_t * n)
    lm_t = bench_lmfit(q, y, sigma, truth[0], a.lmfit_frames, clock=time.process_time) * n
    df = pd.read_csv(tmp / "out.csv")
    c = df["center"].to_numpy().reshape(n, 3)
    e = df["center_err"].to_numpy().reshape(n, 3)
    tc = truth[:, [0, 4, 8]]
    cfp = np.array([r[0] for r in cf_res])[:, [0, 4, 8]]
    cfe = np.array([r[1] for r in cf_res])[:, [0, 4, 8]]
    far = np.abs(np.arange(n) - n // 2) > 3
    rmse = np.sqrt(((c - tc) ** 2).mean(0) / ((cfp - tc) ** 2).mean(0))
    print(f"torch {torch.__version__}, 1 torch thread; {n} frames x 800 points, 3 pseudo-Voigt + line, regularizer "
          f"window 16 huber 2.0, batch {a.batch}; CPU seconds (the command: wall in brackets), {a.repeats} "
          f"interleaved runs, min-max")
    cf_best = min(times["cf"])
    for key, name in (("ours", "scatterflow fit command, in-process (start-up excluded)"),
                      ("cli", f"scatterflow fit command (start-up included) [{min(times['cli_wall']):.1f} s]"),
                      ("path", "  its fitter alone (TrajectoryFitter, regularised)"),
                      ("per_frame", "  per-frame fits alone (penalty none, in-process)"),
                      ("cf", "scipy curve_fit, warm, per frame")):
        ts = times[key]
        print(f"  {name:55s} {min(ts):7.2f}-{max(ts):6.2f} s  {cf_best / min(ts):5.1f}x curve_fit")
    reg_cost = min(times["path"]) - min(times["per_frame"])
    print(f"  regularizer (fitter regularised - per-frame fits): {reg_cost:.2f} s = "
          f"{reg_cost / min(times['per_frame']):.2f}x the per-frame fits")
    print(f"  {'lmfit Model, warm, per frame (first %d frames, scaled)' % a.lmfit_frames:55s} {lm_t:7.1f} s  "
          f"{cf_best / lm_t:5.2f}x curve_fit")
    print(f"  final rows: converged {df['converged'].mean():.3f}, unidentified {int(df['unidentified'].sum())}, "
          f"change points at {sorted(set(df.loc[df['change_point'], 'seq_num'].tolist()))}")
    pull, cf_pull = ((c - tc) / e)[far].std(0), ((cfp - tc) / cfe)[far].std(0)
    print(f"  centre RMSE vs truth / curve_fit's: {np.round(rmse, 3).tolist()}; pull std (final) "
          f"{np.round(pull, 3).tolist()}, (curve_fit) {np.round(cf_pull, 3).tolist()}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (about 30 s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--series", action="store_true", help="the regularised trajectory (module docstring)")
    ap.add_argument("--frames", type=int, default=2000, help="--series: frames")
    ap.add_argument("--batch", type=int, default=64, help="--series: frames per update")
    ap.add_argument("--repeats", type=int, default=2, help="--series: interleaved runs")
    ap.add_argument("--lmfit-frames", type=int, default=40, help="--series: frames lmfit fits")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.series:
        return bench_series(a)
    sizes = (200, 1000) if a.quick else (1000, 10000)
    n_cf, n_lm = (30, 10) if a.quick else (200, 40)
    q, y, sigma, truth, spec = make_data(max(sizes))
    # a first cold pass gives every frame's result; frame t then starts from frame t-1's
    model = PeakModel(spec)
    guess = model.bind(torch.tensor(q)).guess(torch.tensor(y[:1]))
    first = fit_batch(model, torch.tensor(q), torch.tensor(y[:1]), torch.tensor(sigma[:1]), guess)
    cold = fit_batch(model, torch.tensor(q), torch.tensor(y), torch.tensor(sigma),
                     first.params.expand(len(y), -1))
    p_warm = np.concatenate([first.params.numpy(), cold.params.numpy()[:-1]])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {a.device}")
    print("workload: 3 pseudo-Voigt + linear background, 1000 points, 14 parameters, warm start")
    # best of two passes everywhere: other processes on a small machine add noise
    cf_t, cf_res = min(bench_curve_fit(q, y, sigma, p_warm[0], n_cf) for _ in range(2))
    lm_t = min(bench_lmfit(q, y, sigma, p_warm[0], n_lm) for _ in range(2))
    rows = [("scipy curve_fit (per frame)", n_cf, cf_t), ("lmfit Model (per frame)", n_lm, lm_t)]
    agree = None
    for dtype in (torch.float64, torch.float32):
        for n in sizes:
            t, res = bench_batched(q, y[:n], sigma[:n], p_warm[:n], spec, a.device, dtype, repeats=2)
            rows.append((f"fit_batch {str(dtype)[6:]} ({n} frames)", n, t))
            if dtype == torch.float64 and agree is None:
                cfp = np.array([r[0] for r in cf_res])
                cfe = np.array([r[1] for r in cf_res])
                agree = np.abs(res.params.cpu().numpy()[:n_cf, [0, 4, 8]] - cfp[:, [0, 4, 8]]) / cfe[:, [0, 4, 8]]
                conv = res.converged.float().mean().item()
    print(f"{'method':40s} {'frames':>7s} {'ms/fit':>9s} {'fits/s':>9s} {'x curve_fit':>11s} {'x lmfit':>8s}")
    for name, n, t in rows:
        print(f"{name:40s} {n:7d} {1e3 * t:9.3f} {1 / t:9.0f} {cf_t / t:11.1f} {lm_t / t:8.1f}")
    print(f"batched vs curve_fit centres: max |diff| = {agree.max():.2e} stderr; "
          f"batched converged fraction {conv:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
