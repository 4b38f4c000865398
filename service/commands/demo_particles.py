"""`scatterflow demo --experiment particles`: GISAXS of spheres growing on silicon, their radius
and spacing inverted live by the service, frame by frame.

A bluesky RunEngine counts a simulated detector (``service.sim.devices.ParticleDetector``:
128 x 128 frames of spheres on a radial paracrystal on Si at 12.4 keV, incidence 3.5 mrad,
rendered in the distorted-wave Born approximation by BornAgain, service/sim/gisaxs_particles.py;
radius 3.5 -> 6 nm over the run, 10 % polydispersity, 20 nm spacing, Poisson noise) and publishes
through bluesky's 0MQ proxy. Its start document asks for the structural inversion on the
substrate (``scatterflow: {modality: gisaxs, inversion: {enabled: true, substrate: {delta, beta}}}``):
the service remaps each frame to its (q_xy, q_z) map and fits the DWBA model there. Printed: the
radius and the spacing per frame against the simulator's truth, with their errors and the fit's
verdict; a plot of both against time. Needs BornAgain (``pip install bornagain``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .demo_display import floats
from .loopback import publishing_run_engine, serve_until_interrupted, start_demo_service
from .waiting import wait_finished

RADIUS = (3.5, 6.0)          # nm, first and last frame
CRITICAL_ANGLE = 2.5e-3      # rad, Si at 12.4 keV: sqrt(2 delta)


def run_particles(args) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 120)
    try:
        import bornagain  # noqa: F401
    except ImportError:
        console.print("[red]scatterflow demo --experiment particles needs BornAgain to render the frames: "
                      "pip install bornagain[/]")
        return 2
    from bluesky.plans import count

    from ..sim.devices import ParticleDetector
    from ..sim.frames import poni_dict
    from ..sim.gisaxs_particles import SI_12KEV, GisaxsParticleSimulator, particle_geometry

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.frames
    sim = GisaxsParticleSimulator(particle_geometry(shape=(128, 128), pixel=2.8e-4), SI_12KEV, radius=RADIUS,
                                  duration=float(max(n - 1, 1)), peak_counts=2e4, background=1e-3, seed=4)
    det = ParticleDetector(name="det", simulator=sim, frame_interval=1.0)
    service, in_port = start_demo_service(console, args, workdir, "scatterflow demo --experiment particles",
                                          fit={"peaks": []}, phases={"enabled": False})
    md = {"sample": "spheres growing on Si (simulated, BornAgain DWBA)", "modality": "GISAXS",
          "geometry": poni_dict(sim.grazing.geometry.to_pyfai()),
          "scatterflow": {"modality": "gisaxs", "incident_angle": sim.grazing.incident_angle,
                          "critical_angle": CRITICAL_ANGLE,
                          "reduction": {"rod_q_xy_band": [0.2, 0.4], "qmap_npt": [64, 64]},
                          "inversion": {"enabled": True,
                                        "substrate": {"delta": SI_12KEV[0], "beta": SI_12KEV[1]}}}}
    RE, publisher, uids = publishing_run_engine(in_port)
    delay = 1.0 / args.rate if args.rate > 0 else 0.0
    t0 = time.monotonic()
    try:
        console.print(f"{n} frames of {sim.shape[1]} x {sim.shape[0]} px, radius {RADIUS[0]} -> {RADIUS[1]} nm ...")
        RE(count([det], num=n, delay=delay, md=md))
        publisher.close()
        run = wait_finished(service, uids[-1], timeout=120 + 2.0 * n)
        elapsed = time.monotonic() - t0
        got = service.store.inversion_since(uids[-1])
        if run is None or got is None or not got[0].get("seq_num"):
            console.print(f"[red]no inversion rows for run {uids[-1][:8]}[/] "
                          f"(status {None if run is None else run.status})")
            return 1
        cols = got[0]
        seq = np.asarray(cols["seq_num"], np.int64)
        truth = sim.truth(seq - 1.0)                  # frame seq_num k was taken at t = k - 1 s
        table = Table(title=f"run {uids[-1][:8]}: live GISAXS inversion (DWBA) vs simulator truth")
        for c in ("frame", "radius nm", "truth", "distance nm", "truth", "chi2_red", "verdict"):
            table.add_column(c, justify="right")
        rad, rad_e = floats(cols["radius"]), floats(cols["radius_err"])
        dist, dist_e = floats(cols["distance"]), floats(cols["distance_err"])
        for i in range(len(seq)):
            table.add_row(str(seq[i]), f"{rad[i]:.3f} ± {rad_e[i]:.3f}", f"{truth['radius'][i]:.3f}",
                          f"{dist[i]:.3f} ± {dist_e[i]:.3f}", f"{truth['distance'][i]:.3f}",
                          f"{floats(cols['chi2'])[i]:.2f}", str(cols["fit_quality"][i]))
        console.print(table)
        pulls = (rad - truth["radius"]) / rad_e
        console.print(f"radius: median |error| {np.nanmedian(np.abs(rad / truth['radius'] - 1)) * 100:.2f} %, "
                      f"pull std {np.nanstd(pulls):.2f}; distance: median |error| "
                      f"{np.nanmedian(np.abs(dist / truth['distance'] - 1)) * 100:.2f} %; "
                      f"{len(seq)} frames in {elapsed:.1f} s")
        console.print(f"plot: {_plot(seq - 1.0, rad, rad_e, dist, dist_e, truth, workdir / f'particles-{uids[-1][:8]}.png')}")
        if not args.exit:
            serve_until_interrupted(console, service)
        return 0
    finally:
        service.close()


def _plot(t, rad, rad_e, dist, dist_e, truth, path: Path) -> Path:
    """Radius and spacing (nm, ±1 sigma) against time (s), with the simulator's truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for ax, v, e, key, label in ((axes[0], rad, rad_e, "radius", "radius (nm)"),
                                 (axes[1], dist, dist_e, "distance", "centre-to-centre distance (nm)")):
        ax.errorbar(t, v, yerr=e, fmt="o", ms=3, label="inverted live (DWBA)")
        ax.plot(t, truth[key], "k-", lw=1, label="simulator truth")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
