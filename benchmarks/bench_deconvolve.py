"""Two overlapping peaks: single fit, free two-peak fit and Richardson-Lucy, against the truth.

Simulation (truth known): two narrow Gaussian peaks (intrinsic FWHM w) whose centres lie
``--sep`` instrument FWHMs apart, blurred by a Gaussian instrument function (FWHM W), on a flat
background, Poisson counts; many noise seeds per count level. For each seed:

* a single-peak fit (workers.fit, Gaussian + constant) on the blurred profile;
* a two-peak fit on the blurred profile, widths free ("2-peak free") and widths bounded below by
  the instrument FWHM ("2-peak, FWHM >= W", which uses the same knowledge RL gets);
* RL (workers.deconvolve, instrument kernel, known background, ``--iterations`` iterations, or
  a discrepancy stop with ``--discrepancy``), then locate_peaks (two highest maxima, Gaussian
  sub-bin: "RL maxima") and fit_separated_peaks (two Gaussians fitted to the RL estimate,
  started at those maxima: "RL + peak fit").

Printed per count level: centre bias and scatter (std over seeds) for both peaks, the median
reported standard error of the fits, the fraction of seeds with both centres within ``--tol``
(1/nm) and the mean RL iterations; plus RL timing. ``--plot FILE`` writes a PNG of one seed.

    python benchmarks/bench_deconvolve.py [--seeds 32] [--counts 300 1000 3000 10000] [--plot var/rl.png]
                                          [--timing]    (RL speed on larger batches)
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from workers.deconvolve import fit_separated_peaks, instrument_kernel, locate_peaks, richardson_lucy
from workers.fit import fit_batch
from workers.profiles import BackgroundSpec, ModelSpec, PeakModel, PeakSpec

D = torch.float64


def simulate(area: float, seeds: int, *, W=0.3, w=0.06, sep=0.6, bg=50.0, n=201, seed=0):
    """q (N,), counts (S, N), truth centres (2,), intrinsic profile (N,), instrument FWHM W."""
    q = np.linspace(15.0, 19.0, n)
    c = np.array([17.0 - sep * W / 2 + 0.01, 17.0 + sep * W / 2 + 0.01])
    fb = math.hypot(W, w)

    def g(x0, f, a):
        return a * math.sqrt(4 * math.log(2) / math.pi) / f * np.exp(-4 * math.log(2) * (q - x0) ** 2 / f ** 2)
    lam = g(c[0], fb, area) + g(c[1], fb, 0.8 * area) + bg
    intrinsic = g(c[0], w, area) + g(c[1], w, 0.8 * area)
    y = np.random.default_rng(seed).poisson(lam, size=(seeds, n)).astype(float)
    return q, y, c, intrinsic, W, bg


def two_peak_fit(q, y, s, W, fwhm_min):
    pk = [PeakSpec(nm, "gaussian", center=c0, fwhm=W, center_min=16.4, center_max=17.6, fwhm_min=fwhm_min)
          for nm, c0 in (("a", 16.95), ("b", 17.05))]
    m = PeakModel(ModelSpec(tuple(pk), BackgroundSpec("polynomial", 0)))
    res = fit_batch(m, q, y, s, m.bind(q).guess(y), max_iter=300)
    c, e = res.params[:, [0, 3]].numpy(), res.stderr[:, [0, 3]].numpy()
    order = np.argsort(c, axis=1)
    return np.take_along_axis(c, order, 1), np.take_along_axis(e, order, 1), res.converged.numpy()


def run_level(area, seeds, iterations, tol, sep, discrepancy=None):
    qn, yn, truth, _, W, bg = simulate(area, seeds, sep=sep)
    q, y = torch.tensor(qn, dtype=D), torch.tensor(yn, dtype=D)
    s = y.clamp_min(1.0).sqrt()
    rows = {}
    m1 = PeakModel(ModelSpec((PeakSpec("a", "gaussian", center=17.0, fwhm=W),), BackgroundSpec("polynomial", 0)))
    r1 = fit_batch(m1, q, y, s, m1.bind(q).guess(y))
    rows["single fit"] = (r1.params[:, :1].numpy().repeat(2, 1), r1.stderr[:, :1].numpy().repeat(2, 1))
    c, e, _ = two_peak_fit(q, y, s, W, None)
    rows["2-peak free"] = (c, e)
    c, e, _ = two_peak_fit(q, y, s, W, W)
    rows["2-peak, FWHM >= W"] = (c, e)
    k = instrument_kernel(q, W)
    t0 = time.perf_counter()
    rl = richardson_lucy(y, k, iterations=iterations, sigma=s, background=bg, discrepancy=discrepancy)
    loc = locate_peaks(q, rl.estimate, n_peaks=2)
    dt = time.perf_counter() - t0
    rows["RL maxima"] = (loc.center.numpy(), None)
    rows["RL + peak fit"] = (fit_separated_peaks(q, rl.estimate, loc.center).center.numpy(), None)
    dx = qn[1] - qn[0]
    print(f"\npeak areas {area:g} and {0.8 * area:g} (1/nm x counts/bin, i.e. {area / dx:.0f} and {0.8 * area / dx:.0f} "
          f"counts), blurred maximum {yn.mean(0).max() - bg:.0f} counts/bin over {bg:g}; {seeds} seeds; "
          f"truth centres {truth.round(3)}, separation {sep} x instrument FWHM {W}")
    print(f"{'method':20s} {'bias c1':>8s} {'bias c2':>8s} {'std c1':>8s} {'std c2':>8s} {'med se':>8s} {'ok':>5s}")
    for name, (c, e) in rows.items():
        err = c - truth
        ok = np.mean(np.all(np.abs(err) <= tol, axis=1))
        se = "" if e is None else f"{np.nanmedian(e):8.4f}"
        print(f"{name:20s} {np.nanmean(err[:, 0]):8.4f} {np.nanmean(err[:, 1]):8.4f} {np.nanstd(err[:, 0]):8.4f} "
              f"{np.nanstd(err[:, 1]):8.4f} {se:>8s} {ok:5.2f}")
    print(f"RL: mean iterations {rl.n_iter.double().mean():.0f}, stopped {rl.stopped.double().mean():.2f}, "
          f"{dt:.2f} s for {seeds} frames x {len(qn)} points (RL + maxima)")
    return qn, yn, rl, truth


def plot(path, qn, yn, rl, truth, area, sep):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, _, _, intrinsic, _, bg = simulate(area, 1, sep=sep)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(qn, yn[0], ".", ms=3, color="0.5", label="blurred counts (seed 0)")
    ax.plot(qn, rl.model[0].numpy(), "-", color="C0", label="RL reblurred + background")
    ax.plot(qn, rl.estimate[0].numpy() + bg, "-", color="C3", label="RL estimate + background")
    ax.plot(qn, intrinsic + bg, "--", color="k", lw=0.8, label="truth (intrinsic) + background")
    for c in truth:
        ax.axvline(c, color="k", lw=0.5, ls=":")
    ax.set_xlim(16.2, 17.8)
    ax.set_xlabel("q (1/nm)")
    ax.set_ylabel("counts per bin")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def timing(device: str, iterations: int = 200):
    """RL throughput: frames per second for a few batch sizes, N points, kernel FWHM 15 bins."""
    for B, N, dtype in ((64, 1000, torch.float64), (256, 1000, torch.float32), (256, 2000, torch.float32),
                        (1024, 2000, torch.float32)):
        q = torch.linspace(5.0, 25.0, N, dtype=dtype, device=device)
        k = instrument_kernel(q, 15 * float(q[1] - q[0]))
        y = torch.rand(B, N, dtype=dtype, device=device) * 100 + 10
        richardson_lucy(y[:2], k, iterations=5)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        richardson_lucy(y, k, iterations=iterations, early_exit=False)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"RL {device} {str(dtype)[6:]}: B={B} N={N} K={k.numel()} {iterations} iterations: {dt:.3f} s, "
              f"{B / dt:.0f} frames/s, {dt / iterations * 1e3:.2f} ms/iteration")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--counts", type=float, nargs="+", default=[300.0, 1000.0, 3000.0, 10000.0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--discrepancy", type=float, default=None, help="stop at chi2/n <= this (default: off)")
    ap.add_argument("--sep", type=float, default=0.6, help="centre separation in instrument FWHMs")
    ap.add_argument("--tol", type=float, default=0.02, help="centre tolerance, 1/nm")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--timing", action="store_true", help="only time RL on larger batches")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.timing:
        timing(a.device)
        return
    last = None
    for area in a.counts:
        last = run_level(area, a.seeds, a.iterations, a.tol, a.sep, a.discrepancy) + (area,)
    if a.plot and last is not None:
        plot(a.plot, *last[:4], last[4], a.sep)


if __name__ == "__main__":
    main()
