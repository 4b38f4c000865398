"""``scatterflow train phase``: train the phase classifier on simulated azopolymer cycles.

    scatterflow train phase [-o service/models/phase_classifier.pt] [--cycles 72] [--seed 0]

Data: random light cycles of ``service.sim.AzoCycle`` around the demo's film: time constants
1.5-25 s, random light schedules, crystallinity floor 0.06-0.15, abrupt switches in 20 % of the
cycles, 20 % starting part-way switched, peak areas and widths +-10 %, positions shifted, the
power-law background's amplitude x0.5-2, exponent 2.5-3.5 and constant x0.3-3; 1-2 s per frame,
q grids of 400-700 points, Poisson counts with 3-1000 counts per unit of I(q) (sigma =
sqrt(max(counts, 1))). Every series is fitted with the service's default peak model
(``service.config.FitConfig``) by ``TrajectoryFitter`` (per-frame fits); each frame's features
(``workers.phase.classifier_features``) are labelled with the truth's phase. Held out: the last
20 % of the cycles. Features: the fitted parameters (``PARAMS``) and, with ``--profile-bins N``,
the profile on N log-q bins (left out by default: on held-out cycles they cost 1-3 % accuracy
at this amount of data). About 1.5-2 min on one busy core, nearly all of it fitting.

Writes the checkpoint (``{"state_dict", "meta"}``, ``torch.load(..., weights_only=True)``) and a
training-curve PNG beside it; prints the held-out accuracy.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "phase_classifier.pt"
GRID = (2.0, 19.5, 96)          # classifier profile grid: q_lo, q_hi (1/nm), bins (log-spaced)
PARAMS = ("crystallinity", "lamellar_center", "lamellar_fwhm", "lamellar_fraction",
          "halo_center", "halo_fwhm", "halo_fraction", "pi_pi_center", "pi_pi_fwhm", "pi_pi_fraction")
PROFILE_BINS = 0                # profile features hurt held-out accuracy at this data size (report)
HIDDEN = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint to write (default {DEFAULT_CHECKPOINT}); the PNG goes beside it")
    parser.add_argument("--cycles", type=int, default=72, help="simulated cycles (default 72)")
    parser.add_argument("--frames", type=int, default=70, help="frames per cycle (default 70)")
    parser.add_argument("--epochs", type=int, default=80, help="training epochs (default 80)")
    parser.add_argument("--profile-bins", type=int, default=PROFILE_BINS,
                        help=f"log-q bins of the profile features (default {PROFILE_BINS}; 0: fitted parameters only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the small per-frame fits gain nothing from more, and lose "
                             "much on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# simulated data
def random_cycle(rng: np.random.Generator, duration: float):
    """An AzoCycle around the demo's film with random kinetics, light schedule, crystallinity
    floor, peak jitter and background (module docstring)."""
    from service.sim.azopolymer import AzoCycle, PeakStates

    def jitter(p: PeakStates, shift: float) -> PeakStates:
        f, d = rng.uniform(0.9, 1.1), rng.uniform(-shift, shift)
        return PeakStates(center=(p.center[0] + d, p.center[1] + d), fwhm=(p.fwhm[0] * f, p.fwhm[1] * f),
                          area=tuple(a * rng.uniform(0.9, 1.1) for a in p.area), eta=p.eta)
    peaks = {k: jitter(p, {"lamellar": 0.03, "pi_pi": 0.1, "halo": 0.2}[k]) for k, p in AzoCycle().peaks.items()}
    sched, t = [(0.0, "dark")], rng.uniform(3.0, 15.0)
    light = "uv"
    while t < duration:
        sched.append((t, light))
        t += rng.uniform(8.0, 40.0)
        light = {"uv": "visible" if rng.random() < 0.8 else "dark", "visible": "uv", "dark": "visible"}[light]
    return AzoCycle(tau_uv=float(np.exp(rng.uniform(math.log(1.5), math.log(25.0)))),
                    tau_vis=float(np.exp(rng.uniform(math.log(1.5), math.log(25.0)))),
                    crystallinity_floor=rng.uniform(0.06, 0.15),
                    initial_crystallinity=1.0 if rng.random() < 0.8 else rng.uniform(0.1, 1.0),
                    step=bool(rng.random() < 0.2), peaks=peaks,
                    background_amplitude=675.0 * np.exp(rng.uniform(-0.7, 0.7)),
                    background_exponent=rng.uniform(2.5, 3.5),
                    background_constant=10.0 * np.exp(rng.uniform(-1.2, 1.2)), schedule=tuple(sched))


def simulate_profiles(cycle, q: np.ndarray, times: np.ndarray, scale: float, rng: np.random.Generator):
    """Poisson counts (T, N) of ``scale * cycle.profile(q, times)`` and sigma = sqrt(max(counts, 1))."""
    counts = rng.poisson(scale * cycle.profile(q, times)).astype(float)
    return counts, np.sqrt(np.maximum(counts, 1.0))


def fit_series(q, intensity, sigma, times, *, regularized: bool = True, batch: int = 8, fit_config=None):
    """PeakRows of a series fitted as the service does (default ``FitConfig`` unless given):
    all rows (provisional and final) of ``TrajectoryFitter`` fed ``batch`` frames at a time;
    ``regularized=False``: per-frame fits only (penalty none, rows marked final)."""
    from service.config import FitConfig
    from workers.specs import RegularizerSpec
    from workers.temporal import TrajectoryFitter, concat_rows

    fit = fit_config or FitConfig()
    spec = fit.model_spec()
    if spec is None:
        raise ValueError("fit_config has no peaks (peaks: []): nothing to fit")
    fitter = TrajectoryFitter(spec, fit.regularizer if regularized else RegularizerSpec(window=1, penalty="none"))
    seq = np.arange(1, len(times) + 1)
    out = [fitter.update(q, intensity[i:i + batch], sigma[i:i + batch], seq[i:i + batch], times[i:i + batch])
           for i in range(0, len(times), batch)]
    out.append(fitter.finish())
    return concat_rows(out)


def make_dataset(n_cycles: int, n_frames: int, seed: int, meta: dict, progress=None):
    """Features X (M, F) float32, labels y (M,) int64 (index in PHASES), cycle index (M,)."""
    import torch

    from service.sim.azopolymer import PHASES
    from workers.phase import classifier_features, crystallinity_index, default_phase_spec, frame_table

    rng = np.random.default_rng(seed)
    spec = default_phase_spec()
    X, Y, G = [], [], []
    for c in range(n_cycles):
        dt = rng.uniform(1.0, 2.0)
        times = np.arange(n_frames) * dt
        cycle = random_cycle(rng, times[-1])
        q = np.linspace(rng.uniform(1.2, 1.8), rng.uniform(19.8, 21.0), int(rng.integers(400, 701)))
        scale = float(np.exp(rng.uniform(math.log(3.0), math.log(1000.0))))
        inten, sig = simulate_profiles(cycle, q, times, scale, rng)
        rows = fit_series(q, inten, sig, times, regularized=False)
        table = frame_table({k: v[rows["final"]] for k, v in rows.items()}, spec.peaks)
        ci, ci_sigma = crystallinity_index(table, spec)
        with torch.no_grad():
            X.append(classifier_features(meta, q, inten[table["seq_num"] - 1], table, ci, ci_sigma).float().numpy())
        truth = cycle.truth(times[table["seq_num"] - 1])["phase"]
        Y.append(np.array([PHASES.index(p) for p in truth]))
        G.append(np.full(len(truth), c))
        if progress is not None:
            progress(c + 1)
    return np.concatenate(X), np.concatenate(Y), np.concatenate(G)


# ---------------------------------------------------------------------------------------------
# evaluation (benchmarks/bench_phase.py)
def truth_crossings(cycle, times: np.ndarray, phases: tuple[str, ...]) -> list[tuple[float, int]]:
    """Phase-boundary crossings of the truth between frames: (time s, signed boundary index)
    per crossing, boundary b between phases b and b+1, sign + toward later phases. The time is
    found by bisection of ``cycle.truth(t)["phase"]`` inside the frame interval (1e-6 s)."""
    lab = np.array([phases.index(p) for p in cycle.truth(times)["phase"]])
    out = []
    for k in np.flatnonzero(np.diff(lab)) + 1:
        lo, hi = float(times[k - 1]), float(times[k])
        while hi - lo > 1e-6:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if phases.index(str(cycle.truth(mid)["phase"])) == lab[k - 1] else (lo, mid)
        out += _crossings(lab[k - 1], lab[k], hi)
    return out


def _crossings(a: int, b: int, t: float) -> list[tuple[float, int]]:
    step = 1 if b > a else -1
    return [(t, step * (min(i, i + step) + 1)) for i in range(a, b, step)]


def event_crossings(events: list[dict], phases: tuple[str, ...]) -> list[tuple[float, int]]:
    """Events -> crossings as ``truth_crossings`` (an event skipping a phase crosses two boundaries)."""
    return [c for ev in events for c in _crossings(phases.index(ev["from"]), phases.index(ev["to"]), ev["time"])]


def match_crossings(truth, found, frame_s: float, max_frames: float = 10.0):
    """Signed errors in frames of the truth crossings matched (same boundary and direction, nearest,
    each found crossing used once, within ``max_frames``); returns (errors, missed, false)."""
    free = list(found)
    errors, missed = [], 0
    for t, b in truth:
        cand = [(abs(tf - t), i) for i, (tf, bf) in enumerate(free) if bf == b and abs(tf - t) <= max_frames * frame_s]
        if not cand:
            missed += 1
            continue
        _, i = min(cand)
        errors.append((free[i][0] - t) / frame_s)
        free.pop(i)
    return np.array(errors), missed, len(free)


def evaluate_cycle(cycle, times, q, scale, rng, checkpoint=None, *, batch: int = 8) -> dict:
    """Simulate, fit (service defaults) and label one cycle with the rules, the classifier (if a
    checkpoint is given) and the baseline. Returns per method: ``correct`` (fraction of frames),
    ``errors`` (signed transition-time errors in frames), ``missed``, ``false``, ``ms_per_frame``
    (labelling only, not fitting), plus ``truth`` labels and ``fit_s``."""
    from service.config import FitConfig
    from service.sim.azopolymer import PHASES
    from workers.phase import PhaseTracker, default_phase_spec, frame_table
    from workers.temporal import TrajectoryFitter

    from .baselines import baseline_events

    spec = default_phase_spec()
    inten, sig = simulate_profiles(cycle, q, times, scale, rng)
    seq = np.arange(1, len(times) + 1)
    fit = FitConfig()
    fitter = TrajectoryFitter(fit.model_spec(), fit.regularizer)
    trackers = {"rules": PhaseTracker(spec)}
    if checkpoint is not None:
        trackers["classifier"] = PhaseTracker(spec, checkpoint)
    spent = dict.fromkeys(trackers, 0.0)
    fit_s, finals, all_rows = 0.0, {k: [] for k in trackers}, []
    for i in range(0, len(times) + batch, batch):
        t0 = time.perf_counter()
        rows = (fitter.update(q, inten[i:i + batch], sig[i:i + batch], seq[i:i + batch], times[i:i + batch])
                if i < len(times) else fitter.finish())
        fit_s += time.perf_counter() - t0
        all_rows.append(rows)
        for name, tr in trackers.items():
            t0 = time.perf_counter()
            out = (tr.update(rows, seq_num=seq[i:i + batch], radial=q, intensity=inten[i:i + batch])
                   if i < len(times) else tr.finish(rows))
            spent[name] += time.perf_counter() - t0
            finals[name].append({k: v[out["final"]] for k, v in out.items()})
    truth = cycle.truth(times)["phase"]
    crossings = truth_crossings(cycle, times, PHASES)
    frame_s = float(np.median(np.diff(times)))
    res = {"truth": truth, "fit_s": fit_s, "crossings": crossings}
    for name, tr in trackers.items():
        fin = {k: np.concatenate([f[k] for f in finals[name]]) for k in finals[name][0]}
        order = np.argsort(fin["seq_num"])
        labels = fin["phase"][order]
        err, missed, false = match_crossings(crossings, event_crossings(tr.transitions(), PHASES), frame_s)
        res[name] = {"labels": labels, "correct": float(np.mean(labels == truth)), "errors": err,
                     "missed": missed, "false": false, "ms_per_frame": 1e3 * spent[name] / len(times),
                     "crystallinity": fin["crystallinity"][order], "events": tr.transitions()}
    from workers.temporal import concat_rows
    rows = concat_rows(all_rows)
    tab = frame_table({k: v[rows["final"]] for k, v in rows.items()}, ("lamellar",))
    t0 = time.perf_counter()
    labels, events = baseline_events(tab["lamellar_amplitude"], times, PHASES)
    spent_b = time.perf_counter() - t0
    err, missed, false = match_crossings(crossings, event_crossings(events, PHASES), frame_s)
    res["baseline"] = {"labels": labels, "correct": float(np.mean(labels == truth)), "errors": err,
                       "missed": missed, "false": false, "ms_per_frame": 1e3 * spent_b / len(times), "events": events}
    return res


# ---------------------------------------------------------------------------------------------
# training
def _meta(profile_bins: int, extra: dict) -> dict:
    from service.sim.azopolymer import PHASES
    return {"phases": list(PHASES), "peaks": ["lamellar", "halo", "pi_pi"], "grid": [GRID[0], GRID[1], profile_bins],
            "params": list(PARAMS), "hidden": HIDDEN, "version": 1, **extra}


def train_classifier(X, y, groups, *, epochs: int, seed: int, held_out: float = 0.2, noise: float = 0.0,
                     dropout: float = 0.0, weight_decay: float = 1e-3):
    """AdamW on the cross-entropy, Gaussian input noise ``noise`` (in
    standard deviations of each feature) and dropout as regularisers; returns (model, history)."""
    import torch

    from workers.phase import PhaseClassifier

    torch.manual_seed(seed)
    cut = np.quantile(np.unique(groups), 1.0 - held_out)
    tr, te = groups < cut, groups >= cut
    Xt, yt = torch.as_tensor(X[tr]), torch.as_tensor(y[tr])
    Xv, yv = torch.as_tensor(X[te]), torch.as_tensor(y[te])
    model = PhaseClassifier(X.shape[1], 3, HIDDEN, dropout=dropout)
    finite = torch.where(torch.isfinite(Xt), Xt, torch.nan)
    model.mean.copy_(torch.nanmean(finite, 0).nan_to_num(0.0))
    std = torch.sqrt(torch.nanmean((finite - model.mean) ** 2, 0)).nan_to_num(1.0)
    model.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    loss_fn = torch.nn.CrossEntropyLoss()      # unweighted: class weights would move the boundaries
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    hist = {"train_loss": [], "held_out_loss": [], "train_acc": [], "held_out_acc": []}
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(yt)).split(256):
            opt.zero_grad()
            xb = Xt[idx]
            if noise:
                xb = xb + noise * model.std * torch.randn_like(xb)
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            for name, (a, b) in (("train", (Xt, yt)), ("held_out", (Xv, yv))):
                out = model(a)
                hist[f"{name}_loss"].append(float(loss_fn(out, b)))
                hist[f"{name}_acc"].append(float((out.argmax(1) == b).float().mean()))
    return model, hist


def plot_history(hist: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, style in (("train", "-"), ("held_out", "--")):
        a1.plot(hist[f"{key}_loss"], style, label=key.replace("_", "-"))
        a2.plot(hist[f"{key}_acc"], style, label=key.replace("_", "-"))
    a1.set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
    a2.set(xlabel="epoch", ylabel="fraction of frames labelled correctly")
    a1.legend(), a2.legend()
    fig.suptitle("phase classifier on simulated azopolymer cycles")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_checkpoint(model, meta: dict, path: Path) -> None:
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, path)


def load_phase_checkpoint(path: str | Path | None = None) -> dict | None:
    """The classifier checkpoint ``{"state_dict", "meta"}`` (weights only), or None when the file
    does not exist (the tracker then uses the rules). Default: the shipped checkpoint."""
    import torch
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"state_dict", "meta"} <= set(ckpt):
        raise ValueError(f"{path}: not a phase classifier checkpoint (keys {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)})")
    return ckpt


def run(args) -> int:
    """Generate, train, write the checkpoint and PNG; 0, or 2 on bad options."""
    for name in ("cycles", "frames", "epochs"):
        if getattr(args, name) < (5 if name == "cycles" else 10):
            print(f"scatterflow train phase: --{name} too small: {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.threads < 1:
        print(f"scatterflow train phase: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if not 0 <= args.profile_bins <= 512:
        print(f"scatterflow train phase: --profile-bins must be in [0, 512], got {args.profile_bins}", file=sys.stderr)
        return 2
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(quiet=args.quiet)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=args.quiet) as progress:
        task = progress.add_task("simulating + fitting cycles", total=args.cycles)
        X, y, groups = make_dataset(args.cycles, args.frames, args.seed, _meta(args.profile_bins, {}),
                                    progress=lambda n: progress.update(task, completed=n))
    t1 = time.perf_counter()
    console.print(f"{len(y)} frames from {args.cycles} cycles in {t1 - t0:.0f} s "
                  f"({len(y) / (t1 - t0):.0f} frames/s); phases {np.bincount(y, minlength=3).tolist()}")
    model, hist = train_classifier(X, y, groups, epochs=args.epochs, seed=args.seed)
    t2 = time.perf_counter()
    acc = hist["held_out_acc"][-1]
    meta = _meta(args.profile_bins, {"held_out_accuracy": acc, "train_frames": int(len(y)), "cycles": args.cycles, "seed": args.seed})
    save_checkpoint(model, meta, args.output)
    png = args.output.with_suffix(".png")
    plot_history(hist, png)
    console.print(f"trained {args.epochs} epochs in {t2 - t1:.0f} s; held-out accuracy {acc:.3f} "
                  f"(train {hist['train_acc'][-1]:.3f})")
    console.print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} kB) and {png}")
    return 0


def main(argv=None) -> int:        # python -m service.train.phase; the same as `scatterflow train phase`
    parser = argparse.ArgumentParser(prog="scatterflow train phase", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
