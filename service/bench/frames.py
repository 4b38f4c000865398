"""Benchmark detectors: pyFAI geometries of real detectors and pools of simulated frames on them."""
from __future__ import annotations

import numpy as np

DETECTORS = {   # name: (distance m) chosen so that q spans ~1.5-20 1/nm at 1 Å
    "Pilatus300k": 0.20, "Eiger1M": 0.16, "Eiger4M": 0.33,
}


def bench_geometry(detector: str):
    """pyFAI AzimuthalIntegrator with the beam at the detector centre."""
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    det = detector_factory(detector)
    rows, cols = det.shape
    return AzimuthalIntegrator(dist=DETECTORS[detector], poni1=rows / 2 * det.pixel1, poni2=cols / 2 * det.pixel2,
                               rot1=0.002, rot2=-0.001, detector=det, wavelength=1e-10)


def frame_pool(ai, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n simulated frames along the azopolymer cycle (rows, cols int32) and the mask."""
    from ..sim import AzoCycle, FrameSimulator
    sim = FrameSimulator(ai, AzoCycle(), seed=seed, noise="normal")
    times = np.linspace(0, 60, n)
    return np.stack([sim.frame(float(t)) for t in times]), sim.mask

