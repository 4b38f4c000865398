"""``scatterflow fit``: peak trajectories from a series of 1D profiles.

    scatterflow fit PROFILES.npz --peaks PEAKS.yaml -o OUT.csv [--device auto|cpu|cuda]

PROFILES.npz as ``scatterflow integrate`` writes it: ``q`` (N,) 1/nm, ``I`` (frames, N),
``sigma`` (frames, N), optional ``time`` (frames,) s and ``seq_num`` (frames,).
PEAKS.yaml: the ``fit:`` section of the service configuration (or a file with that section),
validated as the service validates it: ``peaks: [{name, shape, center, fwhm, center_min,
center_max}, ...]`` (required), ``background: {kind, degree}`` (default polynomial, degree 1),
``regularizer: {window, penalty, strength}``, ``q_range: [min, max]`` (default: all points).
OUT.csv: the final rows, one per frame and peak (columns ``workers.columns.PEAK_COLUMNS``);
OUT.png beside it: centre (with a 1-sigma band), FWHM and area against frame, change points marked.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.specs import ModelSpec, RegularizerSpec

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fit", help="fit peak trajectories to a series of 1D profiles",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", type=Path, help="PROFILES.npz (q, I, sigma, optional time, seq_num)")
    p.add_argument("--peaks", type=Path, required=True, help="PEAKS.yaml (fit configuration)")
    p.add_argument("-o", "--output", type=Path, required=True, help="OUT.csv (final rows)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, default=64,
                   help="frames per update (default 64; only final rows are written, so a batch's size "
                        "changes the cost, not the result beyond the LM tolerance)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU (default 1: the frames of a batch are the parallelism; more "
                        "threads on small problems cost more than they give, and spin on a shared machine)")
    p.add_argument("--no-plot", action="store_true", help="do not write OUT.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _load(args):
    import numpy as np

    try:
        z = np.load(args.profiles, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{args.profiles}: not an .npz archive of profiles ({exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{args.profiles}: a single array, not an .npz archive with arrays q and I (and sigma, "
                         f"time, seq_num), as `scatterflow integrate` writes")
    with z:
        missing = {"q", "I"} - set(z.files)
        if missing:
            raise ValueError(f"{args.profiles}: missing arrays {sorted(missing)} (has {z.files})")
        q, inten = np.asarray(z["q"], float), np.atleast_2d(np.asarray(z["I"], float))
        sigma = np.asarray(z["sigma"], float) if "sigma" in z.files else np.sqrt(np.clip(inten, 1, None))
        n = inten.shape[0]
        time = np.asarray(z["time"], float) if "time" in z.files else np.full(n, np.nan)
        seq = np.asarray(z["seq_num"], np.int64) if "seq_num" in z.files else np.arange(1, n + 1)
    if inten.shape[1] != q.shape[0] or sigma.shape != inten.shape:
        raise ValueError(f"{args.profiles}: I {inten.shape} and sigma {sigma.shape} must be (frames, {q.shape[0]})")
    spec, reg = _fit_specs(args.peaks)
    return q, inten, sigma, time, seq, spec, reg


#: where PEAKS.yaml is silent: all points and a linear background (the service's own defaults
#: are those of its demo film)
_CLI_DEFAULTS = {"q_range": None, "background": {"kind": "polynomial", "degree": 1}}


def _fit_specs(path: Path) -> tuple[ModelSpec, RegularizerSpec]:
    """(ModelSpec, RegularizerSpec) of PEAKS.yaml, validated by the service's ``FitConfig``.
    Raises ConfigError with one line naming the offending key, as the service configuration does."""
    import yaml
    from pydantic import ValidationError

    from service.config import FitConfig, one_line, yaml_problem
    from service.errors import ConfigError
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from None
    if isinstance(cfg, dict) and "fit" in cfg:
        cfg = cfg["fit"]
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the fit configuration must be a mapping, got {type(cfg).__name__}")
    try:
        fit = FitConfig.model_validate({**_CLI_DEFAULTS, **cfg})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {one_line(exc, ('fit',))}") from None
    spec = fit.model_spec()
    if "peaks" not in cfg or spec is None:
        raise ConfigError(f"{path}: configuration error at fit.peaks: at least one peak is needed")
    return spec, fit.regularizer


def run(args) -> int:
    """Fit, write OUT.csv (and OUT.png). Returns 0, or 2 on bad input."""
    try:
        q, inten, sigma, time, seq, spec, reg = _load(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"scatterflow fit: {e}", file=sys.stderr)
        return 2
    for name in ("batch", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"scatterflow fit: --{name} must be >= 1, got {v}", file=sys.stderr)
            return 2
    import pandas as pd
    import torch
    from rich.progress import Progress

    from workers.temporal import TrajectoryFitter, concat_rows
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("scatterflow fit: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    fitter = TrajectoryFitter(spec, reg, device=device)
    rows = []
    n = inten.shape[0]
    with Progress(disable=args.quiet or n < 2 * args.batch, transient=True) as prog:
        task = prog.add_task(f"fitting {n} frames on {device}", total=n)
        for s in range(0, n, args.batch):
            sl = slice(s, s + args.batch)
            rows.append(fitter.update(q, inten[sl], sigma[sl], seq[sl], time[sl]))
            prog.advance(task, len(seq[sl]))
    rows.append(fitter.finish())
    allrows = concat_rows(rows)
    final = {k: v[allrows["final"]] for k, v in allrows.items()}
    df = pd.DataFrame(final).sort_values(["seq_num", "peak"], kind="stable")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.output, index=False)
    n_cp = int(df.loc[df["change_point"], "seq_num"].nunique())
    print(f"{n} frames x {len(spec.peaks)} peaks -> {args.output} ({int((~df['converged']).sum())} rows "
          f"not converged, {int((df['unidentified'] > 0).sum())} with unidentified parameters, {n_cp} change "
          f"points, {fitter.reseeds} re-seeds)")
    if not args.no_plot:
        png = args.output.with_suffix(".png")
        plot_trajectories(df, png)
        print(f"plot -> {png}")
    return 0


def plot_trajectories(df, path: Path) -> None:
    """Centre (1-sigma band), FWHM and area against frame for every peak; change points dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    peaks = list(dict.fromkeys(df["peak"]))
    fig, axes = plt.subplots(3, len(peaks), figsize=(4.5 * len(peaks), 7.5), squeeze=False, sharex=True)
    for j, name in enumerate(peaks):
        d = df[df["peak"] == name]
        x = d["seq_num"].to_numpy()
        for i, (col, label) in enumerate((("center", "centre (1/nm)"), ("fwhm", "FWHM (1/nm)"),
                                          ("amplitude", "area"))):
            ax = axes[i, j]
            v, e = d[col].to_numpy(), d[f"{col}_err"].to_numpy()
            ax.plot(x, v, lw=1)
            ax.fill_between(x, v - e, v + e, alpha=0.3, lw=0)
            for cp in x[d["change_point"].to_numpy()]:
                ax.axvline(cp, color="tab:red", ls="--", lw=0.8)
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(name)
        axes[-1, j].set_xlabel("frame (seq_num)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:   # convenience: python -m service.commands.fit
    ap = argparse.ArgumentParser(prog="scatterflow")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["fit", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
