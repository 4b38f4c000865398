"""Render realistic 2D detector frames of the azopolymer cycle with pyFAI conventions.

Expected counts of pixel i at time t (pyFAI's correction model run backwards):

    lambda_i = flux * exposure * I(q_i, t) * Omega_i * P_i        (+ dark current)

with q_i the pixel-centre q (pyFAI ``array_from_unit``, 1/nm), Omega_i pyFAI's solid angle
relative to the PONI pixel (``solidAngleArray``, cos³α) and P_i pyFAI's polarization factor
(``polarization(factor=f)``). A pyFAI integration with ``correctSolidAngle=True`` and the same
``polarization_factor`` therefore returns ``flux * exposure * I(q, t)`` (the cycle's 1D model)
within Poisson noise. Counts are Poisson; beamstop pixels (disc + arm) get a flat
``beamstop_counts`` mean (leakage, near zero); module gaps read -1 as Pilatus writes them;
dtype int32.

I(q) is evaluated on a fine 1D grid (``grid_points`` over the detector's q range) and
linearly interpolated to the pixels, which keeps a 300k-pixel frame at a few ms; the
interpolation error is below 1e-4 relative for the default peaks. Exact Poisson sampling
(numpy) costs ~25 ms per 300k-pixel frame on one core; ``noise="normal"`` (rounded
lambda + sqrt(lambda) z, clipped at 0; mean and variance within 1/12 count of Poisson) costs
a few ms, for benchmarks; ``noise="none"`` returns rounded expected counts.
"""

from __future__ import annotations

import enum
import math
import os
from typing import Any, Literal

import numpy as np

from service.sim.azopolymer import AzoCycle, flatten_truth

#: demo geometry: Pilatus 300k at 0.2 m, 1.0 Å, beam near the detector middle, small tilts.
DEFAULT_GEOMETRY: dict[str, Any] = dict(
    dist=0.2, poni1=0.0530, poni2=0.0415, rot1=0.002, rot2=-0.001, rot3=0.0,
    wavelength=1.0e-10, detector="Pilatus300k")
#: SAXS+WAXS demo (two detectors in one run): the same detector at 0.6 m (SAXS, full lamellar
#: ring at 3.2 1/nm, q up to ~4.4 1/nm along the short side) and at 0.12 m (WAXS, full π-π ring
#: at 17.5 1/nm, q up to ~20.7 1/nm along the short side).
SAXS_GEOMETRY: dict[str, Any] = {**DEFAULT_GEOMETRY, "dist": 0.6}
WAXS_GEOMETRY: dict[str, Any] = {**DEFAULT_GEOMETRY, "dist": 0.12}


def default_geometry():
    """The demo geometry as a ``pyFAI.integrator.azimuthal.AzimuthalIntegrator``.

    Pilatus 300k (619 rows x 487 columns, 172 µm, module gaps in ``detector.mask``), 0.2 m,
    λ = 1.0 Å: q from ~1.5 1/nm (beamstop edge) to ~20.6 1/nm (corners).
    """
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    return AzimuthalIntegrator(**DEFAULT_GEOMETRY)


def write_default_poni(path: str | os.PathLike) -> str:
    """Write the demo geometry as a PONI (v2.1) file at ``path`` (overwritten); returns the path."""
    from pyFAI.io.ponifile import PoniFile

    path = os.fspath(path)
    with open(path, "w") as fd:
        PoniFile(default_geometry()).write(fd)
    return path


def as_integrator(geometry):
    """pyFAI AzimuthalIntegrator from an integrator, a PONI path, or an object with ``to_pyfai()``
    (``workers.geometry.Geometry``); ``None`` gives :func:`default_geometry`."""
    if geometry is None:
        return default_geometry()
    if hasattr(geometry, "to_pyfai"):
        return geometry.to_pyfai()
    if isinstance(geometry, (str, os.PathLike)):
        import pyFAI

        if not os.path.exists(geometry):
            raise ValueError(f"PONI file not found: {os.fspath(geometry)!r}")
        return pyFAI.load(os.fspath(geometry))
    if hasattr(geometry, "array_from_unit") and hasattr(geometry, "detector"):
        return geometry
    raise ValueError(f"geometry must be a pyFAI AzimuthalIntegrator, a PONI path or a Geometry, got {geometry!r}")


def poni_dict(ai) -> dict[str, Any]:
    """The geometry as a plain, serialisable PONI dict (pyFAI ``get_config``, enums as ints)."""
    def plain(value):
        if isinstance(value, enum.Enum):
            return plain(value.value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (np.generic,)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    return plain(ai.get_config())


class FrameSimulator:
    """Poisson frames of an :class:`AzoCycle` on a pyFAI geometry.

    ``flux``: counts per unit of I(q) per second on a pixel of relative solid angle 1;
    ``exposure`` s; ``beamstop_radius_m``: disc radius on the detector (m); the arm is a strip
    of width ``beamstop_arm_width_m`` from the beam centre along azimuth ``beamstop_arm_chi``
    (rad, pyFAI χ; π points the arm along -x); ``beamstop_counts``: mean counts of a
    beamstop pixel; ``hot_pixels``: number of pixels (fixed by ``seed``) reading
    ``hot_pixel_counts``. ``scale = flux * exposure`` converts the cycle's 1D model to the
    pyFAI-integrated profile of the frames.
    """

    def __init__(self, geometry=None, cycle: AzoCycle | None = None, *, flux: float = 1.0,
                 exposure: float = 1.0, seed: int | None = 0, beamstop_radius_m: float = 4.5e-3,
                 beamstop_arm_width_m: float = 2.0e-3, beamstop_arm_chi: float = math.pi,
                 beamstop_counts: float = 0.02, polarization_factor: float | None = 0.95,
                 dark_current: float = 0.0, hot_pixels: int = 0, hot_pixel_counts: int = 1_000_000,
                 grid_points: int = 16384, noise: Literal["poisson", "normal", "none"] = "poisson"):
        for name, value in (("flux", flux), ("exposure", exposure)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"FrameSimulator {name} must be positive, got {value!r}")
        if beamstop_radius_m < 0 or beamstop_arm_width_m < 0:
            raise ValueError(f"beamstop sizes must be >= 0, got {beamstop_radius_m!r}, {beamstop_arm_width_m!r}")
        if not beamstop_counts >= 0:
            raise ValueError(f"beamstop_counts must be >= 0, got {beamstop_counts!r}")
        if noise not in ("poisson", "normal", "none"):
            raise ValueError(f"noise must be 'poisson', 'normal' or 'none', got {noise!r}")
        self.noise = noise
        if polarization_factor is not None and not -1.0 <= polarization_factor <= 1.0:
            raise ValueError(f"polarization_factor must be in [-1, 1] or None, got {polarization_factor!r}")
        if dark_current < 0 or hot_pixels < 0 or grid_points < 16:
            raise ValueError(f"bad dark_current={dark_current!r}, hot_pixels={hot_pixels!r} "
                             f"or grid_points={grid_points!r}")
        self.ai = as_integrator(geometry)
        self.cycle = cycle if cycle is not None else AzoCycle()
        self.flux, self.exposure = float(flux), float(exposure)
        self.polarization_factor = polarization_factor
        self.dark_current = float(dark_current)
        self.rng = np.random.default_rng(seed)

        ai = self.ai
        shape = tuple(ai.detector.shape)
        self.shape: tuple[int, int] = shape
        self.q = np.asarray(ai.array_from_unit(shape=shape, unit="q_nm^-1"), dtype=float)
        chi = np.asarray(ai.center_array(shape, unit="chi_rad"), dtype=float)
        tth = np.asarray(ai.array_from_unit(shape=shape, unit="2th_rad"), dtype=float)
        self.solid_angle = np.asarray(ai.solidAngleArray(shape), dtype=float)
        if polarization_factor is None:
            self.polarization = np.ones(shape)
        else:
            self.polarization = np.asarray(ai.polarization(shape, factor=polarization_factor), dtype=float)
        det_mask = ai.detector.mask
        self.gap_mask = (np.zeros(shape, bool) if det_mask is None else np.asarray(det_mask, bool))

        # beamstop: disc of radius R in the detector plane plus an arm along chi_arm
        r = ai.dist * np.tan(tth) / max(math.cos(ai.rot1) * math.cos(ai.rot2), 1e-6)
        dchi = chi - beamstop_arm_chi
        arm = (r * np.abs(np.sin(dchi)) < 0.5 * beamstop_arm_width_m) & (np.cos(dchi) > 0)
        self.beamstop_mask = ((r < beamstop_radius_m) | arm) & ~self.gap_mask
        hot = np.zeros(shape, bool)
        if hot_pixels:
            free = np.flatnonzero(~(self.gap_mask | self.beamstop_mask))
            hot.flat[self.rng.choice(free, size=hot_pixels, replace=False)] = True
        self.hot_mask = hot
        self.hot_pixel_counts = int(hot_pixel_counts)

        # per-pixel gain: flux * exposure * Omega * P; I(q) interpolated from a grid
        self._gain = (self.scale * self.solid_angle * self.polarization).ravel()
        self.beamstop_counts = float(beamstop_counts)
        self._beamstop_flat = np.flatnonzero(self.beamstop_mask)
        qmin, qmax = float(self.q.min()), float(self.q.max())
        pad = 1e-6 * (qmax - qmin)
        self.q_grid = np.linspace(max(qmin - pad, 1e-9), qmax + pad, grid_points)
        pos = (self.q.ravel() - self.q_grid[0]) / (self.q_grid[1] - self.q_grid[0])
        self._idx = np.clip(np.floor(pos).astype(np.intp), 0, grid_points - 2)
        self._w = pos - self._idx
        self._gap_flat = np.flatnonzero(self.gap_mask)
        self._hot_flat = np.flatnonzero(self.hot_mask)

    @property
    def scale(self) -> float:
        """flux * exposure: integrated profile = scale * cycle 1D model."""
        return self.flux * self.exposure

    @property
    def mask(self) -> np.ndarray:
        """bool (rows, cols), True = should be masked: module gaps, beamstop, hot pixels."""
        return self.gap_mask | self.beamstop_mask | self.hot_mask

    def expected(self, t: float) -> np.ndarray:
        """Noiseless expected counts (rows, cols) float64 at time t s (gaps 0)."""
        prof = self.cycle.profile(self.q_grid, float(t))
        lam = prof[self._idx] * (1.0 - self._w) + prof[self._idx + 1] * self._w
        lam *= self._gain
        if self.dark_current:
            lam += self.dark_current * self.exposure
        lam[self._beamstop_flat] = self.beamstop_counts
        lam[self._gap_flat] = 0.0
        return lam.reshape(self.shape)

    def frame(self, t: float) -> np.ndarray:
        """One Poisson frame at time t s: int32 (rows, cols), gaps -1, hot pixels saturated."""
        lam = self.expected(t)
        if self.noise == "poisson":
            counts = self.rng.poisson(lam).astype(np.int32)
        elif self.noise == "normal":
            z = self.rng.standard_normal(lam.shape, dtype=np.float32)
            counts = np.rint(np.maximum(lam + np.sqrt(lam) * z, 0.0)).astype(np.int32)
        else:
            counts = np.rint(lam).astype(np.int32)
        flat = counts.reshape(-1)
        flat[self._hot_flat] = self.hot_pixel_counts
        flat[self._gap_flat] = -1
        return counts

    def truth(self, t: float) -> dict[str, np.ndarray]:
        """Flat truth at t (see :func:`flatten_truth`), areas in integrated-profile units
        (cycle areas x ``scale``)."""
        return flatten_truth(self.cycle.truth(t), scale=self.scale)

    def truth_table(self, times):
        """pandas DataFrame, one row per time: ``time``, ``<peak>_{center,fwhm,area,eta}``,
        ``crystallinity``, ``phase``, ``light``; areas x ``scale`` (integrated-profile units)."""
        import pandas as pd

        times = np.atleast_1d(np.asarray(times, dtype=float))
        return pd.DataFrame(self.truth(times))
