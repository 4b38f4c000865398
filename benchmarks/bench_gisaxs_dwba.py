"""Benchmark: parameters recovered by the bounded LM with the Born and the DWBA GISAXS models on
held-out BornAgain maps, Born data (vacuum substrate) and DWBA data (Si substrate): the bias of a
Born-only fit of a DWBA pattern.

    python benchmarks/bench_gisaxs_dwba.py [--n 24] [--data-dir var/inversion] [--threads 1]

Maps: the GISAXS encoder's grid and parameter law (``service.train.inversion``: lambda 0.1 nm,
alpha_i 0.2 deg, 32 x 64 pixels, exit angles 0.6-39 mrad; spheres with Gaussian radii on a
radial paracrystal), computed by BornAgain 25 with the sizes as a 41-member Mixture over +-4
sigma (not our 9-node quadrature), particles in the vacuum layer on (a) a vacuum substrate
(Born) and (b) Si (SI below: alpha_c = 2.5 mrad, the Yoneda band between rows 1 and 2 of the
1.25 mrad rows); scaled to max i0 plus a background, with the training set's counting noise
(c0 = 10^U(3, 6) counts at i0). Cached as .npz in --data-dir.

Fits: ``workers.inversion.lm.fit_bounded`` (via ``refine.refine``, 100 iterations) of
radius, pd, distance, disorder, i0, background within the encoder's bounds, from three starts
around the truth (shape x 1, x (1.15, 1.3, 0.9, 1.3), x (0.87, 0.7, 1.1, 0.75), amplitudes by
non-negative least squares), the start of least chi2 kept. Models: ``gisaxs.spheres_paracrystal``
(Born) and ``dwba.spheres_paracrystal_dwba`` on ``dwba_q(grid, SI)``; "Born, alpha_f > 2 alpha_c":
the Born model fitted without the rows below twice the critical angle (Yoneda band excluded);
"shipped encoder + Born LM": what the service does today (``GisaxsInverter`` with
service/models/gisaxs_encoder.pt, trained on Born maps; its LM in the Born model, 40 iterations).
Per row: median signed relative error (bias), median and largest |relative error| of each
shape parameter (%), median reduced chi2, share converged.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

SI = (3.16e-6, 3.5e-8)           # about Si at 12.4 keV (lambda 0.1 nm): delta, beta (Henke tables)
N_SIZES, N_SIGMA = 41, 4.0
STARTS = ((1.0, 1.0, 1.0, 1.0), (1.15, 1.3, 0.9, 1.3), (0.87, 0.7, 1.1, 0.75))


def bornagain_map(row, substrate: tuple[float, float] | None) -> np.ndarray:
    """BornAgain 25 map (H, W) of ``row`` = (radius, pd, distance, disorder, ...) on the encoder's
    grid; substrate (delta, beta), None: vacuum (Born)."""
    import bornagain as ba

    from service.train.inversion import GISAXS_GRID, gisaxs_grid
    r, pd, dist, dis = row[:4]
    mat = ba.RefractiveMaterial("particle", (1.0, 0.0, 0.0), 1e-10, 0.0)
    mix = ba.Mixture()
    for t in np.linspace(-N_SIGMA, N_SIGMA, N_SIZES):
        mix.addParticle(ba.Particle(mat, ba.Sphere(r * (1.0 + pd * t))), math.exp(-0.5 * t * t))
    st = ba.RadialParacrystal(mix, dist, 0.0)
    st.setProbabilityDistribution(ba.Profile1DGauss(dis * dist))
    top = ba.Layer(ba.Vacuum())
    top.deposit2D(st)
    sample = ba.Sample()
    sample.addLayer(top)
    sub = ba.Vacuum() if substrate is None else ba.RefractiveMaterial("Si", (0.2, 0.2, 0.2), *substrate)
    sample.addLayer(ba.Layer(sub))
    g = GISAXS_GRID
    det = ba.SphericalDetector(g["u"][2], g["u"][0], g["u"][1], g["v"][2], g["v"][0], g["v"][1])
    res = ba.ScatteringSimulation(ba.Beam(1.0, g["wavelength"], g["alpha_i"]), sample, det).simulate()
    return np.asarray(res.flatVector()).reshape(gisaxs_grid().shape)


def reference_maps(n: int, seed: int, data_dir: Path) -> dict:
    """Born and DWBA maps of the same n parameter rows, with noise (module docstring)."""
    from service.train.inversion import sample_gisaxs_params
    path = Path(data_dir) / f"gisaxs_dwba_contrast_n{n}_s{seed}.npz"
    if not path.exists():
        p = sample_gisaxs_params(np.random.default_rng(40_000 + seed), n)
        t0 = time.perf_counter()
        maps = {k: np.stack([bornagain_map(row, sub) for row in p]) for k, sub in (("born", None), ("dwba", SI))}
        print(f"BornAgain: {2 * n} maps in {time.perf_counter() - t0:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, params=p, **maps)
    with np.load(path) as z:
        p, maps = z["params"], {k: z[k] for k in ("born", "dwba")}
    rng = np.random.default_rng(50_000 + seed)
    out = {"params": p}
    for k, m in maps.items():
        clean = p[:, 4, None, None] * m / m.max((1, 2), keepdims=True) + p[:, 5, None, None]
        sigma = np.sqrt(clean * p[:, 4, None, None] / 10 ** rng.uniform(3, 6, (n, 1, 1)))
        out[k] = (clean + sigma * rng.standard_normal(clean.shape), sigma)
    return out


def fit(model, y: np.ndarray, sigma: np.ndarray, truth: np.ndarray, rows_ok: np.ndarray | None = None):
    """Bounded LM from STARTS (module docstring); returns params (B, 6), chi2_red, converged."""
    from service.train.inversion import GISAXS_SHAPE
    from workers.inversion.models import amplitude_basis
    from workers.inversion.refine import refine
    from workers.inversion.search import nonneg_amplitudes
    D = torch.float64
    B = len(y)
    x = torch.arange(y[0].size, dtype=D)
    yt, st = torch.tensor(y.reshape(B, -1)), torch.tensor(sigma.reshape(B, -1))
    if rows_ok is not None:
        st = torch.where(torch.tensor(np.repeat(rows_ok, y.shape[2]))[None], st, torch.full_like(st, math.nan))
    _, lo, hi, _ = GISAXS_SHAPE
    lower = torch.tensor([*lo, 0.0, 0.0], dtype=D)
    upper = torch.tensor([*hi, math.inf, math.inf], dtype=D)
    basis = amplitude_basis(model)
    best = None
    for f in STARTS:
        shape = torch.minimum(torch.maximum(torch.tensor(truth[:, :4] * np.array(f)), lower[:4]), upper[:4])
        amp, _ = nonneg_amplitudes(basis(x, shape), yt, st)
        res = refine(model, x, yt, st, torch.cat([shape, amp], 1), lower, upper, max_iter=100)
        if best is None:
            best = res
            continue
        better = res.chi2_red < best.chi2_red
        best.params[better], best.chi2_red[better] = res.params[better], res.chi2_red[better]
        best.converged[better] = res.converged[better]
    return best.params.numpy(), best.chi2_red.numpy(), best.converged.numpy()


def table(rows: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]], truth: np.ndarray) -> str:
    names = ("radius", "pd", "distance", "disorder")
    head = "| data | model | " + " | ".join(f"{n} bias / median / max (%)" for n in names) + " | chi2_red | converged |"
    lines = [head, "|" + " --- |" * (len(names) + 4)]
    for data, model, p, chi2, conv in rows:
        rel = 100 * (p[:, :4] / truth[:, :4] - 1)
        cells = [f"{np.median(rel[:, j]):+.1f} / {np.median(np.abs(rel[:, j])):.1f} / {np.abs(rel[:, j]).max():.1f}"
                 for j in range(4)]
        lines.append(f"| {data} | {model} | " + " | ".join(cells) + f" | {np.median(chi2):.3g} | {conv.mean():.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="held-out maps per data kind (default 24)")
    ap.add_argument("--data-dir", type=Path, default=Path("var/inversion"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from service.train.inversion import MODELS_DIR, gisaxs_grid, load_encoder_checkpoint
    from workers.inversion.dwba import dwba_q, spheres_paracrystal_dwba
    from workers.inversion.gisaxs import spheres_paracrystal
    from workers.inversion.refine import GisaxsInverter
    from workers.inversion.spec import Substrate
    grid = gisaxs_grid()
    gq, dq = grid.q(), dwba_q(grid, Substrate(*SI))
    born = lambda x, p: spheres_paracrystal(gq, p).reshape(len(p), -1)          # noqa: E731
    dwba = lambda x, p: spheres_paracrystal_dwba(dq, p).reshape(len(p), -1)     # noqa: E731
    data = reference_maps(args.n, args.seed, args.data_dir)
    truth = data["params"]
    above = grid.alpha_f()[:, 0].numpy() > 2 * math.sqrt(2 * SI[0])
    rows = []
    t0 = time.perf_counter()
    for dname, mname, model, mask in (("Born (vacuum)", "Born", born, None), ("DWBA (Si)", "DWBA", dwba, None),
                                      ("DWBA (Si)", "Born", born, None),
                                      ("DWBA (Si)", "Born, alpha_f > 2 alpha_c", born, above)):
        y, s = data["dwba" if "DWBA" in dname else "born"]
        rows.append((dname, mname, *fit(model, y, s, truth, mask)))
    if (MODELS_DIR / "gisaxs_encoder.pt").exists():
        inv = GisaxsInverter(load_encoder_checkpoint("gisaxs"))
        for key, dname in (("born", "Born (vacuum)"), ("dwba", "DWBA (Si)")):
            res = inv(*data[key])
            rows.append((dname, "shipped encoder + Born LM", res.params.numpy(), res.chi2_red.numpy(),
                         res.converged.numpy()))
    print(f"{len(truth)} held-out BornAgain maps per data kind, 32 x 64 pixels, alpha_i 0.2 deg, Si alpha_c "
          f"{math.degrees(math.sqrt(2 * SI[0])):.3f} deg; LM fits in {time.perf_counter() - t0:.0f} s "
          f"({args.threads} thread(s))")
    print(table(rows, truth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
