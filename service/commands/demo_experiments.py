"""`scatterflow demo --experiment saxs+waxs|gisaxs|giwaxs`: the other simulated experiments,
through the whole service as the default demo (0MQ proxy, ingest, workers, embedded Tiled, REST).

* ``saxs+waxs``: two Pilatus 300k look at the film in one run, at 0.6 m (SAXS: the lamellar
  peak) and 0.12 m (WAXS: π-π peak and amorphous halo). The start document names both with
  their geometry, modality and peaks (service/detectors.py), so each detector gets its own
  analysis ``<uid>.saxs_image`` and ``<uid>.waxs_image``.
* ``gisaxs``: a Pilatus 300k at 0.5 m, incidence 3.5 mrad (service/sim/grazing.py); the lamellar
  Bragg rod is fitted on the Yoneda cut I(q_xy); vertical cut along the rod, q-maps.
* ``giwaxs``: a 300k-pixel detector at 0.15 m; π-π peak and halo fitted on the out-of-plane
  wedge I(q), χ-balanced so that the face-on π-π arc keeps its radial shape as the missing
  wedge opens with q (workers.grazing.build_wedge_profiles); in-plane wedge, Hermans
  orientation of the π-π ring, q-maps. The fitted π-π area is the arc's in that wedge, about
  ten times the simulator's truth (the ring's powder-averaged area): compare centres.

Each prints the fitted against the true peak centres per detector, as the default demo does,
and writes trajectory plots (and q-map plots) under the work directory.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .demo_display import RunProgress, floats, plot_trajectories, print_summary, summarize
from .loopback import publishing_run_engine, serve_until_interrupted, start_demo_service
from .waiting import wait_finished

log = logging.getLogger(__name__)


def _peak(name, center, fwhm, lo, hi, wlo, whi) -> dict:
    return {"name": name, "shape": "pseudo_voigt", "center": center, "fwhm": fwhm, "center_min": lo,
            "center_max": hi, "fwhm_min": wlo, "fwhm_max": whi}


LAMELLAR = _peak("lamellar", 3.2, 0.2, 2.7, 3.6, 0.03, 1.0)
HALO = _peak("halo", 14.0, 5.0, 12.0, 16.0, 2.0, 9.0)
PI_PI = _peak("pi_pi", 17.5, 1.0, 16.5, 18.5, 0.2, 3.0)
POWER_LAW = {"kind": "power_law"}


@dataclass
class Experiment:
    """A simulated beamline for one experiment: detectors (the first drives the clock), the light,
    start-document additions, {analysis key suffix: (label, truth prefix)} and settings overrides."""
    detectors: list
    light: object
    md: dict
    analyses: dict
    settings: dict = field(default_factory=dict)


def build_experiment(name: str, *, seed: int = 1, workdir: Path | None = None) -> Experiment:
    """The ophyd devices and metadata of experiment ``name`` ("saxs+waxs", "gisaxs", "giwaxs")."""
    from service.sim.azopolymer import AzoCycle
    from service.sim.devices import LightSource, OperandoDetector, SimClock

    cycle = AzoCycle()
    cycle.restart("dark", 0.0)
    if name == "saxs+waxs":
        return _two_detectors(cycle, seed, workdir)
    if name not in ("gisaxs", "giwaxs"):
        raise ValueError(f"experiment must be 'saxs+waxs', 'gisaxs' or 'giwaxs', got {name!r}")
    from service.sim.grazing import CRITICAL_ANGLE, INCIDENT_ANGLE, GrazingFrameSimulator

    sim = GrazingFrameSimulator(cycle=cycle, mode=name, seed=seed)
    det = OperandoDetector(name="det", simulator=sim, clock=SimClock(), frame_interval=1.0)
    light = LightSource(name="light", cycle=cycle, clock=det.clock)
    if name == "gisaxs":      # the +q_xy rod on the Yoneda cut
        hints = {"critical_angle": CRITICAL_ANGLE, "reduction": {"npt": 400, "radial_range": [-5.0, 5.0]},
                 "fit": {"q_range": [2.2, 4.4], "background": POWER_LAW, "peaks": [LAMELLAR]}}
    else:                     # face-on π-π stacking: out of plane; edge-on lamellae: in plane
        hints = {"reduction": {"npt": 300, "radial_range": [8.0, 22.0]},
                 "fit": {"q_range": [10.5, 20.5], "background": POWER_LAW, "peaks": [HALO, PI_PI]}}
    md = {"modality": name.upper(), "sample": "azopolymer film (simulated), grazing incidence",
          "scatterflow": {"modality": name, "incident_angle": INCIDENT_ANGLE, **hints}}
    return Experiment([det], light, md, {"": (f"{name.upper()} detector", "det")})


def _two_detectors(cycle, seed: int, workdir: Path | None) -> Experiment:
    """SAXS at 0.6 m and WAXS at 0.12 m in one run, each with its own clock (same frame interval)."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    from service.sim.devices import LightSource, OperandoDetector, SimClock
    from service.sim.frames import SAXS_GEOMETRY, WAXS_GEOMETRY, FrameSimulator, poni_dict

    sims = {"saxs": FrameSimulator(AzimuthalIntegrator(**SAXS_GEOMETRY), cycle, seed=seed),
            "waxs": FrameSimulator(AzimuthalIntegrator(**WAXS_GEOMETRY), cycle, seed=seed + 1)}
    dets = [OperandoDetector(name=n, simulator=s, clock=SimClock(), frame_interval=1.0) for n, s in sims.items()]
    light = LightSource(name="light", cycle=cycle, clock=dets[0].clock)
    entries = {
        "saxs_image": {"geometry": poni_dict(sims["saxs"].ai), "modality": "saxs",
                       "reduction": {"radial_range": [0.5, 4.6]},
                       "fit": {"q_range": [2.2, 4.2], "background": POWER_LAW, "peaks": [LAMELLAR]}},
        "waxs_image": {"geometry": poni_dict(sims["waxs"].ai), "modality": "waxs",
                       "reduction": {"radial_range": [3.0, 21.0]},
                       "fit": {"q_range": [8.0, 20.5], "background": POWER_LAW, "peaks": [HALO, PI_PI]}}}
    settings = {}
    if workdir is not None and np.array_equal(sims["saxs"].mask, sims["waxs"].mask):
        path = workdir / "mask-300k.npy"     # same detector, same beam position: one mask for both
        np.save(path, sims["saxs"].mask)
        settings["geometry"] = {"mask": str(path)}
    md = {"modality": "SAXS+WAXS", "scatterflow": entries}
    analyses = {".saxs_image": ("SAXS detector (0.6 m)", "saxs"), ".waxs_image": ("WAXS detector (0.12 m)", "waxs")}
    return Experiment(dets, light, md, analyses, settings)


class _Keys:
    """The progress bar's view of the run uids: the first analysis key of the latest run."""

    def __init__(self, uids: list, suffix: str):
        self.uids, self.suffix = uids, suffix

    def __bool__(self) -> bool:
        return bool(self.uids)

    def __getitem__(self, i):
        return self.uids[i] + self.suffix


def run_experiment(args) -> int:
    from rich.console import Console

    from ..sim import operando_cycle

    console = Console(width=None if Console().is_terminal else 120)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(args.experiment, workdir=workdir)
    service, in_port = start_demo_service(
        console, args, workdir, f"scatterflow demo --experiment {args.experiment}",
        reduction={"snapshot_every": 10},
        phases={"enabled": False},      # phase signatures need the three peaks in one fit: not here
        **exp.settings)
    RE, publisher, uids = publishing_run_engine(in_port)
    delay = 1.0 / args.rate if args.rate > 0 else 0.0
    first, *others = exp.detectors
    t0 = time.monotonic()
    try:
        with RunProgress(console, service, args.frames, _Keys(uids, next(iter(exp.analyses)))):
            RE(operando_cycle(first, exp.light, n_frames=args.frames, delay=delay, md=exp.md, extra_detectors=others))
            publisher.close()
            for suffix in exp.analyses:
                wait_finished(service, uids[-1] + suffix, timeout=180)
        elapsed = time.monotonic() - t0
        for suffix, (label, prefix) in exp.analyses.items():
            _report_analysis(console, service, uids[-1] + suffix, label, prefix, elapsed, workdir)
        if not args.exit:
            serve_until_interrupted(console, service)
        return 0
    finally:
        service.close()


def _report_analysis(console, service, key: str, label: str, prefix: str, elapsed: float, workdir: Path) -> None:
    """Fitted vs true centres of one detector's analysis, its extras, plots and Tiled report."""
    run = service.store.get(key)
    if run is None:
        console.print(f"[red]{label}: no analysis {key}[/]")
        return
    console.print(f"\n[bold]{label}[/]: analysis {key} ({run.info.get('modality')}, profile unit {run.unit})")
    print_summary(console, service, key, summarize(service, key, prefix), elapsed)
    _print_extras(console, service, key, workdir)
    name = key[:8] + (f"-{key.split('.', 1)[1]}" if "." in key else "")
    if not run.frames_final:
        console.print(f"[red]{label}: no fitted frames[/] (failed: {dict(run.failed)})")
        return
    console.print(f"trajectory plot: {plot_trajectories(service, key, workdir / f'trajectories-{name}.png', prefix)}")
    if service.tiled_uri:
        from ..report import write_report_for
        try:
            report = write_report_for(service.tiled_uri, service.tiled_api_key, key, workdir / f"report-{name}")
            console.print(f"run report (from Tiled): {report}")
        except Exception as exc:          # the demo's summary stands without it
            log.error("report of %s failed: %s", key, exc)


def _print_extras(console, service, key: str, workdir: Path) -> None:
    """q-map (missing-wedge share, plot), extra profiles and scalar series of a grazing run."""
    from ..render import render_qmap_png
    extras = service.store.extras(key) or {}
    qmap = service.store.latest_qmap(key)
    if qmap is not None:
        seq, q_xy, q_z, image = qmap
        path = workdir / f"qmap-{key[:8]}.png"
        path.write_bytes(render_qmap_png(q_xy, q_z, image, size=640))
        console.print(f"q-map of frame {seq}: {image.shape[1]} x {image.shape[0]} (q_xy {q_xy[0]:.2f}..{q_xy[-1]:.2f}, "
                      f"q_z {q_z[0]:.2f}..{q_z[-1]:.2f} 1/nm), {100 * np.isnan(image).mean():.1f} % of bins empty "
                      f"(missing wedge, no pixel); plot {path}")
    if extras.get("profiles"):
        console.print("extra profiles: " + ", ".join(f"{n} ({p['unit']}, {len(p['radial'])} bins)"
                                                     for n, p in extras["profiles"].items()))
    for name, col in (extras.get("scalars") or {}).items():
        v = floats(col["value"])
        if v.size:
            console.print(f"{name}: frame {col['seq_num'][0]} {v[0]:.3f}, frame {col['seq_num'][-1]} {v[-1]:.3f} "
                          f"(min {np.nanmin(v):.3f}, max {np.nanmax(v):.3f})")
