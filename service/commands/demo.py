"""`scatterflow demo`: a simulated operando experiment through the whole service.

Starts bluesky's 0MQ proxy, the service (workers, embedded Tiled, REST API, results stream) and
a RunEngine driving the simulated azopolymer beamline (service/sim) that publishes through the
proxy; shows progress; prints the fitted trajectories against the simulator's truth; writes a
plot; keeps the API up until Ctrl-C unless --exit.
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a simulated operando experiment through the whole service",
                       description=__doc__)
    p.add_argument("--frames", type=int, default=90, help="frames to acquire (default 90: 1 s each, one UV/visible cycle)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per real second the beamline publishes (default 10)")
    p.add_argument("--workdir", default="var/demo", help="where Tiled data, the PONI file and plots go")
    p.add_argument("--port", type=int, default=8000, help="REST API port (a free one if taken)")
    p.add_argument("--config", help="YAML configuration overriding the demo defaults")
    p.add_argument("--exit", action="store_true", help="exit after the summary instead of serving the API")
    p.add_argument("--experiment", choices=("saxs", "saxs+waxs", "gisaxs", "giwaxs"), default="saxs",
                   help="saxs (default): one transmission detector; saxs+waxs: two detectors in one run; "
                        "gisaxs, giwaxs: grazing incidence (service/commands/demo_experiments.py)")
    p.set_defaults(func=run)


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def start_proxy() -> tuple[int, int]:
    """bluesky's own 0MQ Proxy on two free ports, in a daemon thread."""
    from bluesky.callbacks.zmq import Proxy
    in_port, out_port = free_port(), free_port()
    proxy = Proxy(in_port, out_port)
    threading.Thread(target=proxy.start, name="0mq-proxy", daemon=True).start()
    return in_port, out_port


def run(args) -> int:
    if getattr(args, "experiment", "saxs") != "saxs":
        from .demo_experiments import run_experiment
        return run_experiment(args)
    import msgpack
    import msgpack_numpy
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher
    from rich.console import Console

    from ..config import load_settings
    from ..server import Service
    from ..sim import make_beamline, operando_cycle, write_default_poni

    console = Console(width=None if Console().is_terminal else 120)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    poni = write_default_poni(workdir / "pilatus300k.poni")
    det, light = make_beamline(frame_interval=1.0, flux=1.0, exposure=1.0, seed=1)
    mask_path = workdir / "mask.npy"
    np.save(mask_path, det.simulator.mask)

    in_port, out_port = start_proxy()
    settings = load_settings(args.config, **{
        "ingest": {"address": f"tcp://127.0.0.1:{out_port}"},
        "geometry": {"poni": poni, "mask": str(mask_path)},
        "tiled": {"directory": str(workdir / "tiled")},
        "api": {"port": free_port(args.port)},
        "results": {"address": f"tcp://127.0.0.1:{free_port()}"},
    })
    console.print(f"[bold]scatterflow demo[/]: proxy in {in_port} -> out {out_port}; starting service ...")
    service = Service(settings).start()
    api = f"http://127.0.0.1:{service.api_port}"
    console.print(f"REST {api}/api/v1  dashboard {api}/  metrics {api}/metrics  Tiled {service.tiled_uri}")
    time.sleep(1.0)                                         # 0MQ slow joiner: let the SUB connect

    RE = RunEngine({})
    publisher = Publisher(f"127.0.0.1:{in_port}",
                          serializer=functools.partial(msgpack.packb, default=msgpack_numpy.encode))
    RE.subscribe(publisher)
    uids: list[str] = []
    RE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
    delay = 1.0 / args.rate if args.rate > 0 else 0.0
    t0 = time.monotonic()
    with _progress(console, service, args.frames, uids):
        RE(operando_cycle(det, light, n_frames=args.frames, delay=delay))
        publisher.close()              # flushed to the proxy, which stays up: closing cannot hang
        _wait_finished(service, uids[-1], timeout=120)
    elapsed = time.monotonic() - t0
    run_uid = uids[-1]
    summary = summarize(service, run_uid)
    _print_summary(console, service, run_uid, summary, elapsed)
    _print_phases(console, service, run_uid, det.simulator.cycle)
    plot = plot_trajectories(service, run_uid, workdir / f"trajectories-{run_uid[:8]}.png")
    console.print(f"trajectory plot: {plot}")
    if service.tiled_uri:
        from ..report import write_report_for
        report = write_report_for(service.tiled_uri, service.tiled_api_key, run_uid, workdir / f"report-{run_uid[:8]}")
        console.print(f"run report (from Tiled): {report}")
    if args.exit:
        service.close()
        return 0
    console.print(f"serving {api} until Ctrl-C")
    try:
        while True:
            time.sleep(1)
    finally:
        service.close()


class _progress:
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
        t0, last = time.monotonic(), 0
        while not self._stop.wait(0.25):
            run = self.service.store.get(self.uids[-1]) if self.uids else None
            if run is None:
                continue
            rate = run.frames_fitted / max(time.monotonic() - t0, 1e-9)
            p50 = _latency_quantile(self.service.metrics, "provisional", 0.5)
            self.progress.update(self.fitted, completed=run.frames_fitted,
                                 info=f"{rate:5.1f} frames/s, latency p50 {p50 * 1e3:5.0f} ms")
            self.progress.update(self.final, completed=run.frames_final, info=f"status {run.status}")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.progress.stop()


def _latency_quantile(metrics, stage: str, q: float) -> float:
    """Quantile from the Prometheus histogram buckets (upper bound of the bucket)."""
    samples = [(s.labels.get("le"), s.value) for m in metrics.latency.collect() for s in m.samples
               if s.name.endswith("_bucket") and s.labels.get("stage") == stage]
    if not samples or samples[-1][1] == 0:
        return float("nan")
    total = samples[-1][1]
    for le, count in samples:
        if count >= q * total:
            return float(le)
    return float("inf")


def _wait_finished(service, uid: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = service.store.get(uid)
        if run is not None and run.status != "running":
            return
        time.sleep(0.1)
    log.warning("run %s still running after %.0f s", uid[:8], timeout)


def summarize(service, uid: str, truth_prefix: str = "det") -> dict:
    """Final fitted centres against the simulator's truth (carried in the events), per peak."""
    run = service.store.get(uid)
    cols, _ = service.store.peaks_since(uid, 0, final=True)
    out = {}
    for peak in sorted(set(cols["peak"])):
        idx = [i for i, p in enumerate(cols["peak"]) if p == peak]
        seq = np.array([cols["seq_num"][i] for i in idx])
        center = np.array([cols["center"][i] for i in idx])
        err = np.array([cols["center_err"][i] for i in idx])
        truth = np.array([run.scalars.get(int(s), {}).get(f"{truth_prefix}_{peak}_center_truth", np.nan) for s in seq])
        ok = np.isfinite(truth) & np.isfinite(center)
        d = center[ok] - truth[ok]
        out[peak] = {"frames": len(idx), "rmse": float(np.sqrt(np.mean(d ** 2))) if ok.any() else float("nan"),
                     "median_err": float(np.median(err[ok])) if ok.any() else float("nan"),
                     "within_2sigma": float(np.mean(np.abs(d) <= 2 * err[ok])) if ok.any() else float("nan"),
                     "change_points": int(sum(cols["change_point"][i] for i in idx)),
                     "truth_range": (float(np.nanmin(truth)), float(np.nanmax(truth))) if ok.any() else (np.nan, np.nan)}
    return out


def _print_summary(console, service, uid, summary, elapsed) -> None:
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
                  f"end to end; latency p50 {_latency_quantile(service.metrics, 'provisional', 0.5) * 1e3:.0f} ms "
                  f"p99 {_latency_quantile(service.metrics, 'provisional', 0.99) * 1e3:.0f} ms (bucket bounds); "
                  f"devices {st['devices']}")


def phase_truth(cycle, run, seqs) -> tuple[dict[int, str], list[tuple[str, str, float]], float]:
    """The simulator's phase per frame and its phase changes (from, to, t s since the run's
    first frame, found on a 10 ms grid), with the frames' times from the events' time_offset."""
    offsets = {int(s): run.scalars.get(int(s), {}).get("det_time_offset", np.nan) for s in seqs}
    labels = {s: str(cycle.truth(float(t))["phase"]) for s, t in offsets.items() if np.isfinite(t)}
    t_first = min(offsets.values()) if offsets else 0.0
    grid = np.arange(t_first, max(offsets.values()) + 1e-9, 0.01) if offsets else np.zeros(0)
    phase = cycle.truth(grid)["phase"] if len(grid) else np.zeros(0, str)
    changes = [(str(phase[i - 1]), str(phase[i]), float(grid[i] - t_first))
               for i in range(1, len(grid)) if phase[i] != phase[i - 1]]
    return labels, changes, t_first


def _print_phases(console, service, uid: str, cycle) -> None:
    """Phase labels and transitions against the simulator's truth."""
    from rich.table import Table
    got = service.store.phases_since(uid, 0, final=True)
    run = service.store.get(uid)
    if got is None or not got[0]["seq_num"]:
        console.print("phases: none (phase identification off, or the fit lacks the phases' peaks)")
        return
    cols, _, transitions = got
    truth, changes, _ = phase_truth(cycle, run, cols["seq_num"])
    right = [cols["phase"][i] == truth.get(int(s)) for i, s in enumerate(cols["seq_num"])]
    console.print(f"phases: {sum(right)} of {len(right)} final frames labelled as the simulator's truth "
                  f"({100 * np.mean(right):.0f} %)")
    # event times (epoch) -> the simulator's clock (s since the first frame), frame by frame
    pairs = sorted({(float(t), run.scalars.get(int(s), {}).get("det_time_offset", np.nan))
                    for s, t in zip(cols["seq_num"], cols["time"]) if t is not None})
    epoch = np.array([p[0] for p in pairs])
    sim = np.array([p[1] for p in pairs]) - np.nanmin([p[1] for p in pairs])
    step = float(np.median(np.diff(sim))) if len(sim) > 1 else 1.0
    slope = float(np.median(np.diff(sim) / np.diff(epoch))) if len(sim) > 1 else 1.0
    table = Table(title=f"run {uid[:8]}: phase transitions, found vs simulator truth (t from the first frame)")
    for col in ("transition", "found t (s)", "± σ (s)", "frame", "change point", "truth t (s)", "error (frames)"):
        table.add_column(col, justify="right")
    unmatched = list(changes)
    for t in transitions:
        found = float(np.interp(t["time"], epoch, sim)) if t["time"] is not None else float("nan")
        sigma = (t["time_sigma"] or float("nan")) * slope
        match = next((c for c in unmatched if c[0] == t["from"] and c[1] == t["to"]), None)
        if match is not None:
            unmatched.remove(match)
        table.add_row(f"{t['from']} -> {t['to']}", f"{found:.2f}", f"{sigma:.2f}", str(t["seq_num"]),
                      "yes" if t["change_point"] else "no", f"{match[2]:.2f}" if match else "-",
                      f"{(found - match[2]) / step:+.2f}" if match else "-")
    for c in unmatched:
        table.add_row(f"{c[0]} -> {c[1]}", "missed", "", "", "", f"{c[2]:.2f}", "")
    console.print(table)


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
            v = np.array([cols[key][k] for k in idx])
            e = np.array([cols[f"{key}_err"][k] for k in idx])
            ax = axes[i, j]
            ax.plot(seq, v, "-", color="C0", label="fit (final)")
            ax.fill_between(seq, v - e, v + e, color="C0", alpha=0.3)
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
