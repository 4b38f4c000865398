"""BornAgain references for the GISAXS forward-model tests (tests/test_inversion.py: Born,
tests/test_gisaxs_dwba.py: DWBA): the particles, their order, and the per-pixel comparison."""
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
