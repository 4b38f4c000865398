"""Benchmark: unattended calibration from a 25 % distance error, scatterflow vs pyFAI's own.

Frames: pyFAI's ``Calibrant.fake_calibration_image`` for a known tilted geometry, ring
intensities falling with q, a background (parasitic scatter near the beam, an amorphous halo, a
flat floor), Poisson noise, detector gaps set to -1 and a beamstop (disc plus arm) masked.
Start: distance 25 % short or long, beam centre off by (4, -3) px, no tilt.

* ours: ``workers.calibrate.calibrate`` (global distance search, then control points and
  least squares);
* pyFAI: ``goniometer.SingleGeometry`` from the same start (its massif ring extraction,
  ``extract_cp``, then ``GeometryRefinement.refine3``, wavelength and rot3 fixed), three rounds,
  as pyFAI's recalibration does;

both measured in the same run. Errors against the truth: beam centre (pyFAI ``getFit2D``, px),
direct-beam distance and PONI ``dist`` (%). Verdict: ``ok`` = centre <= 0.01 px and both
distances <= 0.05 % (the goal); ``near`` = centre < 1 px and distances < 1 %; else ``FAIL``.
Then the capture range: distance errors from -50 % to +100 % on two cases, both methods, and
ours with a wider search span (0.25-4 x the guess) beyond that.

    python benchmarks/bench_calibrate.py [--quick] [--threads N]

The full run takes about 25 min on 2 shared cores (--quick: about 7 min).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time

import numpy as np
import pyFAI
import torch
from pyFAI.calibrant import get_calibrant
from pyFAI.goniometer import SingleGeometry
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from workers.calibrate import calibrate

# calibrant: (wavelength m, FWHM deg, first ring at this fraction of the detector half-size)
CALIBRANTS = {"AgBh": (1.0e-10, 0.01, 0.2), "LaB6": (0.8e-10, 0.05, 0.35),
              "CeO2": (0.7e-10, 0.05, 0.35), "Si": (0.8e-10, 0.05, 0.35)}
DETECTORS = ["Pilatus1M", "Eiger2_4M", "RayonixSx85hs"]
CENTRE_OFFSET = (4.0, -3.0)


def case(calibrant: str, detector: str) -> dict:
    """Geometry: the distance that puts the first ring at the calibrant's fraction of the
    detector half-size, beam near the middle, tilts of 1-2 degrees."""
    wl, fwhm, frac = CALIBRANTS[calibrant]
    det = pyFAI.detector_factory(detector)
    half = 0.5 * min(det.shape[0] * det.pixel1, det.shape[1] * det.pixel2)
    tth1 = 2 * math.asin(wl * 1e10 / (2 * get_calibrant(calibrant).dspacing[0]))
    return dict(calibrant=calibrant, detector=detector, wavelength=wl, fwhm=fwhm,
                dist=round(frac * half / math.tan(tth1), 3),
                centre=(0.47 * det.shape[0] + 0.3, 0.53 * det.shape[1] + 0.7),
                rot1=0.03 if calibrant != "AgBh" else 0.02, rot2=-0.02 if calibrant != "AgBh" else -0.015)


def integrator(detector, wavelength, dist, centre, rot1=0.0, rot2=0.0) -> AzimuthalIntegrator:
    """pyFAI integrator, direct-beam distance ``dist`` (m), beam at ``centre`` (row, col px)."""
    ai = AzimuthalIntegrator(detector=pyFAI.detector_factory(detector), wavelength=wavelength)
    ai.setFit2D(dist * 1e3, centerX=centre[1] + 0.5, centerY=centre[0] + 0.5)
    ai.rot1, ai.rot2 = rot1, rot2
    return ai


def beam(ai):
    """(row, col) beam centre (px, array indices) and direct-beam distance (m), pyFAI's Fit2D."""
    f = ai.getFit2D()
    return (f["centerY"] - 0.5, f["centerX"] - 0.5), f["directDist"] * 1e-3


def simulate(c: dict, seed: int = 7):
    """(truth integrator, frame int32 with gaps -1, beamstop mask, gap mask)."""
    ai = integrator(c["detector"], c["wavelength"], c["dist"], c["centre"], c["rot1"], c["rot2"])
    cal = get_calibrant(c["calibrant"])
    cal.wavelength = c["wavelength"]
    rings = np.clip(cal.fake_calibration_image(ai, Imax=1.0, Imin=0.0, resolution=c["fwhm"]), 0, None)
    q = ai.qArray()                                        # 1/nm
    q1 = 2 * math.pi / (0.1 * cal.dspacing[0])
    lam = (300.0 * rings * np.exp(-math.log(4) * (q / q.max()) ** 2)
           + 5.0 + 200.0 / (1 + (q / (0.3 * q1)) ** 2) + 40.0 * np.exp(-0.5 * ((q - 15.0) / 4.0) ** 2))
    frame = np.random.default_rng(seed).poisson(lam).astype(np.int32)
    gaps = np.zeros(frame.shape, bool) if ai.detector.mask is None else ai.detector.mask.astype(bool)
    frame[gaps] = -1
    (br, bc), _ = beam(ai)
    rows, cols = np.indices(frame.shape)
    beamstop = (np.hypot(rows - br, cols - bc) < 25) | ((np.abs(rows - br) < 6) & (cols > bc))
    return ai, frame, beamstop, gaps


def errors(ai, truth):
    """(centre px, direct-beam distance %, PONI dist %) of ``ai`` against ``truth``."""
    (r, c), d = beam(ai)
    (r0, c0), d0 = beam(truth)
    return math.hypot(r - r0, c - c0), 100 * (d / d0 - 1), 100 * (ai.dist / truth.dist - 1)


def verdict(err) -> str:
    """ok: the goal (0.01 px, 0.05 %); near: within 1 px and 1 %; else FAIL."""
    if err is None:
        return "FAIL"
    if err[0] <= 0.01 and abs(err[1]) <= 0.05 and abs(err[2]) <= 0.05:
        return "ok"
    return "near" if err[0] < 1 and abs(err[1]) < 1 and abs(err[2]) < 1 else "FAIL"


def run_ours(c, truth, frame, beamstop, guess_dist, guess_centre, span=(0.5, 2.0)):
    """scatterflow from (direct-beam distance m, centre px): (errors or None, wall s, CPU s, note)."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = calibrate(frame, detector=c["detector"], calibrant=c["calibrant"], wavelength=c["wavelength"],
                        distance_guess=guess_dist, mask=beamstop, beam_center_guess=guess_centre,
                        distance_span=span)
        err, note = errors(res.geometry.to_pyfai(), truth), ""
    except ValueError as exc:
        err, note = None, str(exc)[:60]
    return err, time.perf_counter() - t0, time.process_time() - c0, note


def run_pyfai(c, truth, frame, beamstop, gaps, guess_dist, guess_centre):
    """pyFAI's SingleGeometry from the same start, untilted: (errors or None, wall s, CPU s, note)."""
    det = pyFAI.detector_factory(c["detector"])
    det.mask = (gaps | beamstop).astype(np.int8)
    cal = get_calibrant(c["calibrant"])
    cal.wavelength = c["wavelength"]
    start = integrator(c["detector"], c["wavelength"], guess_dist, guess_centre)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        sg = SingleGeometry("calib", image=frame.astype(np.float32), calibrant=cal, detector=det,
                            geometry=start)
        for _ in range(3):
            sg.extract_cp(pts_per_deg=1.0)
            sg.geometry_refinement.refine3(fix=["wavelength", "rot3"])
        err, note = errors(sg.geometry_refinement, truth), ""
        if not all(math.isfinite(e) for e in err):
            err, note = None, "non-finite geometry"
    except Exception as exc:  # noqa: BLE001 - pyFAI raises what it raises; the failure is the result
        err, note = None, f"{type(exc).__name__}: {str(exc)[:50]}"
    return err, time.perf_counter() - t0, time.process_time() - c0, note


HEAD = f"{'centre px':>9s} {'direct %':>9s} {'dist %':>9s} {'wall s':>6s} {'cpu s':>6s}  verdict"


def fmt(err, wall, cpu, note) -> str:
    """Errors (centre px, direct-beam %, PONI dist %), wall and CPU seconds, verdict."""
    if err is None:
        return f"{'-':>9s} {'-':>9s} {'-':>9s} {wall:6.1f} {cpu:6.1f}  FAIL {note}"
    return f"{err[0]:9.4f} {err[1]:+9.4f} {err[2]:+9.4f} {wall:6.1f} {cpu:6.1f}  {verdict(err)}"


def matrix(calibrants, detectors):
    """Both methods from 25 % short and 25 % long, every calibrant on every detector."""
    print(f"{'calibrant':9s} {'detector':14s} {'dist m':>6s} {'start':>5s} | ours: {HEAD} | pyFAI: {HEAD}")
    for cal in calibrants:
        for det in detectors:
            c = case(cal, det)
            truth, frame, beamstop, gaps = simulate(c)
            (br, bc), direct = beam(truth)
            centre = (br + CENTRE_OFFSET[0], bc + CENTRE_OFFSET[1])
            for e in (-0.25, 0.25):
                ours = run_ours(c, truth, frame, beamstop, direct * (1 + e), centre)
                theirs = run_pyfai(c, truth, frame, beamstop, gaps, direct * (1 + e), centre)
                print(f"{cal:9s} {det:14s} {direct:6.3f} {e:+5.0%} | ours: {fmt(*ours)} | pyFAI: {fmt(*theirs)}",
                      flush=True)


def capture(name_pairs, errors_pct, wide_pct):
    """Both methods over the distance errors ``errors_pct`` (%); ours with the span 0.25-4 over
    ``wide_pct``."""
    for cal, det in name_pairs:
        c = case(cal, det)
        truth, frame, beamstop, gaps = simulate(c)
        (br, bc), direct = beam(truth)
        centre = (br + CENTRE_OFFSET[0], bc + CENTRE_OFFSET[1])
        print(f"\ncapture range, {cal} on {det} at {direct:.3f} m (centre guess {CENTRE_OFFSET} px off)")
        print(f"{'start':>6s} | ours: {HEAD} | pyFAI: {HEAD}")
        for e in errors_pct:
            g = direct * (1 + e / 100)
            ours = run_ours(c, truth, frame, beamstop, g, centre)
            theirs = run_pyfai(c, truth, frame, beamstop, gaps, g, centre)
            print(f"{e:+5d}% | ours: {fmt(*ours)} | pyFAI: {fmt(*theirs)}", flush=True)
        for e in wide_pct:
            ours = run_ours(c, truth, frame, beamstop, direct * (1 + e / 100), centre, span=(0.25, 4.0))
            print(f"{e:+5d}% | ours, distance_span (0.25, 4): {fmt(*ours)}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Pilatus1M only, coarser capture scan")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pyFAI").setLevel(logging.CRITICAL)
    print(f"pyFAI {pyFAI.version}, torch {torch.__version__}, {args.threads} torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f}\n")
    matrix(list(CALIBRANTS), DETECTORS[:1] if args.quick else DETECTORS)
    scan = [-50, -25, 25, 50, 100] if args.quick else list(range(-50, 101, 10))
    wide = [-70, 200] if args.quick else [-75, -70, -60, 150, 200, 300]
    capture([("AgBh", "Pilatus1M"), ("LaB6", "Pilatus1M")], scan, wide)


if __name__ == "__main__":
    main()
