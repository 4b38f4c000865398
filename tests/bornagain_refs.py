"""BornAgain references for the GISAXS forward-model tests (tests/test_inversion.py: Born,
tests/test_gisaxs_dwba.py: DWBA, tests/test_gisaxs_distribution.py: radius histograms): the
particles, their order, a simulation on a regular grid, and the per-pixel comparison."""
from __future__ import annotations

import math

import numpy as np
import pytest

from workers.inversion.gisaxs import _GH_T, _GH_W


def particles(kind: str, radius: float, pd: float, height: float | None = None) -> list:
    """(BornAgain particle, weight) at the Gauss-Hermite radius nodes our models sum over, so that
    polydispersity sampling plays no part in the comparison; near-vacuum particle material (delta
    1e-10: BornAgain's absolute scale is divided out)."""
    ba = pytest.importorskip("bornagain")
    mat = ba.RefractiveMaterial("p", (1.0, 0.0, 0.0), 1e-10, 0.0)
    ff = (lambda r: ba.Sphere(r)) if kind == "sphere" else (lambda r: ba.Cylinder(r, height))
    return [(ba.Particle(mat, ff(radius * (1 + math.sqrt(2) * pd * t))), w) for t, w in zip(_GH_T, _GH_W)]


def histogram_particles(bins, weights) -> list:
    """(BornAgain sphere, number weight) at the Legendre nodes of ``bins`` (a
    ``workers.inversion.distribution.RadiusBins``) for one histogram ``weights`` (K,), the nodes
    our histogram models sum over; near-vacuum particle material as ``particles``."""
    import torch
    ba = pytest.importorskip("bornagain")
    mat = ba.RefractiveMaterial("p", (1.0, 0.0, 0.0), 1e-10, 0.0)
    r, w = bins.nodes(torch.as_tensor(np.asarray(weights, np.float64))[None])
    return [(ba.Particle(mat, ba.Sphere(float(ri))), float(wi)) for ri, wi in zip(r, w[0]) if wi > 0]


def gaussian_population(modes, n_members: int = 41, n_sd: float = 4.0) -> list:
    """(BornAgain sphere, number weight) of a population of Gaussian modes [(mean nm, sd nm,
    number fraction)], each as n_members radii over +-n_sd sd (a continuous law, not our bins)."""
    ba = pytest.importorskip("bornagain")
    mat = ba.RefractiveMaterial("p", (1.0, 0.0, 0.0), 1e-10, 0.0)
    t = np.linspace(-n_sd, n_sd, n_members)
    g = np.exp(-0.5 * t * t)
    return [(ba.Particle(mat, ba.Sphere(float(m + sd * ti))), float(f * gi / g.sum()))
            for m, sd, f in modes for ti, gi in zip(t, g)]


def mixture(ba, particles: list):
    """The one particle of ``particles`` [(particle, weight)], or all of them as a Mixture."""
    if len(particles) == 1:
        return particles[0][0]
    mix = ba.Mixture()
    for p, w in particles:
        mix.addParticle(p, w)
    return mix


def simulate(grid, particles: list, structure, substrate=None) -> np.ndarray:
    """BornAgain 25 map (H, W) on a regular ``DetectorGrid`` (SphericalDetector bins): the
    particles (a Mixture when several) in ``structure`` deposited in the vacuum layer on
    ``substrate`` (a ``Substrate`` without film; None: vacuum, the Born approximation)."""
    ba = pytest.importorskip("bornagain")
    top = ba.Layer(ba.Vacuum())
    top.deposit2D(structure(ba, mixture(ba, particles)))
    sample = ba.Sample()
    sample.addLayer(top)
    sample.addLayer(ba.Layer(ba.Vacuum() if substrate is None else
                             ba.RefractiveMaterial("substrate", (0.2, 0.2, 0.2), substrate.delta, substrate.beta)))
    du, dv = grid.u[1] - grid.u[0], grid.v[1] - grid.v[0]
    det = ba.SphericalDetector(len(grid.u), grid.u[0] - du / 2, grid.u[-1] + du / 2,
                               len(grid.v), grid.v[0] - dv / 2, grid.v[-1] + dv / 2)
    res = ba.ScatteringSimulation(ba.Beam(1.0, grid.wavelength, grid.alpha_i), sample, det).simulate()
    return np.asarray(res.flatVector()).reshape(grid.shape)


def paracrystal(distance: float, omega: float):
    """A builder of BornAgain's radial paracrystal (Gaussian next-neighbour distances) for a
    particle layout: ``make(ba, layout)``."""
    def make(ba, part):
        st = ba.RadialParacrystal(part, distance, 0.0)
        st.setProbabilityDistribution(ba.Profile1DGauss(omega))
        return st
    return make


def relative_error_map(ba_map: np.ndarray, ours) -> np.ndarray:
    """Per pixel |ratio / median ratio - 1| (BornAgain's absolute scale: beam, density, contrast,
    is one constant, divided out) where our map (B=1, H, W) exceeds 1e-3 of its maximum (deep
    form-factor zeros excluded); NaN elsewhere."""
    ours = ours[0].numpy()
    m = ours > 1e-3 * ours.max()
    ratio = ba_map / ours
    return np.where(m, np.abs(ratio / np.median(ratio[m]) - 1), np.nan)
