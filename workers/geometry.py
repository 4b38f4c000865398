"""Detector geometry in pyFAI's PONI convention, and a differentiable torch version of it.

pyFAI (``pyFAI/geometry/core.py``, ``doc/source/geometry.rst``) defines the geometry by six
parameters: ``dist`` (m, sample to the point of normal incidence), ``poni1``/``poni2`` (m,
PONI position on the detector along rows/columns) and ``rot1``, ``rot2``, ``rot3`` (rad).
A pixel at detector coordinates ``(p1, p2, p3)`` (m, along rows, columns, and normal; the
detector orientation of PONI v2.1 is already applied by ``detector.calc_cartesian_positions``)
is moved to the laboratory frame by ``t = R3 R2 R1 (p1 - poni1, p2 - poni2, dist + p3)`` with

    R1 = [[1, 0, 0], [0, c1, s1], [0, -s1, c1]]      (left-handed about axis 1)
    R2 = [[c2, 0, -s2], [0, 1, 0], [s2, 0, c2]]      (left-handed about axis 2)
    R3 = [[c3, -s3, 0], [s3, c3, 0], [0, 0, 1]]      (right-handed about the beam)

and then ``2θ = atan2(sqrt(t1² + t2²), t3)``, ``χ = atan2(t1, t2)`` (pyFAI's azimuth, in
(-π, π], discontinuity at π), ``q = 4π sin(θ) / λ``.

pyFAI is used here for what it defines (detector catalogue, masks, PONI files, pixel corners);
the torch functions are the differentiable copy that calibration optimises through.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

__all__ = ["Geometry", "tth_chi", "q_from_tth", "rotation_matrix", "pixel_positions"]


@dataclass(frozen=True)
class Geometry:
    """pyFAI PONI geometry. Lengths in m, angles in rad.

    ``detector`` is a pyFAI detector name (``pyFAI.detector_factory``), or ``"Detector"`` for a
    generic flat detector given by ``pixel1``, ``pixel2`` (m) and ``shape`` (rows, cols).
    ``orientation`` is the PONI v2.1 detector orientation (1-4, pyFAI default 3).
    """

    dist: float
    poni1: float
    poni2: float
    rot1: float = 0.0
    rot2: float = 0.0
    rot3: float = 0.0
    wavelength: float = 1e-10
    detector: str = "Pilatus300k"
    pixel1: float | None = None
    pixel2: float | None = None
    shape: tuple[int, int] | None = None
    orientation: int = 3

    def __post_init__(self):
        if not self.dist > 0:
            raise ValueError(f"dist must be > 0 m, got {self.dist!r}")
        if not self.wavelength > 0:
            raise ValueError(f"wavelength must be > 0 m, got {self.wavelength!r}")
        if int(self.orientation) not in (0, 1, 2, 3, 4):
            raise ValueError(f"orientation must be 0..4, got {self.orientation!r}")
        if self.shape is not None:
            object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.pixel1 is None or self.pixel2 is None or self.shape is None:
            det = _make_detector(self.detector, self.pixel1, self.pixel2, self.shape, self.orientation)
            object.__setattr__(self, "pixel1", float(det.pixel1) if self.pixel1 is None else self.pixel1)
            object.__setattr__(self, "pixel2", float(det.pixel2) if self.pixel2 is None else self.pixel2)
            if self.shape is None:
                shape = det.shape if det.shape is not None else det.max_shape
                object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))

    # -- pyFAI interop ------------------------------------------------------------------
    @classmethod
    def from_poni(cls, path) -> "Geometry":
        """Read a pyFAI PONI file (versions 1, 2, 2.1); ValueError naming the file and key when
        it is not one (binary, a value that is no number, an unknown detector)."""
        import pyFAI

        _check_poni(Path(path))
        try:
            ai = pyFAI.load(str(path))
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ValueError(f"{path}: not a usable PONI file: {str(exc).splitlines()[0]}") from None
        return cls.from_pyfai(ai)

    def to_poni(self, path) -> None:
        """Write a PONI v2.1 file (pyFAI's writer)."""
        path = Path(path)
        if path.exists():
            path.unlink()  # pyFAI appends to existing files
        self.to_pyfai().write(str(path))

    @classmethod
    def from_pyfai(cls, ai) -> "Geometry":
        """Geometry of a pyFAI ``AzimuthalIntegrator`` (or ``Geometry``)."""
        det = ai.detector
        shape = det.shape if det.shape is not None else det.max_shape
        return cls(dist=float(ai.dist), poni1=float(ai.poni1), poni2=float(ai.poni2),
                   rot1=float(ai.rot1), rot2=float(ai.rot2), rot3=float(ai.rot3),
                   wavelength=float(ai.wavelength) if ai.wavelength else 1e-10,
                   detector=type(det).__name__, pixel1=float(det.pixel1), pixel2=float(det.pixel2),
                   shape=None if shape is None else (int(shape[0]), int(shape[1])),
                   orientation=int(det.orientation))

    def to_pyfai(self):
        """A pyFAI ``AzimuthalIntegrator`` for this geometry (cached; do not mutate it)."""
        return _to_pyfai(self)

    def detector_mask(self) -> np.ndarray:
        """bool (rows, cols), True = masked (module gaps, bad pixels) as pyFAI defines them."""
        det = self.to_pyfai().detector
        mask = det.mask
        if mask is None:
            return np.zeros(self.shape, dtype=bool)
        return np.asarray(mask, dtype=bool).copy()

    @property
    def params(self) -> tuple[float, float, float, float, float, float]:
        """(dist, poni1, poni2, rot1, rot2, rot3) in m and rad."""
        return (self.dist, self.poni1, self.poni2, self.rot1, self.rot2, self.rot3)

    def with_params(self, params) -> "Geometry":
        """Copy with the six PONI parameters replaced (e.g. after a refinement)."""
        p = [float(v) for v in params]
        return replace(self, dist=p[0], poni1=p[1], poni2=p[2], rot1=p[3], rot2=p[4], rot3=p[5])

    def checksum(self) -> str:
        """Stable key of everything that changes pixel positions (for integrator caches)."""
        return repr((self.params, self.wavelength, self.detector, self.pixel1, self.pixel2,
                     self.shape, int(self.orientation)))


#: PONI keys whose values are numbers (pyFAI's PoniFile reads them with float())
_PONI_NUMBERS = ("distance", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength", "pixelsize1", "pixelsize2")


def _check_poni(path: Path) -> None:
    """The checks pyFAI's reader lacks, as one clear line: a text file of ``Key: value``
    lines whose numeric keys hold numbers (JSON PONI files are left to pyFAI)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a PONI file (binary; a PONI file is text, 'Distance: 0.1' lines)") from None
    if text.lstrip().startswith("{"):
        return
    for number, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.partition(":")
        if sep and not line.lstrip().startswith("#") and key.strip().lower() in _PONI_NUMBERS:
            try:
                float(value)
            except ValueError:
                raise ValueError(f"{path}, line {number}: {key.strip()} = {value.strip()!r} is not a number") from None


def _make_detector(name, pixel1, pixel2, shape, orientation):
    import pyFAI
    import pyFAI.detectors

    if name in (None, "", "Detector", "detector"):
        if pixel1 is None or pixel2 is None or shape is None:
            raise ValueError("a generic 'Detector' needs pixel1, pixel2 and shape")
        return pyFAI.detectors.Detector(pixel1, pixel2, max_shape=tuple(shape),
                                        orientation=int(orientation))
    known = pyFAI.detectors.Detector.registry
    if not (os.path.isfile(name) or isinstance(getattr(pyFAI.detectors, name, None), type)
            or {name.lower(), name.lower().replace(" ", "_")} & set(known)):
        close = difflib.get_close_matches(name.lower(), known, n=4)
        raise ValueError(f"unknown pyFAI detector {name!r}" + (f"; close names: {', '.join(close)}" if close else
                                                               " (pyFAI.detectors.ALL_DETECTORS lists them)"))
    try:
        det = pyFAI.detector_factory(name, config={"orientation": int(orientation)})
    except Exception as exc:  # pyFAI raises RuntimeError for unknown names
        raise ValueError(f"pyFAI detector {name!r}: {str(exc).splitlines()[0]}") from exc
    det_shape = det.shape if det.shape is not None else det.max_shape
    same_pixels = ((pixel1 is None or math.isclose(pixel1, det.pixel1, rel_tol=1e-9))
                   and (pixel2 is None or math.isclose(pixel2, det.pixel2, rel_tol=1e-9)))
    same_shape = shape is None or tuple(shape) == tuple(det_shape)
    if not (same_pixels and same_shape):
        raise ValueError(f"detector {name!r} has pixels {det.pixel1}x{det.pixel2} m and shape "
                         f"{tuple(det_shape)}, got {pixel1}x{pixel2} m and {shape}; use "
                         f"detector='Detector' for a custom layout")
    return det


@functools.lru_cache(maxsize=16)
def _to_pyfai(geometry: Geometry):
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = _make_detector(geometry.detector, geometry.pixel1, geometry.pixel2, geometry.shape,
                         geometry.orientation)
    return AzimuthalIntegrator(dist=geometry.dist, poni1=geometry.poni1, poni2=geometry.poni2,
                               rot1=geometry.rot1, rot2=geometry.rot2, rot3=geometry.rot3,
                               detector=det, wavelength=geometry.wavelength)


def pixel_positions(geometry: Geometry, *, dtype=torch.float64, device="cpu"):
    """Pixel-centre positions on the detector (pyFAI ``calc_cartesian_positions``).

    Returns ``(pos1, pos2, pos3)``: (rows, cols) tensors in m, orientation applied; pos3 is None
    for flat detectors.
    """
    det = geometry.to_pyfai().detector
    d1, d2 = np.indices(geometry.shape, dtype=np.float64)  # float64 indices: float64 positions
    p1, p2, p3 = det.calc_cartesian_positions(d1, d2)
    conv = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype, device=device)
    return conv(p1), conv(p2), conv(p3)


# -- differentiable torch geometry ---------------------------------------------------------
def rotation_matrix(rot1: torch.Tensor, rot2: torch.Tensor, rot3: torch.Tensor) -> torch.Tensor:
    """pyFAI's ``rotation_matrix``: R = R3 @ R2 @ R1 (3, 3), angles in rad."""
    c1, s1 = torch.cos(rot1), torch.sin(rot1)
    c2, s2 = torch.cos(rot2), torch.sin(rot2)
    c3, s3 = torch.cos(rot3), torch.sin(rot3)
    one, zero = torch.ones_like(c1), torch.zeros_like(c1)
    r1 = torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, c1, s1]),
                      torch.stack([zero, -s1, c1])])
    r2 = torch.stack([torch.stack([c2, zero, -s2]), torch.stack([zero, one, zero]),
                      torch.stack([s2, zero, c2])])
    r3 = torch.stack([torch.stack([c3, -s3, zero]), torch.stack([s3, c3, zero]),
                      torch.stack([zero, zero, one])])
    return r3 @ r2 @ r1


def lab_positions(params: torch.Tensor, pos1: torch.Tensor, pos2: torch.Tensor,
                  pos3: torch.Tensor | None = None):
    """Laboratory coordinates ``(t1, t2, t3)`` (m) of detector points (pyFAI ``calc_pos_zyx``).

    params: (6,) [dist, poni1, poni2, rot1, rot2, rot3] (m, rad); pos1/pos2/pos3: any shape, m.
    """
    dist, poni1, poni2, rot1, rot2, rot3 = params.unbind(0)
    p1 = pos1 - poni1
    p2 = pos2 - poni2
    p3 = dist + (pos3 if pos3 is not None else torch.zeros_like(p1))
    r = rotation_matrix(rot1, rot2, rot3)
    t1 = r[0, 0] * p1 + r[0, 1] * p2 + r[0, 2] * p3
    t2 = r[1, 0] * p1 + r[1, 1] * p2 + r[1, 2] * p3
    t3 = r[2, 0] * p1 + r[2, 1] * p2 + r[2, 2] * p3
    return t1, t2, t3


def tth_chi(params: torch.Tensor, pos1: torch.Tensor, pos2: torch.Tensor,
            pos3: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scattering angle 2θ and azimuth χ (rad) of detector points, differentiable in params.

    params: (6,) [dist, poni1, poni2, rot1, rot2, rot3] (m, rad); pos1, pos2, pos3: detector
    coordinates (m) as returned by :func:`pixel_positions`. 2θ = atan2(√(t1²+t2²), t3),
    χ = atan2(t1, t2) in (-π, π] (pyFAI, ``chiDiscAtPi=True``).
    """
    t1, t2, t3 = lab_positions(params, pos1, pos2, pos3)
    tth = torch.atan2(torch.sqrt(t1 * t1 + t2 * t2), t3)
    chi = torch.atan2(t1, t2)
    return tth, chi


def q_from_tth(tth: torch.Tensor, wavelength: float | torch.Tensor) -> torch.Tensor:
    """q = 4π sin(2θ/2) / λ in 1/nm; tth in rad, wavelength in m."""
    return 4.0e-9 * math.pi * torch.sin(0.5 * tth) / wavelength
