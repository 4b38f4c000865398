"""Simulated GISAXS frames of growing particles on a substrate, rendered by BornAgain.

Sample: spheres (Gaussian radii, relative width ``pd``, as a BornAgain Mixture on the nine
Gauss-Hermite nodes ``workers.inversion.gisaxs`` integrates over, as tests/test_gisaxs_dwba.py
does) on a radial paracrystal (mean distance
``distance`` nm, Gaussian nearest-neighbour law of width ``disorder * distance``) deposited on
a substrate of index 1 - delta + i beta (``workers.inversion.spec.Substrate``), in the DWBA.
The radius grows linearly from ``radius[0]`` at t = 0 to ``radius[1]`` at t = ``duration`` s;
``truth(t)`` gives the parameters per frame. ``second=(radius nm, volume share)``: a second,
fixed population of spheres (same ``pd``) holding that share of the particles' volume, the two
as Gaussian species (nine Gauss-Hermite nodes each) in one Mixture, abundances their number
fractions (volume share / <r^3>, <r^3> = r^3 (1 + 3 pd^2)); ``truth`` then also has
``radius_2`` and ``volume_share_2``.

BornAgain (an independent reference: ``workers.inversion.dwba`` is checked against it per
pixel in tests/test_gisaxs_dwba.py) renders each frame on a ``SphericalDetector``, whose
bins are tangent-plane coordinates (u, v) = (k_f,y, k_f,z) / k_f,x in the sample frame
(``workers.inversion.gisaxs``). A flat pyFAI detector whose normal is the sample's x axis
(rot2 = -alpha_i, no other rotation; ``particle_geometry``) has its pixels exactly on such a
grid: u along the columns, v along the rows, so BornAgain's bins are the pixels (checked at
construction from pyFAI's pixel positions, ``service.sim.grazing.reference_gi_pixels``).

Counts: BornAgain's intensity carries the flat-detector factor (1 + u^2 + v^2)^(-3/2), which
is pyFAI's solid angle relative to the PONI for this detector; per pixel

    lambda = scale * (I_BA (1 + u^2 + v^2)^(3/2) + background) * Omega * P,

Omega, P pyFAI's solid angle and polarization (factor ``polarization_factor``), ``scale`` such
that the brightest pixel of each frame expects ``peak_counts``; pixels below the sample horizon
(alpha_f <= 0) read 0. Poisson noise; int32 frames. A ``workers.grazing`` map with the same
corrections returns scale * (I_BA / pixel factor + background) per solid angle.
"""
from __future__ import annotations

import math

import numpy as np

from service.sim.grazing import reference_gi_pixels

SI_12KEV = (3.16e-6, 4.2e-8)     # Si (2.33 g/cm3) at 12.4 keV (lambda 0.1 nm): delta, beta (Henke tables)


def particle_geometry(*, shape=(100, 100), pixel: float = 3.6e-4, dist: float = 1.0, beam=(5.5, 2.5),
                      incident_angle: float = 3.5e-3, wavelength: float = 1e-10):
    """A ``workers.grazing.GrazingGeometry`` whose pixels BornAgain renders exactly (module
    docstring): shape (rows, cols), square pixels (m) at ``dist`` (m), the sample horizon
    (alpha_f = 0) and the plane of incidence through pixel ``beam`` (row, col; fractional)."""
    from workers.geometry import Geometry
    from workers.grazing import GrazingGeometry
    geo = Geometry(dist=dist, poni1=(beam[0] + 0.5) * pixel, poni2=(beam[1] + 0.5) * pixel, rot2=-incident_angle,
                   detector="Detector", pixel1=pixel, pixel2=pixel, shape=shape, wavelength=wavelength)
    return GrazingGeometry(geo, incident_angle=incident_angle)


class GisaxsParticleSimulator:
    """Poisson GISAXS frames of growing spheres on a substrate (module docstring).

    ``geometry``: a GrazingGeometry like ``particle_geometry``'s (None: that default);
    ``substrate``: (delta, beta) of the substrate at the beam's energy; ``radius`` (start, end)
    nm over ``duration`` s; ``pd``, ``distance`` (nm), ``disorder`` (omega / distance);
    ``background`` per solid angle relative to the frame's peak intensity.
    """

    def __init__(self, geometry=None, substrate=SI_12KEV, *, radius=(3.5, 6.0), duration: float = 10.0,
                 pd: float = 0.1, distance: float = 20.0, disorder: float = 0.15, peak_counts: float = 1e5,
                 background: float = 1e-4, polarization_factor: float | None = 0.95, seed: int | None = 0,
                 second: tuple[float, float] | None = None):
        if not (duration > 0 and peak_counts > 0 and background >= 0 and 0 < pd <= 0.2 and distance > 0
                and disorder > 0 and min(radius) > 0):
            raise ValueError(f"GisaxsParticleSimulator: bad duration/peak_counts/background/pd/distance/disorder/"
                             f"radius {duration}, {peak_counts}, {background}, {pd}, {distance}, {disorder}, {radius}")
        if second is not None and not (second[0] > 0 and 0 < second[1] < 1):
            raise ValueError(f"GisaxsParticleSimulator: second=(radius > 0, 0 < volume share < 1), got {second}")
        self.second = None if second is None else (float(second[0]), float(second[1]))
        self.grazing = geometry if geometry is not None else particle_geometry()
        self.substrate = (float(substrate[0]), float(substrate[1]))
        self.radius, self.duration = (float(radius[0]), float(radius[1])), float(duration)
        self.pd, self.distance, self.disorder = float(pd), float(distance), float(disorder)
        self.peak_counts, self.background = float(peak_counts), float(background)
        self.rng = np.random.default_rng(seed)
        ai = self.grazing.geometry.to_pyfai()
        self.shape: tuple[int, int] = tuple(self.grazing.shape)
        px = reference_gi_pixels(ai, self.grazing.incident_angle, self.grazing.tilt_angle)
        self.u, self.v = np.tan(px["tth_f"]), np.tan(px["alpha_f"]) / np.cos(px["tth_f"])
        self._axes = self._regular_axes()
        self.above = px["alpha_f"] > 0
        omega = np.asarray(ai.solidAngleArray(self.shape), dtype=float)
        pol = (np.ones(self.shape) if polarization_factor is None
               else np.asarray(ai.polarization(self.shape, factor=polarization_factor), dtype=float))
        self._gain = omega * pol * self.above
        self._per_sr = (1.0 + self.u ** 2 + self.v ** 2) ** 1.5

    def _regular_axes(self):
        """(u_lo, u_hi, v_lo, v_hi) bin edges of the pixels' tangent-plane grid; ValueError if the
        pixels are not on one (module docstring)."""
        u, v = self.u[0], self.v[:, 0]
        du, dv = (u[-1] - u[0]) / (len(u) - 1), (v[-1] - v[0]) / (len(v) - 1)
        grid_u = u[0] + du * np.arange(len(u))
        grid_v = v[0] + dv * np.arange(len(v))
        off = max(np.abs(self.u - grid_u[None]).max() / abs(du), np.abs(self.v - grid_v[:, None]).max() / abs(dv))
        if not off < 1e-6 or du <= 0 or dv <= 0:
            raise ValueError(f"GisaxsParticleSimulator: the detector's pixels are not a regular tangent-plane grid "
                             f"(off by {off:.2g} pixel): use particle_geometry()")
        return u[0] - du / 2, u[-1] + du / 2, v[0] - dv / 2, v[-1] + dv / 2

    def truth(self, t) -> dict[str, np.ndarray]:
        """radius (nm), pd, distance (nm), disorder at time(s) t (s); with ``second`` also
        radius_2 (nm) and volume_share_2."""
        t = np.asarray(t, dtype=float)
        r0, r1 = self.radius
        f = np.clip(t / self.duration, 0.0, 1.0)
        out = {"radius": r0 + (r1 - r0) * f, "pd": np.full(t.shape, self.pd),
               "distance": np.full(t.shape, self.distance), "disorder": np.full(t.shape, self.disorder)}
        if self.second is not None:
            out["radius_2"], out["volume_share_2"] = np.full(t.shape, self.second[0]), np.full(t.shape, self.second[1])
        return out

    def species(self, t: float) -> list[tuple[float, float]]:
        """[(mean radius nm, number fraction)] of the populations at time t (module docstring)."""
        r = float(self.truth(t)["radius"])
        if self.second is None:
            return [(r, 1.0)]
        (r2, v2), k = self.second, 1.0 + 3.0 * self.pd ** 2
        n1, n2 = (1.0 - v2) / (k * r ** 3), v2 / (k * r2 ** 3)
        return [(r, n1 / (n1 + n2)), (r2, n2 / (n1 + n2))]

    def intensity(self, t: float) -> np.ndarray:
        """BornAgain's DWBA intensity per solid angle (H, W) at time t, max 1 above the horizon."""
        import bornagain as ba
        from workers.inversion.gisaxs import _GH_T, _GH_W       # the size distribution's nodes and weights

        mat = ba.RefractiveMaterial("particle", (1.0, 0.0, 0.0), 1e-10, 0.0)
        mix = ba.Mixture()
        for r, frac in self.species(t):
            for node, w in zip(_GH_T, _GH_W):
                mix.addParticle(ba.Particle(mat, ba.Sphere(r * (1 + math.sqrt(2) * self.pd * node))), frac * w)
        layout = ba.RadialParacrystal(mix, self.distance, 0.0)
        layout.setProbabilityDistribution(ba.Profile1DGauss(self.disorder * self.distance))
        top = ba.Layer(ba.Vacuum())
        top.deposit2D(layout)
        sample = ba.Sample()
        sample.addLayer(top)
        sample.addLayer(ba.Layer(ba.RefractiveMaterial("substrate", (0.2, 0.2, 0.2), *self.substrate)))
        u0, u1, v0, v1 = self._axes
        det = ba.SphericalDetector(self.shape[1], u0, u1, self.shape[0], v0, v1)
        beam = ba.Beam(1.0, self.grazing.geometry.wavelength * 1e9, self.grazing.incident_angle)
        out = np.asarray(ba.ScatteringSimulation(beam, sample, det).simulate().flatVector()).reshape(self.shape)
        out = np.where(self.above, out * self._per_sr, 0.0)
        return out / out.max()

    def expected(self, t: float) -> np.ndarray:
        """Expected counts (H, W) float64 at time t s."""
        lam = (self.intensity(t) + self.background) * self._gain
        return lam * (self.peak_counts / lam.max())

    def frame(self, t: float) -> np.ndarray:
        """One Poisson frame at time t s: int32 (H, W)."""
        return self.rng.poisson(self.expected(t)).astype(np.int32)
