"""`scatterflow demo`: a simulated operando experiment through the whole service.

Starts bluesky's 0MQ proxy, the service (workers, embedded Tiled, REST API, results stream) and
a RunEngine driving the simulated azopolymer beamline (service/sim) that publishes through the
proxy; shows progress; prints the fitted trajectories against the simulator's truth; writes a
plot; keeps the API up until Ctrl-C unless --exit.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .demo_display import RunProgress, plot_trajectories, print_summary, summarize
from .loopback import publishing_run_engine, serve_until_interrupted, start_demo_service
from .waiting import wait_finished


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a simulated operando experiment through the whole service",
                       description=__doc__)
    p.add_argument("--frames", type=int, default=90, help="frames to acquire (default 90: 1 s each, one UV/visible cycle)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per real second the beamline publishes (default 10)")
    p.add_argument("--workdir", default="var/demo", help="where Tiled data, the PONI file and plots go")
    p.add_argument("--port", type=int, default=8000, help="REST API port (a free one if taken)")
    p.add_argument("--tiled-port", type=int, default=0, help="embedded Tiled's port (default: a free one)")
    p.add_argument("--config", help="YAML configuration overriding the demo defaults")
    p.add_argument("--exit", action="store_true", help="exit after the summary instead of serving the API")
    p.add_argument("--experiment", choices=("saxs", "saxs+waxs", "gisaxs", "giwaxs", "particles"), default="saxs",
                   help="saxs (default): one transmission detector; saxs+waxs: two detectors in one run; "
                        "gisaxs, giwaxs: grazing incidence (service/commands/demo_experiments.py); particles: "
                        "GISAXS of growing spheres on Si, inverted live (service/commands/demo_particles.py)")
    p.set_defaults(func=run)


def run(args) -> int:
    if getattr(args, "experiment", "saxs") == "particles":
        from .demo_particles import run_particles
        return run_particles(args)
    if getattr(args, "experiment", "saxs") != "saxs":
        from .demo_experiments import run_experiment
        return run_experiment(args)
    from rich.console import Console

    from ..sim import make_beamline, operando_cycle, write_default_poni

    console = Console(width=None if Console().is_terminal else 120)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    poni = write_default_poni(workdir / "pilatus300k.poni")
    det, light = make_beamline(frame_interval=1.0, flux=1.0, exposure=1.0, seed=1)
    mask_path = workdir / "mask.npy"
    np.save(mask_path, det.simulator.mask)

    service, in_port = start_demo_service(console, args, workdir, "scatterflow demo",
                                          geometry={"poni": poni, "mask": str(mask_path)})
    RE, publisher, uids = publishing_run_engine(in_port)
    delay = 1.0 / args.rate if args.rate > 0 else 0.0
    t0 = time.monotonic()
    with RunProgress(console, service, args.frames, uids):
        RE(operando_cycle(det, light, n_frames=args.frames, delay=delay))
        publisher.close()              # flushed to the proxy, which stays up: closing cannot hang
        wait_finished(service, uids[-1], timeout=120)
    elapsed = time.monotonic() - t0
    run_uid = uids[-1]
    summary = summarize(service, run_uid)
    print_summary(console, service, run_uid, summary, elapsed)
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
    try:
        serve_until_interrupted(console, service)
    finally:
        service.close()


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
