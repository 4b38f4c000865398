"""``scatterflow train saxs|gisaxs``: encoders for fast structural inversion, with baselines.

    scatterflow train saxs [-o service/models/saxs_encoder.pt] [--data-dir ./var/inversion]
    scatterflow train gisaxs [-o service/models/gisaxs_encoder.pt] [--data-dir ./var/inversion]
    python -m service.train.inversion gisaxs_dist [-o service/models/gisaxs_dwba_encoder.pt] [--born]

SAXS (Schulz-polydisperse hard spheres, ``workers.inversion.saxs.sphere_hs``):
* training data from our forward model on the encoder grid (128 log-spaced q, 0.05-5 1/nm):
  radius log-uniform in [2, 25] nm, pd uniform in [0.02, 0.3], volume fraction uniform in
  [0, 0.4], i0 log-uniform in [1, 1e4], background i0 * 10^U(-4, -2); Gaussian noise with
  sigma = sqrt(I i0 / c0), c0 = 10^U(4, 7) counts at the forward intensity; half the frames
  cropped to a random q range (q_min 0.05-0.2, q_max 1.5-5) so the encoder copes with any grid.
* an unlabelled set (same law, other seed, labels never read) for the physics loss
  (``physics_loss``): the encoder's parameters go through the forward model, amplitudes by
  weighted linear least squares, Cauchy loss on the residuals in standard errors (DONUT-style);
  added with --physics-weight for the last --physics-epochs epochs.
* held-out test set generated with sasmodels ``sphere@hardsphere`` (radius_pd_type schulz,
  radius_pd_n 300, nsigma 8, radius_effective_mode 1, P*S) on a worker-like linear grid
  (300 points, 0.04-4.5 1/nm) with the same noise law; cached as .npz in --data-dir.

GISAXS (spheres with Gaussian sizes on a radial paracrystal, decoupling approximation, Born;
``workers.inversion.gisaxs.spheres_paracrystal``) on a 32 x 64 detector grid (lambda 0.1 nm,
alpha_i 0.2 deg, u in (0, 0.02), v in (0, 0.04)): radius log-uniform in [2, 8] nm, pd in [0.02,
0.2], distance uniform in [max(12, 2.2 R), 40] nm, disorder omega/D in [0.05, 0.3]; noise as for
SAXS with c0 = 10^U(3, 6); held-out maps from BornAgain 25 (``bornagain_spheres_paracrystal``:
41-member Mixture over +-4 sigma, RadialParacrystal + Profile1DGauss, vacuum substrate).

GISAXS radius distributions (``gisaxs_dist``): a ``MapHistogramEncoder`` (distance, disorder and
the volume-weighted radius histogram on 16 log-spaced bins over 2-8 nm) on the same grid, trained
on DWBA maps (Si at 12.4 keV, as the live GISAXS test) of Gaussian, log-normal and bimodal
populations (``sample_populations``) from ``dwba.spheres_histogram_paracrystal_dwba``: MSE +
``histogram_loss``, then + the physics loss; no XGBoost or LM here, held-out tables in
benchmarks/bench_gisaxs_distribution.py.

Baselines: XGBoost (hist, 64 bins, 400 trees of depth 6, one output per tree, physical units)
on the same training features, and LM started at the centre of the bounds (no encoder).
Writes the checkpoint (``torch.load(weights_only=True)``), ``<kind>_table.md`` and
``<kind>_pred_vs_true.png`` in --data-dir, and prints the table.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SAXS_GRID = (0.05, 5.0, 128)
SAXS_TEST_Q = (0.04, 4.5, 300)
SAXS_SHAPE = (("radius", "pd", "volfraction"), (2.0, 0.02, 0.0), (25.0, 0.3, 0.4), (True, False, False))
GISAXS_GRID = {"wavelength": 0.1, "alpha_i": math.radians(0.2), "u": (0.0, 0.02, 64), "v": (0.0, 0.04, 32)}
GISAXS_SHAPE = (("radius", "pd", "distance", "disorder"), (2.0, 0.02, 12.0, 0.05), (8.0, 0.2, 40.0, 0.3),
                (True, False, False, False))


def add_arguments(parser: argparse.ArgumentParser, kind: str | None = None) -> None:
    """Options of ``scatterflow train saxs|gisaxs``; kind None adds the positional KIND."""
    if kind is None:
        parser.add_argument("kind", choices=("saxs", "gisaxs", "gisaxs_dist"), help="which encoder to train")
    else:
        parser.set_defaults(kind=kind)
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="checkpoint (default service/models/<kind>_encoder.pt)")
    parser.add_argument("--data-dir", type=Path, default=Path("var/inversion"),
                        help="cache of reference test sets, table and plots (default ./var/inversion)")
    parser.add_argument("--n-train", type=int, default=None, help="labelled training frames (saxs 16000, gisaxs 6000)")
    parser.add_argument("--n-unlabelled", type=int, default=None,
                        help="unlabelled frames for the physics loss (saxs 8000, gisaxs 2000)")
    parser.add_argument("--n-test", type=int, default=None, help="held-out reference frames (saxs 400, gisaxs 100)")
    parser.add_argument("--epochs", type=int, default=None, help="supervised epochs (saxs 40, gisaxs 20)")
    parser.add_argument("--physics-epochs", type=int, default=None, help="epochs with the physics loss (saxs 8, gisaxs 3)")
    parser.add_argument("--physics-weight", type=float, default=0.1, help="weight of the physics loss (default 0.1)")
    parser.add_argument("--no-xgboost", action="store_true", help="skip the XGBoost baseline")
    parser.add_argument("--born", action="store_true",
                        help="gisaxs_dist only: train on Born maps (vacuum substrate) for contrast; default output "
                             "<data-dir>/gisaxs_born_dist_encoder.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/XGBoost threads (default 1: on a shared 2-core machine more threads are slower)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


class _Log:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# SAXS data
def saxs_bounds():
    from workers.inversion.encoder import ParamBounds
    return ParamBounds(*SAXS_SHAPE)


def sample_saxs_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 5) radius, pd, volfraction, i0, background from the training law (module docstring)."""
    _, lo, hi, _ = SAXS_SHAPE
    r = np.exp(rng.uniform(math.log(lo[0]), math.log(hi[0]), n))
    pd = rng.uniform(lo[1], hi[1], n)
    phi = rng.uniform(lo[2], hi[2], n)
    i0 = 10 ** rng.uniform(0, 4, n)
    return np.stack([r, pd, phi, i0, i0 * 10 ** rng.uniform(-4, -2, n)], 1)


def add_noise(rng: np.random.Generator, intensity: np.ndarray, i0: np.ndarray):
    """Gaussian counting noise: sigma = sqrt(I i0 / c0), c0 = 10^U(4, 7). Returns y, sigma."""
    c0 = 10 ** rng.uniform(4, 7, (intensity.shape[0], 1))
    sigma = np.sqrt(np.clip(intensity, 0, None) * i0[:, None] / c0)
    return intensity + sigma * rng.standard_normal(intensity.shape), sigma


def saxs_training_set(n: int, seed: int, crop: bool = True) -> dict:
    """Frames from our forward model on the encoder grid: feats (n, 3, L) float32, params (n, 5),
    y, sigma (n, L), valid (n, L) bool."""
    import torch

    from workers.inversion.encoder import grid_features, log_grid
    from workers.inversion.saxs import sphere_hs
    rng = np.random.default_rng(seed)
    q = log_grid(*SAXS_GRID)
    p = sample_saxs_params(rng, n)
    inten = np.concatenate([sphere_hs(q, torch.tensor(p[s:s + 2048])).numpy() for s in range(0, n, 2048)])
    y, sigma = add_noise(rng, inten, p[:, 3])
    valid = y > 0
    if crop:
        lo = np.where(rng.random(n) < 0.5, 10 ** rng.uniform(math.log10(0.05), math.log10(0.2), n), 0.0)
        hi = np.where(rng.random(n) < 0.5, 10 ** rng.uniform(math.log10(1.5), math.log10(5.0), n), 10.0)
        qn = q.numpy()[None]
        valid &= (qn >= lo[:, None]) & (qn <= hi[:, None])
    log_i = np.log10(np.where(valid, y, 1.0))
    feats = grid_features(torch.tensor(log_i), torch.tensor(np.where(valid, sigma / np.abs(y), 1.0)),
                          torch.tensor(valid)).float()
    return {"feats": feats, "params": p, "y": y, "sigma": sigma, "valid": valid, "q": q.numpy()}


def saxs_reference_set(n: int, seed: int, data_dir: Path, log=print) -> dict:
    """Held-out frames computed by sasmodels (module docstring), cached in data_dir."""
    path = Path(data_dir) / f"saxs_sasmodels_n{n}_s{seed}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from sasmodels.core import load_model
    from sasmodels.direct_model import call_kernel
    rng = np.random.default_rng(10_000 + seed)
    p = sample_saxs_params(rng, n)
    p[:, 2] = np.maximum(p[:, 2], 0.002)        # sasmodels scales by volfraction: keep it > 0
    q = np.linspace(*SAXS_TEST_Q)
    ps, sph = load_model("sphere@hardsphere", dtype="double"), load_model("sphere", dtype="double")
    k_ps, k_0 = ps.make_kernel([q / 10.0]), sph.make_kernel([np.array([1e-7])])
    out = np.empty((n, q.size))
    t0 = time.perf_counter()
    for i, (r, pd, phi, i0, bkg) in enumerate(p):
        poly = dict(radius=10.0 * r, radius_pd=pd, radius_pd_type="schulz", radius_pd_n=300, radius_pd_nsigma=8,
                    sld=2.0, sld_solvent=1.0, background=0.0)
        unit = call_kernel(k_0, dict(poly, scale=1.0))[0]          # 1e-4 drho^2 <V^2>/<V>
        out[i] = call_kernel(k_ps, dict(poly, scale=i0 / (phi * unit), background=bkg, volfraction=phi,
                                        radius_effective_mode=1, structure_factor_mode=0))
        if (i + 1) % 100 == 0:
            log(f"sasmodels reference {i + 1}/{n} ({(i + 1) / (time.perf_counter() - t0):.0f} frames/s)")
    y, sigma = add_noise(rng, out, p[:, 3])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, q=q, y=y, sigma=sigma, params=p, clean=out)
    return {"q": q, "y": y, "sigma": sigma, "params": p, "clean": out}


# ---------------------------------------------------------------------------------------------
# GISAXS data
def gisaxs_grid():
    from workers.inversion.gisaxs import DetectorGrid
    g = GISAXS_GRID
    return DetectorGrid.regular(g["wavelength"], g["alpha_i"], g["u"][:2], g["u"][2], g["v"][:2], g["v"][2])


def gisaxs_bounds():
    from workers.inversion.encoder import ParamBounds
    return ParamBounds(*GISAXS_SHAPE)


def sample_gisaxs_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 6) radius, pd, distance, disorder, i0, background (module docstring)."""
    _, lo, hi, _ = GISAXS_SHAPE
    r = np.exp(rng.uniform(math.log(lo[0]), math.log(hi[0]), n))
    pd = rng.uniform(lo[1], hi[1], n)
    dist = rng.uniform(np.maximum(lo[2], 2.2 * r), hi[2])
    dis = rng.uniform(lo[3], hi[3], n)
    i0 = 10 ** rng.uniform(0, 4, n)
    return np.stack([r, pd, dist, dis, i0, i0 * 10 ** rng.uniform(-5, -3, n)], 1)


def _map_set(clean: np.ndarray, i0: np.ndarray, rng) -> dict:
    """Counting noise on maps clean (n, H, W) of forward intensity i0 (n,): sigma = sqrt(I i0 / c0),
    c0 = 10^U(3, 6); feats, y, sigma, valid (y, sigma, valid flattened to (n, H W))."""
    import torch

    from workers.inversion.encoder import map_features
    H, W = clean.shape[1:]
    flat = clean.reshape(len(clean), -1)
    c0 = 10 ** rng.uniform(3, 6, (len(flat), 1))
    sigma = np.sqrt(np.clip(flat, 0, None) * i0[:, None] / c0)
    y = flat + sigma * rng.standard_normal(flat.shape)
    valid = y > 0
    li = np.log10(np.where(valid, y, 1.0)).reshape(-1, H, W)
    feats = map_features(torch.tensor(li, dtype=torch.float32), torch.tensor(valid.reshape(-1, H, W)))
    return {"feats": feats, "y": y, "sigma": sigma, "valid": valid}


def gisaxs_training_set(n: int, seed: int) -> dict:
    """Maps from our forward model (spheres, radial paracrystal, DA) with counting noise."""
    import torch

    from workers.inversion.gisaxs import spheres_paracrystal
    rng = np.random.default_rng(seed)
    gq = gisaxs_grid().q(torch.float32)
    p = sample_gisaxs_params(rng, n)
    clean = np.concatenate([spheres_paracrystal(gq, torch.tensor(p[s:s + 256], dtype=torch.float32)).double().numpy()
                            for s in range(0, n, 256)])
    return {**_map_set(clean, p[:, 4], rng), "params": p}


def gisaxs_reference_set(n: int, seed: int, data_dir: Path, log=print) -> dict:
    """Held-out maps computed by BornAgain (module docstring), cached in data_dir."""
    path = Path(data_dir) / f"gisaxs_bornagain_n{n}_s{seed}.npz"
    if not path.exists():
        rng = np.random.default_rng(20_000 + seed)
        p = sample_gisaxs_params(rng, n)
        clean = np.empty((n,) + gisaxs_grid().shape)
        t0 = time.perf_counter()
        for i, row in enumerate(p):
            ba_map = bornagain_spheres_paracrystal(row[0], row[1], row[2], row[3] * row[2])
            clean[i] = row[4] * ba_map / ba_map.max() + row[5]
            if (i + 1) % 50 == 0:
                log(f"BornAgain reference {i + 1}/{n} ({(i + 1) / (time.perf_counter() - t0):.1f} maps/s)")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, clean=clean, params=p, seed=seed)
    with np.load(path) as z:
        clean, p = z["clean"], z["params"]
    out = _map_set(clean, p[:, 4], np.random.default_rng(30_000 + seed))
    out.update(params=p, clean=clean)
    return out


def bornagain_spheres_paracrystal(radius: float, pd: float, distance: float, omega: float,
                                  n_sizes: int = 41, n_sigma: float = 4.0) -> np.ndarray:
    """BornAgain 25: spheres (Gaussian radii as a 41-member Mixture over +-4 sigma) on a
    RadialParacrystal with a Gaussian (Profile1DGauss) distance law, no damping, deposited on a
    vacuum substrate (Born approximation; particle delta 1e-10 so no refraction), on the GISAXS
    grid via SphericalDetector. Returns (H, W) in BornAgain's units."""
    import bornagain as ba
    g, grid = GISAXS_GRID, gisaxs_grid()
    mat = ba.RefractiveMaterial("particle", (1.0, 0.0, 0.0), 1e-10, 0.0)
    mix = ba.Mixture()
    for t in np.linspace(-n_sigma, n_sigma, n_sizes):
        mix.addParticle(ba.Particle(mat, ba.Sphere(radius * (1.0 + pd * t))), math.exp(-0.5 * t * t))
    st = ba.RadialParacrystal(mix, distance, 0.0)
    st.setProbabilityDistribution(ba.Profile1DGauss(omega))
    top = ba.Layer(ba.Vacuum())
    top.deposit2D(st)
    sample = ba.Sample()
    sample.addLayer(top)
    sample.addLayer(ba.Layer(ba.Vacuum()))
    det = ba.SphericalDetector(g["u"][2], g["u"][0], g["u"][1], g["v"][2], g["v"][0], g["v"][1])
    res = ba.ScatteringSimulation(ba.Beam(1.0, g["wavelength"], g["alpha_i"]), sample, det).simulate()
    return np.asarray(res.flatVector()).reshape(grid.shape)


# ---------------------------------------------------------------------------------------------
# GISAXS radius distributions (DWBA on Si; ``scatterflow train gisaxs_dist``)
DIST_BINS = (2.0, 8.0, 16, 3)                # RadiusBins: r_min, r_max nm, K bins, nodes a bin
DIST_SHAPE = (("distance", "disorder"), (12.0, 0.05), (40.0, 0.3), (False, False))
SI_12KEV = (3.16e-6, 4.2e-8)                 # delta, beta: the live GISAXS test's substrate (service/sim)
POPULATIONS = ("gaussian", "lognormal", "bimodal")


def dist_bins():
    from workers.inversion.distribution import RadiusBins
    return RadiusBins(*DIST_BINS)


def sample_populations(rng: np.random.Generator, n: int):
    """n radius populations, a third each of POPULATIONS: Gaussian (mean log-uniform in [2.5, 7]
    nm, pd uniform in [0.03, 0.2]), log-normal (median log-uniform in [2.5, 7] nm, s in [0.05,
    0.25]), bimodal (two Gaussians, pd in [0.03, 0.08] each, the small mode's mean log-uniform in
    [2.5, 4.5] nm, the large one 1.5-2.2x it (at most 7 nm), the small mode's share of the volume
    N R^3 uniform in [0.3, 0.85]: 4-63 % of the forward intensity N R^6). Returns kind (n,)
    index into POPULATIONS and components (n, 2, 4): (number fraction, law 0 Gaussian / 1
    log-normal, mean or median nm, sd nm or s), the second of a unimodal population with
    fraction 0."""
    kind = rng.integers(0, 3, n)
    comp = np.zeros((n, 2, 4))
    for i, k in enumerate(kind):
        if k < 2:
            r = math.exp(rng.uniform(math.log(2.5), math.log(7.0)))
            comp[i, 0] = (1.0, 0, r, rng.uniform(0.03, 0.2) * r) if k == 0 else (1.0, 1, r, rng.uniform(0.05, 0.25))
        else:
            r1 = math.exp(rng.uniform(math.log(2.5), math.log(4.5)))
            r2 = min(r1 * rng.uniform(1.5, 2.2), 7.0)
            pd1, pd2 = rng.uniform(0.03, 0.08, 2)
            v1 = rng.uniform(0.3, 0.85)
            n1 = v1 / r1 ** 3 / (v1 / r1 ** 3 + (1 - v1) / r2 ** 3)
            comp[i] = ((n1, 0, r1, pd1 * r1), (1 - n1, 0, r2, pd2 * r2))
    return kind, comp


def population_weights(components: np.ndarray) -> np.ndarray:
    """Histograms (n, K) on ``dist_bins()`` of ``sample_populations``' components: each law's
    ``bin_masses`` (renormalised to the bins' span) times its number fraction."""
    from workers.inversion.distribution import bin_masses, gaussian_cdf, lognormal_cdf
    bins = dist_bins()
    w = np.zeros((len(components), bins.n_bins))
    for i, row in enumerate(components):
        for frac, law, c, width in row:
            if frac > 0:
                cdf = gaussian_cdf(c, width) if law == 0 else lognormal_cdf(c, width)
                w[i] += frac * bin_masses(bins, cdf)[0]
    return w


def largest_radius(components: np.ndarray) -> np.ndarray:
    """(n,) mean + 1 width of the largest component, nm: sets the least distance (2.2x it)."""
    c, width, law = components[..., 2], components[..., 3], components[..., 1]
    top = np.where(law == 0, c + width, c * np.exp(width))
    return np.where(components[..., 0] > 0, top, 0.0).max(-1)


def gisaxs_dist_set(n: int, seed: int, born: bool = False) -> dict:
    """Maps of ``sample_populations`` on a radial paracrystal from our forward model (DWBA on
    SI_12KEV, or Born with born=True) with counting noise as ``_map_set``: feats, y, sigma,
    valid, params (n, 4) = distance, disorder, i0, background, weights (n, K), kind, components
    (``sample_populations``), clean."""
    import torch

    from workers.inversion.dwba import dwba_q, spheres_histogram_paracrystal_dwba
    from workers.inversion.gisaxs import spheres_histogram_paracrystal
    from workers.inversion.spec import Substrate
    rng = np.random.default_rng(seed)
    kind, comp = sample_populations(rng, n)
    w = population_weights(comp)
    _, lo, hi, _ = DIST_SHAPE
    dist = rng.uniform(np.maximum(lo[0], 2.2 * largest_radius(comp)), hi[0])
    i0 = 10 ** rng.uniform(0, 4, n)
    p = np.stack([dist, rng.uniform(lo[1], hi[1], n), i0, i0 * 10 ** rng.uniform(-5, -3, n)], 1)
    grid, bins = gisaxs_grid(), dist_bins()
    pts = grid.q(torch.float32) if born else dwba_q(grid, Substrate(*SI_12KEV), torch.float32)
    model = spheres_histogram_paracrystal if born else spheres_histogram_paracrystal_dwba
    clean = np.concatenate([model(pts, torch.tensor(p[s:s + 128], dtype=torch.float32),
                                  torch.tensor(w[s:s + 128], dtype=torch.float32), bins).double().numpy()
                            for s in range(0, n, 128)])
    out = _map_set(clean, i0, rng)
    out.update(params=p, weights=w, kind=kind, components=comp, clean=clean)
    return out


def histogram_loss(bins, log_w, target):
    """KL(target || predicted) + W1 on the CDF in ln r over the bins' log span (both 0 at a
    perfect histogram; the KL sharpens, the W1 moves mass to the right radius)."""
    import torch

    from workers.inversion.distribution import cdf_distance
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_w)).sum(-1)
    w1 = cdf_distance(bins, log_w.exp(), target) / (bins.n_bins * bins.log_width)
    return (kl + w1).mean()


def train_histogram_encoder(enc, train: dict, unlab: dict | None, forward, *, epochs: int, physics_epochs: int,
                            physics_weight: float, seed: int, log, batch: int = 128, physics_batch: int = 32,
                            lr: float = 3e-3) -> dict:
    """As ``train_encoder`` for a ``MapHistogramEncoder``: MSE of the bounded parameters in unit
    coordinates + ``histogram_loss`` of the volume fractions, then + physics_weight x
    ``physics_loss`` (forward(p) with p = (parameters, number fractions, i0, background)) for the
    last ``physics_epochs``."""
    import torch

    from workers.inversion.distribution import number_fractions, volume_fractions
    torch.manual_seed(seed)
    bins = dist_bins()
    x = train["feats"]
    u = enc.bounds.to_unit(torch.tensor(train["params"][:, :2], dtype=torch.float32))
    tw = volume_fractions(bins, torch.tensor(train["weights"], dtype=torch.float32))
    total = epochs + physics_epochs
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total * math.ceil(len(x) / batch),
                                                pct_start=0.15)
    if unlab is not None:
        ux, uy = unlab["feats"], torch.tensor(unlab["y"], dtype=torch.float32)
        us, uv = torch.tensor(unlab["sigma"], dtype=torch.float32), torch.tensor(unlab["valid"])
    hist = {"supervised": [], "physics": []}
    g = torch.Generator().manual_seed(seed)
    for ep in range(total):
        t0, perm = time.perf_counter(), torch.randperm(len(x), generator=g)
        use_phys = unlab is not None and ep >= epochs and physics_weight > 0
        sl, pl = [], []
        for s in range(0, len(x), batch):
            idx = perm[s:s + batch]
            uu, log_w = enc.forward_unit_log(x[idx])
            loss = torch.nn.functional.mse_loss(uu, u[idx]) + histogram_loss(bins, log_w, tw[idx])
            sl.append(float(loss.detach()))
            if use_phys:
                j = torch.randint(0, len(ux), (physics_batch,), generator=g)
                p, w = enc(ux[j])
                ph = physics_loss(forward, torch.cat([p, number_fractions(bins, w)], 1), uy[j], us[j], uv[j])
                pl.append(float(ph.detach()))
                loss = loss + physics_weight * ph
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        hist["supervised"].append(float(np.mean(sl)))
        hist["physics"].append(float(np.mean(pl)) if pl else math.nan)
        log(f"epoch {ep + 1}/{total}: supervised {hist['supervised'][-1]:.5f}"
            + (f", physics {hist['physics'][-1]:.5f}" if pl else "") + f" ({time.perf_counter() - t0:.0f} s)")
    enc.eval()
    return hist


def run_gisaxs_dist(args, log) -> int:
    """The radius-distribution encoder on DWBA maps (Si, SI_12KEV) of ``sample_populations``:
    writes service/models/gisaxs_dwba_encoder.pt (model spheres_histogram_paracrystal_dwba), or
    with --born one trained on Born maps (vacuum substrate) for contrast; held-out tables:
    benchmarks/bench_gisaxs_distribution.py."""
    import torch

    from workers.inversion.dwba import dwba_q, spheres_histogram_paracrystal_dwba
    from workers.inversion.encoder import MapHistogramEncoder, ParamBounds, encoder_state
    from workers.inversion.gisaxs import spheres_histogram_paracrystal
    from workers.inversion.spec import Substrate
    bins, grid = dist_bins(), gisaxs_grid()
    train = gisaxs_dist_set(args.n_train, args.seed, args.born)
    unlab = gisaxs_dist_set(args.n_unlabelled, args.seed + 1, args.born) if args.n_unlabelled else None
    what = "Born" if args.born else "DWBA"
    log(f"training set: {args.n_train} labelled + {args.n_unlabelled} unlabelled {what} maps (our forward model)")
    enc = MapHistogramEncoder(ParamBounds(*DIST_SHAPE), bins.n_bins, grid.shape)
    pts = grid.q(torch.float32) if args.born else dwba_q(grid, Substrate(*SI_12KEV), torch.float32)
    model = spheres_histogram_paracrystal if args.born else spheres_histogram_paracrystal_dwba
    K = bins.n_bins

    def forward(p):
        return model(pts, torch.cat([p[:, :2], p[:, -2:]], 1), p[:, 2:2 + K], bins).reshape(len(p), -1)
    t0 = time.perf_counter()
    hist = train_histogram_encoder(enc, train, unlab, forward, epochs=args.epochs, physics_epochs=args.physics_epochs,
                                   physics_weight=args.physics_weight, seed=args.seed, log=log)
    grid_d = {"wavelength": grid.wavelength, "alpha_i": grid.alpha_i, "u": list(grid.u), "v": list(grid.v)}
    sub = None if args.born else {"delta": SI_12KEV[0], "beta": SI_12KEV[1]}
    state = encoder_state(enc, model=model.__name__, grid=grid_d, radius_bins=bins.as_dict(), substrate=sub,
                          train={"n_train": args.n_train, "n_unlabelled": args.n_unlabelled, "epochs": args.epochs,
                                 "physics_epochs": args.physics_epochs, "physics_weight": args.physics_weight,
                                 "seed": args.seed, "final_supervised_loss": hist["supervised"][-1],
                                 "seconds": round(time.perf_counter() - t0)})
    out = args.output or (Path(args.data_dir) / "gisaxs_born_dist_encoder.pt" if args.born
                          else default_checkpoint("gisaxs_dwba"))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    log(f"trained in {time.perf_counter() - t0:.0f} s; wrote {out} ({out.stat().st_size / 1024:.0f} kB)")
    return 0

# ---------------------------------------------------------------------------------------------
# training
def physics_loss(forward, p_shape, y, sigma, valid):
    """Label-free loss through the forward model (DONUT-style, with the data's noise model).

    forward(p (B, P)) -> (B, N) with p = (shape..., i0, background); amplitudes by weighted linear
    least squares; residuals in standard errors r = (I_model - y) / sigma over valid points;
    loss = mean log(1 + (r / 3)^2) (Cauchy: chi^2-like near the fit, bounded for outliers).
    """
    import torch

    from workers.inversion.refine import linear_amplitudes
    one = torch.ones_like(p_shape[:, :1])
    f = forward(torch.cat([p_shape, one, 0 * one], 1))
    s = torch.where(valid, sigma, torch.full_like(sigma, math.inf))
    yv = torch.where(valid, y, torch.zeros_like(y))
    a, b = linear_amplitudes(f, yv, s)
    r = (a[:, None] * f + b[:, None] - yv) / torch.where(valid, sigma, torch.ones_like(sigma))
    return (torch.log1p((r / 3.0) ** 2) * valid).sum() / valid.sum().clamp_min(1)


def train_encoder(enc, train: dict, unlab: dict | None, forward, *, epochs: int, physics_epochs: int,
                  physics_weight: float, seed: int, log, batch: int = 256, physics_batch: int = 256,
                  lr: float = 3e-3) -> dict:
    """AdamW (one-cycle): supervised MSE in unit coordinates, then + physics_weight x physics loss
    on unlabelled batches for the last ``physics_epochs`` (forward: see ``physics_loss``;
    unlab: feats, y, sigma, valid with y etc. flattened to (n, N)). Returns the loss history."""
    import torch
    torch.manual_seed(seed)
    x = train["feats"]
    u = enc.bounds.to_unit(torch.tensor(train["params"][:, :len(enc.bounds.names)], dtype=torch.float32))
    total = epochs + physics_epochs
    steps = total * math.ceil(len(x) / batch)
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    if unlab is not None:
        ux, uy = unlab["feats"], torch.tensor(unlab["y"], dtype=torch.float32)
        us, uv = torch.tensor(unlab["sigma"], dtype=torch.float32), torch.tensor(unlab["valid"])
    hist = {"supervised": [], "physics": []}
    g = torch.Generator().manual_seed(seed)
    for ep in range(total):
        t0, perm = time.perf_counter(), torch.randperm(len(x), generator=g)
        use_phys = unlab is not None and ep >= epochs and physics_weight > 0
        sl, pl = [], []
        for s in range(0, len(x), batch):
            idx = perm[s:s + batch]
            loss = torch.nn.functional.mse_loss(enc.forward_unit(x[idx]), u[idx])
            sl.append(float(loss.detach()))
            if use_phys:
                j = torch.randint(0, len(ux), (physics_batch,), generator=g)
                ph = physics_loss(forward, enc(ux[j]), uy[j], us[j], uv[j])
                pl.append(float(ph.detach()))
                loss = loss + physics_weight * ph
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        hist["supervised"].append(float(np.mean(sl)))
        hist["physics"].append(float(np.mean(pl)) if pl else math.nan)
        dt = time.perf_counter() - t0
        log(f"epoch {ep + 1}/{total}: supervised {hist['supervised'][-1]:.5f}"
            + (f", physics {hist['physics'][-1]:.5f}" if pl else "") + f" ({len(x) / dt:.0f} frames/s)")
    enc.eval()
    return hist


def train_xgboost(feats, params, n_threads: int, seed: int):
    """XGBoost baseline: one multi-output booster (hist, 400 trees of depth 6, one output per
    tree) for all shape parameters in physical units, as the published SAXS regressor; NaN =
    masked (XGBoost's missing values). Returns the xgboost.Booster."""
    import xgboost as xgb
    d = xgb.DMatrix(xgboost_features(feats), label=np.asarray(params, np.float32), nthread=n_threads)
    cfg = {"tree_method": "hist", "max_bin": 64, "max_depth": 6, "eta": 0.1, "subsample": 0.8, "colsample_bytree": 0.5,
           "objective": "reg:squarederror", "nthread": n_threads, "seed": seed}
    return xgb.train(cfg, d, num_boost_round=400)


def xgboost_predict(booster, feats) -> np.ndarray:
    """(B, P) predictions of ``train_xgboost``'s booster for encoder features (B, C, ...)."""
    import xgboost as xgb
    return booster.predict(xgb.DMatrix(xgboost_features(feats), nthread=1)).reshape(len(feats), -1)


def xgboost_features(feats) -> np.ndarray:
    """Profiles (B, 3, L): the two value channels, NaN where masked -> (B, 2L). Maps (B, 2, H, W):
    channel 0 averaged over 2 x 2 pixels, NaN where masked -> (B, HW/4)."""
    f = np.asarray(feats, np.float32)
    if f.ndim == 3:
        v = f[:, 2:3] > 0
        return np.where(v, f[:, :2], np.nan).reshape(len(f), -1)
    B, _, H, W = f.shape
    val = (f[:, 0] * f[:, 1]).reshape(B, H // 2, 2, W // 2, 2).sum((2, 4))
    n = f[:, 1].reshape(B, H // 2, 2, W // 2, 2).sum((2, 4))
    return np.where(n > 0, val / np.maximum(n, 1), np.nan).reshape(B, -1)


# ---------------------------------------------------------------------------------------------
# evaluation
def _time_per_frame(fn, n_frames: int, repeats: int) -> float:
    """ms per frame of fn() that processes n_frames, best of ``repeats`` after one warm-up."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / n_frames


def evaluate(kind: str, state: dict, test: dict, xgb_model=None, *, timing: bool = True, log=print) -> dict:
    """Every method on a reference set: {method: {"pred" (n, P), "stderr", "converged", "ms1", "ms64"}}.

    Methods: encoder (+ linear amplitudes), encoder + LM, LM from the centre of the bounds (no
    encoder), XGBoost (if given). ms1: per frame when frames come one at a time; ms64: per
    frame in batches of 64 (CPU, torch threads as set).
    """
    import torch

    from workers.inversion.refine import GisaxsInverter, SaxsInverter, linear_amplitudes, refine
    y, s = torch.tensor(test["y"]), torch.tensor(test["sigma"])
    if kind == "saxs":
        inv = SaxsInverter(state)
        q = torch.tensor(test["q"])
        prep = lambda a, b: inv._prep(q, y[a:b], s[a:b])                       # noqa: E731
    else:
        inv = GisaxsInverter(state)
        y, s = y.reshape(len(y), *inv.grid.shape), s.reshape(len(s), *inv.grid.shape)
        prep = lambda a, b: inv._prep(y[a:b], s[a:b])                          # noqa: E731
    k = len(inv.enc_bounds.names)

    def run_centre(a, b):
        x, yy, ss = prep(a, b)
        shape = inv.enc_bounds.from_unit(torch.full((b - a, k), 0.5, dtype=torch.float64))
        one = torch.ones_like(shape[:, :1])
        amp = linear_amplitudes(inv._fn(x, torch.cat([shape, one, 0 * one], 1)), yy, ss)
        return refine(inv._fn, x, yy, ss, torch.cat([shape, amp[0][:, None], amp[1][:, None]], 1), inv.lower, inv.upper,
                      chunk_size=inv.lm_chunk)

    methods = [("encoder", lambda a, b: inv._encode(*prep(a, b))),
               ("encoder + LM", lambda a, b: inv._invert(*prep(a, b), True, 40)),
               ("LM from bounds centre", run_centre)]
    if xgb_model is not None:
        methods.append(("XGBoost", lambda a, b: xgboost_predict(xgb_model, inv._features(*prep(a, b)).numpy())))
    n, out = len(y), {}
    for name, fn in methods:
        t0 = time.perf_counter()
        res = [fn(a, min(n, a + 128)) for a in range(0, n, 128)]
        if name == "encoder":
            pred, err, conv = torch.cat(res).numpy(), None, None
        elif name == "XGBoost":
            pred, err, conv = np.concatenate(res), None, None
        else:
            pred, err, conv = (torch.cat([getattr(r, a) for r in res]).numpy() for a in ("params", "stderr", "converged"))
        rec = {"pred": pred, "stderr": err, "converged": conv, "ms1": math.nan, "ms64": math.nan}
        if timing:
            rec["ms1"] = _time_per_frame(lambda: [fn(i, i + 1) for i in range(8)], 8, 2)
            rec["ms64"] = _time_per_frame(lambda: fn(0, min(n, 64)), min(n, 64), 2)
        log(f"{name}: {n} frames in {time.perf_counter() - t0:.1f} s")
        out[name] = rec
    return out


def metrics_table(results: dict, truth: np.ndarray, bounds, title: str) -> str:
    """Markdown table: per-parameter MAE (radius also median relative error), fraction outside
    the bounds, LM convergence, ms/frame at batch 1 and 64."""
    lo, hi = np.array(bounds.lo), np.array(bounds.hi)
    k, span = len(lo), hi - lo
    cols = (["method", f"{bounds.names[0]} median rel. err. (%)"] + [f"{n} MAE" for n in bounds.names]
            + ["outside bounds (%)", "LM converged (%)", "ms/frame B=1", "ms/frame B=64"])
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, rec in results.items():
        p = rec["pred"][:, :k]
        out = ((p < lo - 1e-9 * span) | (p > hi + 1e-9 * span)).any(1).mean()
        rel = np.abs(p[:, 0] / truth[:, 0] - 1)
        mae = [f"{np.abs(p[:, j] - truth[:, j]).mean():.4g}" for j in range(k)]
        conv = "" if rec["converged"] is None else f"{100 * rec['converged'].mean():.0f}"
        lines.append("| " + " | ".join([name, f"{100 * np.median(rel):.2f}"] + mae
                                       + [f"{100 * out:.1f}", conv, f"{rec['ms1']:.2f}", f"{rec['ms64']:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_pred_vs_true(results: dict, truth: np.ndarray, names, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(names)
    fig, axes = plt.subplots(len(results), k, figsize=(3.2 * k, 2.8 * len(results)), squeeze=False)
    for i, (name, rec) in enumerate(results.items()):
        for j in range(k):
            ax = axes[i, j]
            t, p = truth[:, j], rec["pred"][:, j]
            ax.plot(t, p, ".", ms=2, alpha=0.6)
            lim = [min(t.min(), p.min()), max(t.max(), p.max())]
            ax.plot(lim, lim, "k-", lw=0.6)
            ax.set_title(f"{name}: {names[j]}", fontsize=8)
            ax.set_xlabel("true", fontsize=7)
            ax.set_ylabel("predicted", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# checkpoints
def default_checkpoint(kind: str) -> Path:
    return MODELS_DIR / f"{kind}_encoder.pt"


def load_encoder_checkpoint(kind: str = "saxs", path: str | Path | None = None) -> dict:
    """The shipped (or given) encoder checkpoint as a dict (weights only); ValueError if malformed."""
    import torch
    path = Path(path) if path is not None else default_checkpoint(kind)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"arch", "bounds", "state_dict", "model"} <= set(state):
        raise ValueError(f"{path}: not an inversion encoder checkpoint")
    return state


# ---------------------------------------------------------------------------------------------
DEFAULTS = {"saxs": {"n_train": 16000, "n_unlabelled": 8000, "n_test": 400, "epochs": 40, "physics_epochs": 8},
            "gisaxs": {"n_train": 6000, "n_unlabelled": 2000, "n_test": 100, "epochs": 20, "physics_epochs": 3},
            "gisaxs_dist": {"n_train": 6000, "n_unlabelled": 2000, "n_test": 16, "epochs": 20, "physics_epochs": 3}}


def _check_args(args) -> str | None:
    if getattr(args, "kind", None) not in DEFAULTS:
        return f"kind must be saxs, gisaxs or gisaxs_dist, got {getattr(args, 'kind', None)!r}"
    for name, value in DEFAULTS[args.kind].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name, least in (("n_train", 256), ("n_test", 16), ("epochs", 1), ("physics_epochs", 0), ("threads", 1),
                        ("n_unlabelled", 0)):
        if getattr(args, name) < least:
            return f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}"
    if args.physics_weight < 0:
        return f"--physics-weight must be >= 0, got {args.physics_weight}"
    return None


def run_saxs(args, log) -> int:
    import torch

    from workers.inversion.encoder import ProfileEncoder, encoder_state, log_grid
    from workers.inversion.saxs import sphere_hs
    bounds = saxs_bounds()
    train = saxs_training_set(args.n_train, args.seed)
    unlab = saxs_training_set(args.n_unlabelled, args.seed + 1) if args.n_unlabelled else None
    log(f"training set: {args.n_train} labelled + {args.n_unlabelled} unlabelled frames (our forward model)")
    test = saxs_reference_set(args.n_test, args.seed, args.data_dir, log)
    log(f"held-out set: {len(test['y'])} frames from sasmodels")
    enc = ProfileEncoder(bounds, SAXS_GRID[2])
    q_grid = torch.tensor(train["q"], dtype=torch.float32)
    hist = train_encoder(enc, train, unlab, lambda p: sphere_hs(q_grid, p), epochs=args.epochs,
                         physics_epochs=args.physics_epochs, physics_weight=args.physics_weight, seed=args.seed, log=log)
    state = encoder_state(enc, model="sphere_hs", q_grid=log_grid(*SAXS_GRID).float(),
                          train={"n_train": args.n_train, "n_unlabelled": args.n_unlabelled, "epochs": args.epochs,
                                 "physics_epochs": args.physics_epochs, "physics_weight": args.physics_weight,
                                 "seed": args.seed, "final_supervised_loss": hist["supervised"][-1]})
    return _finish("saxs", args, state, train, test, bounds, log,
                   "SAXS inversion, held-out sasmodels frames (sphere@hardsphere, Schulz)")


def run(args) -> int:
    """Train the encoder of ``args.kind``, evaluate it against the references; 0, or 2 on bad options."""
    msg = _check_args(args)
    if msg:
        print(f"scatterflow train {getattr(args, 'kind', '?')}: {msg}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    log = _Log(args.quiet)
    return {"saxs": run_saxs, "gisaxs": run_gisaxs, "gisaxs_dist": run_gisaxs_dist}[args.kind](args, log)


def run_gisaxs(args, log) -> int:
    import torch

    from workers.inversion.encoder import MapEncoder, encoder_state
    from workers.inversion.gisaxs import spheres_paracrystal
    bounds, grid = gisaxs_bounds(), gisaxs_grid()
    train = gisaxs_training_set(args.n_train, args.seed)
    unlab = gisaxs_training_set(args.n_unlabelled, args.seed + 1) if args.n_unlabelled else None
    log(f"training set: {args.n_train} labelled + {args.n_unlabelled} unlabelled maps (our forward model)")
    test = gisaxs_reference_set(args.n_test, args.seed, args.data_dir, log)
    log(f"held-out set: {len(test['y'])} maps from BornAgain")
    enc = MapEncoder(bounds, grid.shape)
    gq = grid.q(torch.float32)
    hist = train_encoder(enc, train, unlab, lambda p: spheres_paracrystal(gq, p).reshape(len(p), -1),
                         epochs=args.epochs, physics_epochs=args.physics_epochs, physics_weight=args.physics_weight,
                         seed=args.seed, log=log, batch=128, physics_batch=32)
    grid_d = {"wavelength": grid.wavelength, "alpha_i": grid.alpha_i, "u": list(grid.u), "v": list(grid.v)}
    state = encoder_state(enc, model="spheres_paracrystal", grid=grid_d,
                          train={"n_train": args.n_train, "n_unlabelled": args.n_unlabelled, "epochs": args.epochs,
                                 "physics_epochs": args.physics_epochs, "physics_weight": args.physics_weight,
                                 "seed": args.seed, "final_supervised_loss": hist["supervised"][-1]})
    return _finish("gisaxs", args, state, train, test, bounds, log,
                   "GISAXS inversion, held-out BornAgain maps (spheres, radial paracrystal, Born/DA)")


def _finish(kind, args, state, train, test, bounds, log, title) -> int:
    """Save the checkpoint, train the XGBoost baseline, evaluate, write table and PNG."""
    import torch
    out = args.output or default_checkpoint(kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    log(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB)")
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    xgb_model = None
    if not args.no_xgboost:
        t0 = time.perf_counter()
        xgb_model = train_xgboost(train["feats"], train["params"][:, :len(bounds.names)], args.threads, args.seed)
        xgb_model.save_model(str(data_dir / f"{kind}_xgboost.json"))
        log(f"XGBoost baseline trained in {time.perf_counter() - t0:.0f} s")
    res = evaluate(kind, state, test, xgb_model, log=log)
    table = metrics_table(res, test["params"], bounds, f"{title}, {len(test['y'])} frames")
    (data_dir / f"{kind}_table.md").write_text(table)
    plot_pred_vs_true(res, test["params"], bounds.names, data_dir / f"{kind}_pred_vs_true.png")
    print(table)
    log(f"wrote {data_dir}/{kind}_table.md and {kind}_pred_vs_true.png")
    return 0


def main(argv=None) -> int:        # python -m service.train.inversion saxs; the same as `scatterflow train saxs`
    parser = argparse.ArgumentParser(prog="scatterflow train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
