"""The run report: a finished run read back from Tiled, written as HTML (and PDF with weasyprint).

`write_report(node, out_dir)` reads one run container of the Tiled layout
(`service/publish/tiled/`: metadata start/configuration/software/status, arrays `q`,
`profiles`, `sigma`, tables `frames`, `peaks`, `change_points`; optional array `snapshots`
(k, h, w) of corrected 2D frames with table `snapshot_frames` (seq_num, time)) and writes::

    out_dir/index.html               the report
    out_dir/report.pdf               the same, when weasyprint is installed
    out_dir/figures/heatmap.png      log10 intensity, frames x q
    out_dir/figures/profiles.png     a few profiles overlaid (±1σ)
    out_dir/figures/trajectory-<peak>.png   centre, FWHM, area vs frame: final ±1σ, provisional
    out_dir/figures/chi2.png         reduced chi² of the final fits per frame
    out_dir/figures/snapshots.png    corrected 2D frames (up to 8, a row per 4, log colour, masked
                                     grey) with their frame numbers; only if the run holds `snapshots`
    out_dir/figures/inversion.png    structural parameters (±1σ) and reduced χ² per frame coloured
                                     by the fit-quality verdict; only if the run holds `inversion`

It only reads the node (pure with respect to Tiled); figures are matplotlib (Agg).
Units: q in the run's unit (1/nm by default), times in s since the first frame.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
from pathlib import Path

import numpy as np

from workers.columns import PEAK_COLUMNS

log = logging.getLogger(__name__)

QUANTITIES = (("center", "centre"), ("fwhm", "FWHM"), ("amplitude", "area"))


def write_report_for(tiled_uri: str, api_key: str | None, uid: str, out_dir, *,
                     wait_s: float = 60.0) -> Path:
    """Connect to Tiled at `tiled_uri` and write the report of run `uid` (a full uid or a unique
    prefix) under `out_dir`; returns the path of index.html. For `scatterflow demo`.

    Tiled writes trail the live view: waits up to `wait_s` s for the run's metadata status to
    leave "running" (the writer sets it after the last rows), then reports what is there."""
    import time

    from .publish.tiled_server import connect
    client = connect(tiled_uri, api_key)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            node = find_run(client, uid)
            if node.metadata.get("status") != "running" or time.monotonic() > deadline:
                break
        except ValueError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.25)
    if node.metadata.get("status") == "running":
        log.warning("run %s still 'running' in Tiled after %.0f s: the report may be incomplete", uid, wait_s)
    return write_report(find_run(client, uid), out_dir)


def find_run(client, uid: str):
    """The container `scatterflow/<uid>` under a Tiled root client; `uid` may be a unique prefix."""
    if "scatterflow" not in client:
        raise ValueError(f"no 'scatterflow' container on this Tiled server ({client.uri})")
    root = client["scatterflow"]
    if uid in root:
        return root[uid]
    matches = [k for k in root if k.startswith(uid)] if uid else []
    if len(matches) == 1:
        return root[matches[0]]
    if not matches:
        raise ValueError(f"no run {uid!r} under scatterflow/ in Tiled")
    raise ValueError(f"run uid prefix {uid!r} is ambiguous: {', '.join(sorted(matches)[:5])} ...")


# --- reading ---------------------------------------------------------------------------------

def _read_table(node, key: str):
    import pandas as pd
    try:
        df = node[key].read() if key in node else None
    except Exception as exc:          # an appendable table with no partition yet
        log.debug("table %s unreadable (%s): treated as empty", key, exc)
        df = None
    if df is None:
        return pd.DataFrame({c: [] for c in (("seq_num", "time") if key == "frames" else PEAK_COLUMNS)})
    return df


def read_run(node) -> dict:
    """Everything the report shows, from one run node, as numpy/pandas objects."""
    md = _plain(dict(node.metadata))
    q = np.asarray(node["q"].read(), float) if "q" in node else np.zeros(0)
    unit = (node["q"].metadata or {}).get("unit", "") if "q" in node else ""
    profiles = np.asarray(node["profiles"].read(), float) if "profiles" in node else np.zeros((0, q.size))
    sigma = np.asarray(node["sigma"].read(), float) if "sigma" in node else np.full(profiles.shape, np.nan)
    frames = _read_table(node, "frames")
    peaks = _read_table(node, "peaks")
    cps = _read_table(node, "change_points")
    inversion = _read_table(node, "inversion") if "inversion" in node else None
    snapshots, snapshot_seq = None, None
    if "snapshots" in node:                           # optional (k, h, w) corrected 2D frames
        snapshots = np.asarray(node["snapshots"].read(), float)
        if snapshots.ndim == 2:
            snapshots = snapshots[None]
        snap_frames = _read_table(node, "snapshot_frames") if "snapshot_frames" in node else None
        if snap_frames is not None and "seq_num" in snap_frames and len(snap_frames) >= len(snapshots):
            snapshot_seq = np.asarray(snap_frames["seq_num"], np.int64)[:len(snapshots)]
    # frames table rows are in profile-row order; keep that pairing, then order by seq_num
    seq = np.asarray(frames["seq_num"], np.int64) if len(frames) == len(profiles) else np.arange(len(profiles))
    t = np.asarray(frames["time"], float) if len(frames) == len(profiles) else np.full(len(profiles), np.nan)
    order = np.argsort(seq, kind="stable")
    peaks = peaks.sort_values(["peak", "seq_num"], kind="stable").reset_index(drop=True)
    final = peaks[peaks["final"].astype(bool)].drop_duplicates(["peak", "seq_num"], keep="last")
    prov = peaks[~peaks["final"].astype(bool)].drop_duplicates(["peak", "seq_num"], keep="last")
    cps = cps[cps["final"].astype(bool)] if len(cps) else cps
    return {"uid": node.item["id"] if hasattr(node, "item") else md.get("start", {}).get("uid"),
            "metadata": md, "q": q, "unit": unit, "profiles": profiles[order], "sigma": sigma[order],
            "seq_num": seq[order], "time": t[order], "final": final, "provisional": prov,
            "change_points": cps.sort_values(["seq_num", "peak"]) if len(cps) else cps,
            "snapshots": snapshots, "snapshot_seq": snapshot_seq,
            "inversion": (inversion.sort_values("seq_num", kind="stable").drop_duplicates("seq_num", keep="last")
                          .reset_index(drop=True) if inversion is not None and len(inversion) else None)}


# --- summary numbers -------------------------------------------------------------------------

def peak_summary(final) -> list[dict]:
    """Per peak, over its final rows: frames, mean/std/min/max centre, mean FWHM and area,
    median standard errors, median reduced chi², fraction converged, change points."""
    out = []
    for peak in sorted(set(final["peak"])):
        d = final[final["peak"] == peak]
        c = d["center"].to_numpy(float)
        out.append({"peak": peak, "frames": int(len(d)),
                    "mean_center": float(np.nanmean(c)), "std_center": float(np.nanstd(c)),
                    "min_center": float(np.nanmin(c)), "max_center": float(np.nanmax(c)),
                    "median_center_err": float(np.nanmedian(d["center_err"].to_numpy(float))),
                    "mean_fwhm": float(np.nanmean(d["fwhm"].to_numpy(float))),
                    "mean_area": float(np.nanmean(d["amplitude"].to_numpy(float))),
                    "median_chi2": float(np.nanmedian(d["chi2"].to_numpy(float))),
                    "converged": float(np.mean(d["converged"].astype(bool))),
                    "change_points": int(np.sum(d["change_point"].astype(bool))),
                    # frames whose data do not determine some of this peak's parameters (runs
                    # written before the column existed: 0)
                    "undetermined": int(np.sum(d["unidentified"].to_numpy() > 0)) if "unidentified" in d else 0})
    return out


# --- figures ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def fig_heatmap(run: dict, path: Path) -> Path | None:
    """log10 intensity as an image: frames (seq_num) down, q across; change points marked."""
    prof, q, seq = run["profiles"], run["q"], run["seq_num"]
    if prof.size == 0:
        return None
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    pos = prof[np.isfinite(prof) & (prof > 0)]
    lo, hi = (np.percentile(pos, [1, 99.9]) if pos.size else (1e-3, 1.0))
    data = np.ma.masked_less_equal(np.where(np.isfinite(prof), prof, 0.0), 0.0)
    edges_q = _edges(q)
    edges_s = _edges(seq.astype(float))
    im = ax.pcolormesh(edges_q, edges_s, data, norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.01)),
                       cmap="viridis", shading="flat", rasterized=True)
    ax.invert_yaxis()
    for s in sorted(set(run["change_points"]["seq_num"])) if len(run["change_points"]) else []:
        ax.axhline(s, color="C3", lw=0.8, ls="--", alpha=0.8)
    ax.set_xlabel(f"q ({_unit_label(run['unit'])})")
    ax.set_ylabel("frame (seq_num)")
    ax.set_title("reduced profiles over time (log intensity; dashed: change points)")
    fig.colorbar(im, ax=ax, label="I (mean per bin)")
    fig.tight_layout()
    return _save(fig, path)


def fig_profiles(run: dict, path: Path, n: int = 6) -> Path | None:
    """Up to `n` profiles evenly spaced in the run, ±1σ shaded, log intensity."""
    prof, sig, q, seq = run["profiles"], run["sigma"], run["q"], run["seq_num"]
    if prof.size == 0:
        return None
    plt = _pyplot()
    idx = np.unique(np.linspace(0, len(prof) - 1, min(n, len(prof))).round().astype(int))
    cmap = plt.get_cmap("plasma")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, i in enumerate(idx):
        color = cmap(k / max(len(idx) - 1, 1) * 0.85)
        ax.plot(q, prof[i], color=color, lw=1, label=f"frame {seq[i]}")
        ax.fill_between(q, prof[i] - sig[i], prof[i] + sig[i], color=color, alpha=0.3, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel(f"q ({_unit_label(run['unit'])})")
    ax.set_ylabel("I (mean per bin)")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("profiles through the run (±1σ)")
    fig.tight_layout()
    return _save(fig, path)


def fig_trajectory(run: dict, peak: str, path: Path) -> Path:
    """Centre, FWHM and area of one peak against frame: final fits with ±1σ bands,
    provisional fits as dots, change points as dashed lines."""
    plt = _pyplot()
    fin = run["final"][run["final"]["peak"] == peak]
    prov = run["provisional"][run["provisional"]["peak"] == peak]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
    unit = _unit_label(run["unit"])
    cps = fin["seq_num"][fin["change_point"].astype(bool)].to_numpy()
    for ax, (key, label) in zip(axes, QUANTITIES):
        x = fin["seq_num"].to_numpy(float)
        v = fin[key].to_numpy(float)
        e = fin[f"{key}_err"].to_numpy(float)
        ax.plot(prov["seq_num"].to_numpy(float), prov[key].to_numpy(float), ".", color="0.55", ms=3,
                label="provisional")
        ax.plot(x, v, "-", color="C0", lw=1.3, label="final")
        ax.fill_between(x, v - e, v + e, color="C0", alpha=0.3, lw=0, label="final ±1σ")
        for c in cps:
            ax.axvline(c, color="C3", lw=0.9, ls="--", alpha=0.8)
        ax.set_ylabel(f"{label} ({unit})" if key != "amplitude" else f"area (I·{unit})")
    axes[0].set_title(f"{peak}: fitted trajectory")
    axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("frame (seq_num)")
    fig.tight_layout()
    return _save(fig, path)


def fig_chi2(run: dict, path: Path) -> Path | None:
    """Reduced chi² of the final fits per frame (1 = fit within the noise)."""
    fin = run["final"]
    if not len(fin):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    for k, peak in enumerate(sorted(set(fin["peak"]))):
        d = fin[fin["peak"] == peak]
        ax.plot(d["seq_num"], d["chi2"], ".-", ms=3, lw=0.8, color=f"C{k}", label=peak)
    ax.axhline(1.0, color="k", lw=0.7, ls=":")
    chi = fin["chi2"].to_numpy(float)
    chi = chi[np.isfinite(chi) & (chi > 0)]
    if chi.size and chi.max() / chi.min() > 30:
        ax.set_yscale("log")
    ax.set_xlabel("frame (seq_num)")
    ax.set_ylabel("reduced χ²")
    ax.legend(fontsize=8)
    ax.set_title("fit quality (final fits)")
    fig.tight_layout()
    return _save(fig, path)


VERDICT_COLORS = {"good": "#2e7d32", "poor": "#f9a825", "bad": "#c62828"}
PARAMETER_UNITS = {"radius": "nm", "rg": "nm", "distance": "nm", "height": "nm",   # lengths; the rest as stored
                   "radius_mean": "nm", "radius_width": "std / mean"}


def inversion_parameters(inv) -> list[str]:
    """The fitted parameter names of an inversion table: the columns with an ``_err`` twin."""
    return [c for c in inv.columns if f"{c}_err" in inv.columns]


HISTOGRAM_PREFIX = "radius_fraction_"      # a radius histogram's columns (volume fractions per bin)


def fig_inversion(run: dict, path: Path) -> Path | None:
    """Each structural parameter against frame (±1σ band; parameters at a bound as open
    circles), a radius histogram (``radius_fraction_NN`` columns) as a map of volume fraction
    over frame and bin, then the reduced χ² per frame coloured by its verdict (good, poor, bad)."""
    inv = run["inversion"]
    if inv is None:
        return None
    plt = _pyplot()
    names = [n for n in inversion_parameters(inv) if not n.startswith(HISTOGRAM_PREFIX)]
    bins = sorted(n for n in inversion_parameters(inv) if n.startswith(HISTOGRAM_PREFIX))
    rows = len(names) + bool(bins) + 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 1.6 * rows + 0.6), sharex=True, squeeze=False)
    x = inv["seq_num"].to_numpy(float)
    if bins:
        ax = axes[len(names), 0]
        h = np.stack([inv[b].to_numpy(float) for b in bins])
        step = np.median(np.diff(x)) if len(x) > 1 else 1.0
        im = ax.imshow(h, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(x[0] - step / 2, x[-1] + step / 2, -0.5, len(bins) - 0.5))
        fig.colorbar(im, ax=ax, pad=0.01, label="volume fraction")
        ax.set_ylabel("radius bin\n(small → large)", fontsize=8)
    for ax, name in zip(axes[:, 0], names):
        v, e = inv[name].to_numpy(float), inv[f"{name}_err"].to_numpy(float)
        ax.plot(x, v, ".-", color="C0", ms=3, lw=0.8)
        ax.fill_between(x, v - e, v + e, color="C0", alpha=0.3, lw=0)
        if f"{name}_at_bound" in inv:
            b = inv[f"{name}_at_bound"].to_numpy(bool)
            ax.plot(x[b], v[b], "o", mfc="none", mec="C3", ms=5, label="at a bound")
            if b.any():
                ax.legend(fontsize=7, loc="best")
        ax.set_ylabel(f"{name} ({PARAMETER_UNITS[name]})" if name in PARAMETER_UNITS else name, fontsize=8)
    ax = axes[-1, 0]
    chi2 = inv["chi2"].to_numpy(float)
    verdict = inv["fit_quality"].astype(str).to_numpy()
    for k, color in VERDICT_COLORS.items():
        m = verdict == k
        if m.any():
            ax.plot(x[m], chi2[m], "o", ms=3.5, color=color, label=f"{k} ({int(m.sum())})")
    ax.axhline(1.0, color="k", lw=0.7, ls=":")
    pos = chi2[np.isfinite(chi2) & (chi2 > 0)]
    if pos.size and pos.max() / pos.min() > 30:
        ax.set_yscale("log")
    ax.set_ylabel("reduced χ²", fontsize=8)
    ax.set_xlabel("frame (seq_num)")
    ax.legend(fontsize=7, loc="best", title="fit quality", title_fontsize=7)
    axes[0, 0].set_title(f"structural inversion: {', '.join(sorted(set(inv['model'].astype(str))))}")
    fig.tight_layout()
    return _save(fig, path)


def select_snapshots(n: int, k: int = 8) -> np.ndarray:
    """Indices of at most `k` of `n` snapshots, evenly spaced, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)) if n else np.zeros(0, int)


def fig_snapshots(images: np.ndarray, labels: list[str], path: Path, ncols: int = 4) -> Path | None:
    """Snapshots (k, h, w) in rows of `ncols`, one shared log colour scale (1st to 99.9th
    percentile of the positive values), masked (NaN) pixels grey, values <= 0 at the bottom
    of the scale; `labels` as titles."""
    if images.size == 0 or not len(images):
        return None
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    a = np.asarray(images, float)
    bad = ~np.isfinite(a)
    pos = a[~bad & (a > 0)]
    lo, hi = (np.percentile(pos, [1, 99.9]) if pos.size else (1e-3, 1.0))
    hi = max(hi, lo * 1.01)
    data = np.ma.masked_array(np.clip(np.where(bad, lo, a), lo, None), bad)
    n = len(a)
    cols = min(n, ncols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.6 * cols + 1.0, 5.5), 2.7 * rows + 0.3),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#888888")
    norm = LogNorm(vmin=lo, vmax=hi)
    im = None
    for ax, img, label in zip(axes.flat, data, labels):
        im = ax.imshow(img, cmap=cmap, norm=norm, origin="upper", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="corrected intensity (log)", shrink=0.85)
    return _save(fig, path)


# --- the report ------------------------------------------------------------------------------

def write_report(node, out_dir) -> Path:
    """Write the report of the run container `node` (tiled client node `scatterflow/<uid>`)
    into `out_dir` (created); returns the path of `index.html`. Adds `report.pdf` when
    weasyprint can be imported."""
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    run = read_run(node)
    md = run["metadata"]
    start = md.get("start") or {}
    uid = start.get("uid") or run["uid"] or "unknown"
    summary = peak_summary(run["final"])
    figs: dict[str, Path | None] = {
        "heatmap": fig_heatmap(run, figdir / "heatmap.png"),
        "profiles": fig_profiles(run, figdir / "profiles.png"),
        "chi2": fig_chi2(run, figdir / "chi2.png"),
        "inversion": fig_inversion(run, figdir / "inversion.png"),
    }
    trajectories = {s["peak"]: fig_trajectory(run, s["peak"], figdir / f"trajectory-{_safe_name(s['peak'])}.png")
                    for s in summary}
    snapshots = None                                 # (figure, shown seq_nums, stored count)
    snaps = run["snapshots"]
    if snaps is not None and snaps.ndim == 3 and len(snaps):
        idx = select_snapshots(len(snaps))
        seq = run["snapshot_seq"]
        shown = [int(seq[i]) for i in idx] if seq is not None else None
        labels = [f"frame {s}" for s in shown] if shown is not None else [f"snapshot {i}" for i in idx]
        fig = fig_snapshots(snaps[idx], labels, figdir / "snapshots.png")
        if fig is not None:
            snapshots = (fig, shown, len(idx), len(snaps))

    page = _render_html(run, uid, md, start, summary, figs, trajectories, snapshots, out)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    try:
        import weasyprint
    except Exception:                      # optional: not installed, or its system libraries missing
        log.info("weasyprint not available: HTML report only")
    else:
        weasyprint.HTML(filename=str(index), base_url=str(out)).write_pdf(str(out / "report.pdf"))
    return index


def _render_html(run, uid, md, start, summary, figs, trajectories, snapshots, out: Path) -> str:
    e = html.escape
    seq, t = run["seq_num"], run["time"]
    n_frames = int(len(seq))
    t_valid = t[np.isfinite(t)] if t.size else t
    duration = float(t_valid.max() - t_valid.min()) if t_valid.size else float("nan")
    q = run["q"]
    unit = _unit_label(run["unit"])
    rel = lambda p: e(str(p.relative_to(out)))          # noqa: E731

    run_rows = [
        ("run uid", uid), ("plan", start.get("plan_name")), ("scan id", start.get("scan_id")),
        ("sample", start.get("sample")), ("modality", start.get("modality")),
        ("started", _iso(start.get("time"))), ("status", md.get("status")),
        ("exit status", md.get("exit_status")), ("reason", md.get("reason") or ""),
        ("frames (profiles stored)", n_frames),
        ("frames with final fits", int(run["final"]["seq_num"].nunique()) if len(run["final"]) else 0),
        ("seq_num range", f"{seq.min()}–{seq.max()}" if n_frames else "–"),
        ("duration", f"{duration:.1f} s" if math.isfinite(duration) else "–"),
        ("radial bins", int(q.size)),
        ("q range", f"{q.min():.4g}–{q.max():.4g} {unit}" if q.size else "–"),
        ("change points (final)", int(len(run["change_points"]))),
    ]
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>scatterflow report {e(uid[:8])}</title><style>{_CSS}</style></head><body>
<h1>scatterflow run report</h1><p class="uid">run <code id="run-uid">{e(uid)}</code></p>
<p class="muted">generated {e(_dt.datetime.now().astimezone().isoformat(timespec='seconds'))} from Tiled;
all numbers below are read from the stored run (final, regularized fits unless said otherwise).</p>
<h2>Run</h2>{_kv_table(run_rows, 'run-table')}"""]

    # per-peak summary
    parts.append("<h2>Fitted peaks: summary of final fits</h2>")
    if summary:
        cols = [("frames", "frames", "{:d}"), ("mean_center", f"mean centre ({unit})", "{:.5f}"),
                ("std_center", f"std centre ({unit})", "{:.5f}"),
                ("min_center", f"min centre ({unit})", "{:.5f}"), ("max_center", f"max centre ({unit})", "{:.5f}"),
                ("median_center_err", f"median σ centre ({unit})", "{:.2e}"),
                ("mean_fwhm", f"mean FWHM ({unit})", "{:.5f}"), ("mean_area", "mean area", "{:.5g}"),
                ("median_chi2", "median χ²ᵣ", "{:.3f}"), ("converged", "converged", "{:.0%}"),
                ("change_points", "change points", "{:d}"), ("undetermined", "frames undetermined", "{:d}")]
        head = "".join(f"<th>{e(label)}</th>" for _, label, _ in cols)
        body = ""
        for s in summary:
            cells = "".join(f'<td data-field="{k}" data-value="{s[k]!r}">{e(fmt.format(s[k]))}</td>'
                            for k, _, fmt in cols)
            body += f'<tr data-peak="{e(s["peak"])}"><th>{e(s["peak"])}</th>{cells}</tr>'
        parts.append(f'<table id="peak-summary" class="grid"><tr><th>peak</th>{head}</tr>{body}</table>')
        parts.append('<p class="muted" id="summary-notes">χ²ᵣ is per frame: the reduced χ² of that frame\'s whole '
                     "model (every peak and the background together, over the fitted q range), the same in each "
                     "peak's row. About 1 when the model describes the data within their errors; well above 1, "
                     "structure the model lacks (another peak, a background shape) or errors smaller than the "
                     "scatter (intensities scaled after counting, so not Poisson). converged: the share of final "
                     "fits whose solver met its criteria (step and gradient tolerances of the regularized window "
                     "fit, for that frame) with every parameter determined by the data; a fit that stopped at its "
                     "iteration limit, or a peak whose centre or width the data do not determine (its area near "
                     "0: the errors are then blank), counts as not converged. frames undetermined: frames in "
                     "which the data do not determine some of the peak's parameters (a peak of about zero area "
                     "has no centre or width); their errors are blank.</p>")
    else:
        parts.append("<p>No final fits stored for this run.</p>")

    # trajectories
    parts.append("<h2>Trajectories</h2><p class=\"muted\">Final fits as lines with ±1σ bands, provisional "
                 "(per-frame, before the temporal window closed) as grey dots, change points dashed red.</p>")
    for peak, p in trajectories.items():
        parts.append(f'<figure class="traj" data-peak="{e(peak)}"><img src="{rel(p)}" alt="trajectory of {e(peak)}">'
                     f"<figcaption>{e(peak)}: centre, FWHM and area against frame.</figcaption></figure>")

    # change points
    parts.append("<h2>Change points</h2>")
    cps = run["change_points"]
    if len(cps):
        t0 = float(np.nanmin(t)) if t.size and np.isfinite(t).any() else 0.0
        rows = "".join(
            f"<tr><td>{int(r.seq_num)}</td><td>{float(r.time) - t0:.2f}</td><td>{e(str(r.peak))}</td>"
            f"<td>{float(r.center):.5f} ± {float(r.center_err):.1e}</td><td>{float(r.fwhm):.4f}</td>"
            f"<td>{float(r.amplitude):.4g}</td></tr>" for r in cps.itertuples())
        parts.append(f'<table id="change-points" class="grid"><tr><th>frame</th><th>t (s from first frame)</th>'
                     f"<th>peak</th><th>centre ({unit})</th><th>FWHM ({unit})</th><th>area</th></tr>{rows}</table>")
    else:
        parts.append("<p>No change points flagged.</p>")

    # data
    parts.append("<h2>Reduced data</h2>")
    for key, caption in (("heatmap", "Profiles over time: frames down, q across, log intensity."),
                         ("profiles", "A few profiles through the run, ±1σ.")):
        if figs[key] is not None:
            parts.append(f'<figure><img src="{rel(figs[key])}" alt="{key}"><figcaption>{caption}</figcaption></figure>')
    if not n_frames:
        parts.append("<p>No profiles stored.</p>")
    parts.append("<h3>2D frames</h3>")
    if snapshots:
        fig, shown, n_shown, stored = snapshots
        seq_attr = " ".join(str(s) for s in shown) if shown is not None else ""
        which = (f"frames {', '.join(str(s) for s in shown)}" if shown is not None
                 else "frame numbers not stored")
        parts.append(f'<figure id="snapshots" data-seq="{e(seq_attr)}" data-stored="{stored}">'
                     f'<img src="{rel(fig)}" alt="corrected 2D frame snapshots"><figcaption>Corrected 2D '
                     f"frames (raw − dark) / (flat · solid angle · polarization), block-averaged, log colour "
                     f"scale, masked pixels grey: {n_shown} of {stored} "
                     f"stored snapshots ({e(which)}).</figcaption></figure>")
    else:
        parts.append('<p id="no-snapshots">No corrected 2D snapshots stored for this run '
                     "(reduction.snapshot_every = 0, or profiles sent already reduced). The raw frames are "
                     "wherever the beamline's own writer put them (e.g. the run's HDF5 files); the live "
                     "dashboard shows the latest frame while a run goes.</p>")

    # quality
    parts.append("<h2>Fit quality</h2>")
    if figs["chi2"] is not None:
        parts.append(f'<figure><img src="{rel(figs["chi2"])}" alt="chi2"><figcaption>Reduced χ² of the final '
                     "fits per frame; about 1 when the model describes the data within its errors.</figcaption></figure>")

    parts.append(_inversion_html(run["inversion"], figs["inversion"], rel))

    # geometry, configuration, software
    parts.append("<h2>Geometry</h2>")
    parts.append(_geometry_html(start.get("geometry"), (md.get("configuration") or {}).get("geometry")))
    parts.append("<h2>Configuration</h2>")
    conf = _redact(md.get("configuration") or {})
    parts.append(f'<pre id="configuration">{html.escape(json.dumps(conf, indent=2, sort_keys=True, default=str), quote=False)}</pre>')
    parts.append("<h2>Software</h2>")
    parts.append(_kv_table(sorted((md.get("software") or {}).items()), "software"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _inversion_html(inv, fig: Path | None, rel) -> str:
    """The structural inversion: its verdict first (a warning when the model fails on most
    frames), the run summary (``workers.inversion.quality.inversion_summary``), the figure."""
    if inv is None:
        return ""
    from workers.inversion.quality import inversion_summary
    e = html.escape
    summ = inversion_summary({c: inv[c].to_numpy() for c in inv.columns})
    n, bad = summ["frames"], summ["bad"]
    parts = ["<h2>Structural inversion</h2>"]
    if bad:
        cls = "warn" if bad > n / 2 else "note"
        parts.append(f'<p id="inversion-verdict" class="{cls}" data-bad="{bad}" data-frames="{n}">The model '
                     f"<b>{e(summ['model'])}</b> cannot describe {bad} of {n} frames (fit quality <i>bad</i>: "
                     "reduced χ² above the threshold, 4 by default): for those frames its parameters are not "
                     "measurements of the sample. The profile has structure the model lacks (a low-q upturn, "
                     "another population, a structure factor); try another model (<code>inversion.model</code>: "
                     "sphere_hs, powerlaw_spheres, unified_level).</p>")
    else:
        parts.append(f'<p id="inversion-verdict" class="ok" data-bad="0" data-frames="{n}">The model '
                     f"<b>{e(summ['model'])}</b> describes all {n} frames within the misfit threshold.</p>")
    at_bound = ", ".join(f"{k} {v:.0%}" for k, v in summ["at_bound_fraction"].items() if v) or "none"
    rows = [("frames", n), ("model", summ["model"]), ("good / poor / bad", f"{summ['good']} / {summ['poor']} / {bad}"),
            ("median reduced χ²", f"{summ['median_chi2']:.3g}"), ("converged", f"{summ['converged_fraction']:.0%}"),
            ("parameters at a bound (share of frames)", at_bound),
            ("LM started from", ", ".join(f"{k} {v}" for k, v in summ["warm_start"].items()))]
    names = inversion_parameters(inv)
    rows += [(f"{name}: median (median σ)", f"{_median(inv[name]):.4g} ({_median(inv[f'{name}_err']):.2g})")
             for name in names if not name.startswith(HISTOGRAM_PREFIX)]
    n_bins = sum(name.startswith(HISTOGRAM_PREFIX) for name in names)
    if n_bins:
        modes = f", modes per frame: median {_median(inv['n_modes']):.0f}" if "n_modes" in inv else ""
        rows.append(("radius histogram", f"{n_bins} bins of volume fraction (figure){modes}"))
    parts.append(_kv_table(rows, "inversion-summary"))
    parts.append('<p class="muted">Per frame, the verdict comes from the reduced χ² of the model against the '
                 "profile with its errors: <i>good</i> when the χ² p-value is at least 10⁻³ (the model describes "
                 "the data within their errors), <i>bad</i> when the reduced χ² exceeds 4 (a misfit about 1.7× "
                 "the noise: the model cannot describe the sample), <i>poor</i> in between (a slightly wrong "
                 "model, or errors underestimated up to 2×). Thresholds: <code>inversion.good_p_value</code>, "
                 "<code>inversion.bad_chi2</code>. σ are the LM standard errors; NaN for a parameter at a bound "
                 "(its error is one-sided).</p>")
    if fig is not None:
        parts.append(f'<figure><img src="{rel(fig)}" alt="inversion"><figcaption>Structural parameters per frame '
                     "(±1σ; open red circles: at a bound) and the reduced χ² coloured by the verdict.</figcaption>"
                     "</figure>")
    return "".join(parts)


def _median(column) -> float:
    """Median of the finite values; NaN when there are none (a parameter always at a bound)."""
    v = column.to_numpy(float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def _geometry_html(poni: dict | None, config_geometry: dict | None) -> str:
    rows = []
    if isinstance(poni, dict):
        def num(key):
            v = poni.get(key)
            return float(v) if isinstance(v, (int, float)) else None
        dist, p1, p2 = num("dist"), num("poni1"), num("poni2")
        wl = num("wavelength")
        det = poni.get("detector")
        if isinstance(poni.get("detector_config"), dict) and poni["detector_config"]:
            det = f"{det} {json.dumps(poni['detector_config'], sort_keys=True)}"
        rows += [("detector", det),
                 ("distance (sample–PONI)", f"{dist * 1e3:.3f} mm" if dist is not None else "–"),
                 ("PONI 1 / PONI 2", f"{p1 * 1e3:.3f} mm / {p2 * 1e3:.3f} mm" if None not in (p1, p2) else "–")]
        for k in ("rot1", "rot2", "rot3"):
            v = num(k)
            rows.append((k, f"{v:.6f} rad ({math.degrees(v):.4f}°)" if v is not None else "–"))
        if wl:
            rows += [("wavelength", f"{wl * 1e10:.5f} Å"),
                     ("energy", f"{12.398419843320026 / (wl * 1e10):.4f} keV")]   # hc = 12.3984 keV·Å
        rows.append(("PONI version", poni.get("poni_version")))
    else:
        rows.append(("PONI", "not in the start document"))
    if isinstance(config_geometry, dict):
        rows += [(f"configuration: {k}", v) for k, v in sorted(config_geometry.items()) if v is not None]
    return _kv_table(rows, "geometry")


def _kv_table(rows, table_id: str) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape('–' if v is None else str(v))}</td></tr>"
                   for k, v in rows)
    return f'<table id="{table_id}" class="kv">{body}</table>'


def _edges(x: np.ndarray) -> np.ndarray:
    """Bin edges around centres x (midpoints; the outer ones mirrored)."""
    x = np.asarray(x, float)
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def _unit_label(unit: str) -> str:
    return {"q_nm^-1": "1/nm", "q_A^-1": "1/Å", "2th_deg": "deg"}.get(unit, unit or "1/nm")


def _iso(t) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(t)).astimezone().isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "peak"


_SECRET_WORDS = ("api_key", "apikey", "password", "secret", "token")


def _redact(obj):
    """The configuration with secrets (API keys, passwords, tokens) replaced by '***'."""
    if isinstance(obj, dict):
        return {k: ("***" if v and any(w in str(k).lower() for w in _SECRET_WORDS) else _redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def _plain(obj):
    """Tiled metadata (DictView/ListView) to plain dicts and lists."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListView":
        return [_plain(v) for v in obj]
    return obj


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;color:#222;padding:0 1em}
h1{margin-bottom:0.2em}h2{border-bottom:1px solid #ccc;padding-bottom:0.2em;margin-top:1.6em}
.muted{color:#777;font-size:0.9em}code{background:#f3f3f3;padding:0 0.3em}
table{border-collapse:collapse;font-size:0.9em;margin:0.5em 0}
table.grid td,table.grid th{border:1px solid #ddd;padding:3px 7px;text-align:right}
table.kv th{text-align:left;padding:2px 12px 2px 0;font-weight:600;color:#444;vertical-align:top}
table.kv td{padding:2px 0}figure{margin:0.8em 0;page-break-inside:avoid}
figure img{max-width:100%}figure.traj{display:inline-block;width:49%;vertical-align:top;margin:0}
figcaption{font-size:0.85em;color:#555}pre{background:#f6f6f6;padding:0.6em;font-size:0.8em;white-space:pre-wrap}
p.warn,p.note,p.ok{padding:0.5em 0.8em;border-left:4px solid}p.warn{background:#fdecea;border-color:#c62828}
p.note{background:#fff8e1;border-color:#f9a825}p.ok{background:#e8f5e9;border-color:#2e7d32}"""
