"""Benchmark: radius distributions recovered by the GISAXS distribution encoder
(service/models/gisaxs_dwba_encoder.pt, ``python -m service.train.inversion gisaxs_dist``) on
held-out DWBA (Si) and Born (vacuum substrate) maps; a Born-trained encoder for contrast.

    python benchmarks/bench_gisaxs_distribution.py [--n 600] [--n-ba 24] [--data-dir var/inversion]
        [--born-checkpoint var/inversion/gisaxs_born_dist_encoder.pt]

Held-out sets (populations, paracrystal and noise laws of ``service.train.inversion.
gisaxs_dist_set``, other seeds): (a) --n maps from our forward model (the histogram on its 16
bins, ``spheres_histogram_paracrystal[_dwba]``); (b) --n-ba maps from BornAgain 25 with each
population as a dense Mixture of its continuous law (41 radii over +-4 widths per component,
kept within the bins' 2-8 nm, as the histogram), on Si and on a vacuum substrate; cached as .npz
in --data-dir. Truth: the histogram of the law on the bins (``population_weights``).

Per data set and encoder: number-weighted mean radius (relative) and width (std / mean,
absolute) errors, distance (relative) error, median and 90th percentile; W1 distance of the
volume-weighted histograms in ln r; unimodal populations: share read as one mode; bimodal:
share read as two modes (``distribution.find_modes`` on the volume-weighted histograms), and
for those the modes' radius (relative) and volume-fraction (absolute) errors, median and p90.
Writes a PNG of recovered volume-weighted histograms against the truth in a temporary folder
and prints its path.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

N_MEMBERS, N_WIDTHS = 41, 4.0


def bornagain_population_map(components: np.ndarray, distance: float, omega: float, substrate) -> np.ndarray:
    """BornAgain 25 map (H, W) on the encoder grid of a population (``sample_populations``'
    components (2, 4)) on a radial paracrystal (Profile1DGauss omega nm), in the vacuum layer on
    ``substrate`` (delta, beta), None: vacuum."""
    import bornagain as ba

    from service.train.inversion import DIST_BINS, GISAXS_GRID, gisaxs_grid
    mat = ba.RefractiveMaterial("particle", (1.0, 0.0, 0.0), 1e-10, 0.0)
    mix = ba.Mixture()
    t = np.linspace(-N_WIDTHS, N_WIDTHS, N_MEMBERS)
    for frac, law, c, width in components:
        if frac <= 0:
            continue
        r = c + width * t if law == 0 else c * np.exp(width * t)
        keep = (r >= DIST_BINS[0]) & (r <= DIST_BINS[1])
        w = np.exp(-0.5 * t * t) * keep
        for ri, wi in zip(r[keep], frac * w[keep] / w.sum()):
            mix.addParticle(ba.Particle(mat, ba.Sphere(float(ri))), float(wi))
    st = ba.RadialParacrystal(mix, distance, 0.0)
    st.setProbabilityDistribution(ba.Profile1DGauss(omega))
    top = ba.Layer(ba.Vacuum())
    top.deposit2D(st)
    sample = ba.Sample()
    sample.addLayer(top)
    sample.addLayer(ba.Layer(ba.Vacuum() if substrate is None else
                             ba.RefractiveMaterial("Si", (0.2, 0.2, 0.2), *substrate)))
    g = GISAXS_GRID
    det = ba.SphericalDetector(g["u"][2], g["u"][0], g["u"][1], g["v"][2], g["v"][0], g["v"][1])
    res = ba.ScatteringSimulation(ba.Beam(1.0, g["wavelength"], g["alpha_i"]), sample, det).simulate()
    return np.asarray(res.flatVector()).reshape(gisaxs_grid().shape)


def bornagain_sets(n: int, seed: int, data_dir: Path) -> dict:
    """{"dwba": set, "born": set} of the same n populations rendered by BornAgain (module
    docstring), with counting noise; each set as ``gisaxs_dist_set``'s keys."""
    from service.train.inversion import (DIST_SHAPE, SI_12KEV, _map_set, largest_radius, population_weights,
                                         sample_populations)
    path = Path(data_dir) / f"gisaxs_dist_bornagain_n{n}_s{seed}.npz"
    if not path.exists():
        rng = np.random.default_rng(60_000 + seed)
        kind, comp = sample_populations(rng, n)
        _, lo, hi, _ = DIST_SHAPE
        dist = rng.uniform(np.maximum(lo[0], 2.2 * largest_radius(comp)), hi[0])
        i0 = 10 ** rng.uniform(0, 4, n)
        p = np.stack([dist, rng.uniform(lo[1], hi[1], n), i0, i0 * 10 ** rng.uniform(-5, -3, n)], 1)
        t0 = time.perf_counter()
        maps = {k: np.stack([bornagain_population_map(c, d, dis * d, sub) for c, d, dis in zip(comp, p[:, 0], p[:, 1])])
                for k, sub in (("dwba", SI_12KEV), ("born", None))}
        print(f"BornAgain: {2 * n} maps in {time.perf_counter() - t0:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, params=p, kind=kind, components=comp, **maps)
    with np.load(path) as z:
        p, kind, comp, maps = z["params"], z["kind"], z["components"], {k: z[k] for k in ("dwba", "born")}
    out = {}
    for k, m in maps.items():
        clean = p[:, 2, None, None] * m / m.max((1, 2), keepdims=True) + p[:, 3, None, None]
        s = _map_set(clean, p[:, 2], np.random.default_rng(70_000 + seed + (k == "born")))
        s.update(params=p, kind=kind, components=comp, weights=population_weights(comp))
        out[k] = s
    return out


def predict(state: dict, feats: torch.Tensor):
    """(parameters (B, 2), volume fractions (B, K)) of a distribution encoder checkpoint."""
    from workers.inversion.encoder import encoder_from_state
    enc = encoder_from_state(state)
    with torch.no_grad():
        p, w = enc(feats)
    return p.double().numpy(), w.double().numpy()


def scores(data: dict, p: np.ndarray, wv: np.ndarray) -> dict:
    """The module docstring's figures for one data set and one encoder's predictions."""
    from service.train.inversion import dist_bins
    from workers.inversion.distribution import (cdf_distance, find_modes, moments, number_fractions,
                                                volume_fractions)
    bins = dist_bins()
    tv = volume_fractions(bins, torch.tensor(data["weights"])).numpy()
    m_t, s_t = moments(bins, data["weights"])
    m_p, s_p = moments(bins, number_fractions(bins, torch.tensor(wv)).numpy())
    q = lambda a: (np.median(a), np.quantile(a, 0.9))                           # noqa: E731
    out = {"mean": q(100 * np.abs(m_p / m_t - 1)), "width": q(np.abs(s_p - s_t)),
           "distance": q(100 * np.abs(p[:, 0] / data["params"][:, 0] - 1)),
           "w1": q(cdf_distance(bins, torch.tensor(wv), torch.tensor(tv)).numpy())}
    uni, bi = data["kind"] < 2, data["kind"] == 2
    out["one_mode"] = 100 * np.mean([len(find_modes(bins, w)) == 1 for w in wv[uni]]) if uni.any() else math.nan
    pos, frac, two = [], [], []
    for w, t in zip(wv[bi], tv[bi]):
        mp, mt = find_modes(bins, w), find_modes(bins, t)
        two.append(len(mp) == 2)
        if len(mp) == 2 and len(mt) == 2:
            pos += [abs(a[0] / b[0] - 1) for a, b in zip(mp, mt)]
            frac += [abs(a[1] - b[1]) for a, b in zip(mp, mt)]
    out["two_modes"] = 100 * np.mean(two) if two else math.nan
    out["mode_pos"] = q(100 * np.array(pos)) if pos else (math.nan, math.nan)
    out["mode_frac"] = q(np.array(frac)) if frac else (math.nan, math.nan)
    out["n"], out["n_bi"] = len(p), int(bi.sum())
    return out


def table(rows: list[tuple[str, str, dict]]) -> str:
    head = ("| data | encoder | maps (bimodal) | mean radius err. (%) med / p90 | width err. med / p90 | "
            "distance err. (%) med / p90 | W1 ln r med / p90 | unimodal as 1 mode (%) | bimodal as 2 modes (%) | "
            "mode radius err. (%) med / p90 | mode vol. fraction err. med / p90 |")
    lines = [head, "|" + " --- |" * 11]
    f2 = lambda t, d=2: f"{t[0]:.{d}f} / {t[1]:.{d}f}"                          # noqa: E731
    for data, enc, s in rows:
        lines.append(f"| {data} | {enc} | {s['n']} ({s['n_bi']}) | {f2(s['mean'])} | {f2(s['width'], 3)} | "
                     f"{f2(s['distance'])} | {f2(s['w1'], 3)} | {s['one_mode']:.0f} | {s['two_modes']:.0f} | "
                     f"{f2(s['mode_pos'], 1)} | {f2(s['mode_frac'], 3)} |")
    return "\n".join(lines)


def plot(data: dict, preds: dict, path: Path) -> None:
    """Volume-weighted histograms: truth against each encoder's, 4 bimodal and 4 unimodal maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from service.train.inversion import POPULATIONS, dist_bins
    from workers.inversion.distribution import volume_fractions
    bins = dist_bins()
    edges = bins.edges()
    tv = volume_fractions(bins, torch.tensor(data["weights"])).numpy()
    pick = list(np.flatnonzero(data["kind"] == 2)[:4]) + list(np.flatnonzero(data["kind"] < 2)[:4])
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.5), squeeze=False)
    for ax, i in zip(axes.ravel(), pick):
        ax.stairs(tv[i], edges, fill=True, alpha=0.3, color="k", label="truth")
        for (name, (_, wv)), c in zip(preds.items(), ("C0", "C3")):
            ax.stairs(wv[i], edges, color=c, lw=1.4, label=name)
        ax.set_xscale("log")
        ax.set_xticks([2, 3, 4, 6, 8], ["2", "3", "4", "6", "8"])
        ax.minorticks_off()
        ax.set_title(f"{POPULATIONS[data['kind'][i]]}, map {i}", fontsize=8)
        ax.set_xlabel("radius (nm)", fontsize=7)
    axes[0, 0].set_ylabel("volume fraction", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="held-out maps from our forward model per data kind")
    ap.add_argument("--n-ba", type=int, default=24, help="held-out BornAgain maps per data kind")
    ap.add_argument("--data-dir", type=Path, default=Path("var/inversion"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="default service/models/gisaxs_dwba_encoder.pt")
    ap.add_argument("--born-checkpoint", type=Path, default=None, help="a Born-trained encoder, for contrast")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from service.train.inversion import gisaxs_dist_set, load_encoder_checkpoint
    encoders = {"DWBA-trained": load_encoder_checkpoint("gisaxs_dwba", args.checkpoint)}
    if args.born_checkpoint is not None:
        encoders["Born-trained"] = load_encoder_checkpoint("gisaxs_dwba", args.born_checkpoint)
    sets = {"DWBA (Si), our model": gisaxs_dist_set(args.n, 90_000 + args.seed),
            "Born (vacuum), our model": gisaxs_dist_set(args.n, 91_000 + args.seed, born=True)}
    if args.n_ba:
        ba = bornagain_sets(args.n_ba, args.seed, args.data_dir)
        sets.update({"DWBA (Si), BornAgain": ba["dwba"], "Born (vacuum), BornAgain": ba["born"]})
    rows, shown = [], None
    for dname, data in sets.items():
        preds = {ename: predict(state, data["feats"]) for ename, state in encoders.items()}
        rows += [(dname, ename, scores(data, *pr)) for ename, pr in preds.items()]
        if "DWBA" in dname:
            shown = (dname, data, preds)
    print(table(rows))
    path = Path(tempfile.mkdtemp(prefix="gisaxs_dist_")) / "histograms.png"
    plot(shown[1], shown[2], path)
    print(f"recovered histograms ({shown[0]}): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
