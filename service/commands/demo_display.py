"""What the demos show (`scatterflow demo`, service/commands/demo.py and demo_experiments.py): a
progress bar fed from the service's counters, the final fitted centres against the simulator's
truth, and trajectory plots."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np


def latency_ms(metrics, stage: str, q: float) -> float:
    """Quantile ``q`` of the arrival-to-``stage`` latency in ms (`Metrics.latency_quantile`),
    NaN before the first frame."""
    s = metrics.latency_quantile(stage, q)
    return float("nan") if s is None else s * 1e3


class RunProgress:
    """A rich progress bar fed from the service's own counters (frames fitted, final; latency)."""

    def __init__(self, console, service, total: int, uids: list):
        self.console, self.service, self.total, self.uids = console, service, total, uids
        self._stop = threading.Event()

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
        self.fitted = self.progress.add_task("fitted", total=self.total, info="")
        self.final = self.progress.add_task("final ", total=self.total, info="")
        self.progress.start()
        self._thread = threading.Thread(target=self._update, daemon=True)
        self._thread.start()
        return self

    def _update(self):
        t0 = time.monotonic()
        while not self._stop.wait(0.25):
            run = self.service.store.get(self.uids[-1]) if self.uids else None
            if run is None:
                continue
            rate = run.frames_fitted / max(time.monotonic() - t0, 1e-9)
            p50 = latency_ms(self.service.metrics, "provisional", 0.5)
            self.progress.update(self.fitted, completed=run.frames_fitted,
                                 info=f"{rate:5.1f} frames/s, latency p50 {p50:5.0f} ms")
            self.progress.update(self.final, completed=run.frames_final, info=f"status {run.status}")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.progress.stop()


def floats(values) -> np.ndarray:
    """Values of a column as REST's store gives them (NaN as None) as float64, None as NaN."""
    return np.array([np.nan if v is None else v for v in values], np.float64)


def summarize(service, uid: str, truth_prefix: str = "det") -> dict:
    """Final fitted centres against the simulator's truth (carried in the events), per peak."""
    run = service.store.get(uid)
    cols, _ = service.store.peaks_since(uid, 0, final=True)
    out = {}
    for peak in sorted(set(cols["peak"])):
        idx = [i for i, p in enumerate(cols["peak"]) if p == peak]
        seq = np.array([cols["seq_num"][i] for i in idx])
        center, err = floats(cols["center"][i] for i in idx), floats(cols["center_err"][i] for i in idx)
        truth = np.array([run.scalars.get(int(s), {}).get(f"{truth_prefix}_{peak}_center_truth", np.nan) for s in seq])
        ok = np.isfinite(truth) & np.isfinite(center)
        d = center[ok] - truth[ok]
        known = ok & np.isfinite(err)                     # an undetermined centre has no error (NaN)
        out[peak] = {"frames": len(idx), "rmse": float(np.sqrt(np.mean(d ** 2))) if ok.any() else float("nan"),
                     "median_err": float(np.median(err[known])) if known.any() else float("nan"),
                     "within_2sigma": (float(np.mean(np.abs(center[known] - truth[known]) <= 2 * err[known]))
                                       if known.any() else float("nan")),
                     "change_points": int(sum(cols["change_point"][i] for i in idx)),
                     "truth_range": (float(np.nanmin(truth)), float(np.nanmax(truth))) if ok.any() else (np.nan, np.nan)}
    return out


def print_summary(console, service, uid, summary, elapsed) -> None:
    """The `summarize` table and one line of counts, rate and latency (``elapsed`` s)."""
    from rich.table import Table
    run = service.store.get(uid)
    table = Table(title=f"run {uid[:8]}: fitted centres (final) vs simulator truth")
    for col in ("peak", "frames", "truth range 1/nm", "RMSE 1/nm", "median stderr", "|err|<2σ", "change points"):
        table.add_column(col, justify="right")
    for peak, s in summary.items():
        table.add_row(peak, str(s["frames"]), f"{s['truth_range'][0]:.3f}-{s['truth_range'][1]:.3f}",
                      f"{s['rmse']:.4f}", f"{s['median_err']:.4f}", f"{100 * s['within_2sigma']:.0f} %",
                      str(s["change_points"]))
    console.print(table)
    st = service.status()
    console.print(f"frames received {run.frames_received}, fitted {run.frames_fitted}, final {run.frames_final}, "
                  f"failed {dict(run.failed) or 0}; status {run.status}; {run.frames_fitted / elapsed:.1f} frames/s "
                  f"end to end; latency p50 {latency_ms(service.metrics, 'provisional', 0.5):.0f} ms "
                  f"p99 {latency_ms(service.metrics, 'provisional', 0.99):.0f} ms; "
                  f"devices {st['devices']}")


def plot_trajectories(service, uid: str, path: Path, truth_prefix: str = "det") -> Path:
    """Fitted centre, FWHM and area per peak with ±1σ bands and the truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = service.store.get(uid)
    cols, _ = service.store.peaks_since(uid, 0, final=True)
    peaks = sorted(set(cols["peak"]))
    fig, axes = plt.subplots(3, len(peaks), figsize=(4.2 * len(peaks), 8), sharex=True, squeeze=False)
    for j, peak in enumerate(peaks):
        idx = [i for i, p in enumerate(cols["peak"]) if p == peak]
        seq = np.array([cols["seq_num"][i] for i in idx])
        for i, (key, label) in enumerate((("center", "centre (1/nm)"), ("fwhm", "FWHM (1/nm)"),
                                          ("amplitude", "area"))):
            v, e = floats(cols[key][k] for k in idx), floats(cols[f"{key}_err"][k] for k in idx)
            lo = v - e if key == "center" else np.maximum(v - e, 0.0)     # widths and areas are >= 0
            ax = axes[i, j]
            ax.plot(seq, v, "-", color="C0", label="fit (final)")
            ax.fill_between(seq, lo, v + e, color="C0", alpha=0.3)
            tkey = {"amplitude": "area"}.get(key, key)
            truth = [run.scalars.get(int(s), {}).get(f"{truth_prefix}_{peak}_{tkey}_truth", np.nan) for s in seq]
            ax.plot(seq, truth, "--", color="k", lw=1, label="truth")
            cps = [cols["seq_num"][k] for k in idx if cols["change_point"][k]]
            for c in cps:
                ax.axvline(c, color="C3", lw=0.8, alpha=0.6)
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(peak)
        axes[-1, j].set_xlabel("frame (seq_num)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
