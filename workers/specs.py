"""What a run asks of the numerics, as frozen dataclasses: peaks and background to fit, the
temporal regularizer, the reduction (with its grazing-incidence part) and the inversion.

Plain Python only (no torch, no numpy), so that the service's configuration can validate these
types at its edge (pydantic reads stdlib dataclasses) without loading the numerics.
Positions and widths in 1/nm (or the run's radial unit), angles in radians, sectors in degrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Shape = Literal["gaussian", "lorentzian", "pseudo_voigt", "pseudo_voigt_tch", "voigt"]
Penalty = Literal["none", "quadratic", "huber", "tv"]
Modality = Literal["saxs", "waxs", "gisaxs", "giwaxs"]
Unit = Literal["q_nm^-1", "q_A^-1", "2th_deg"]
Method = Literal["no", "bbox", "full"]

MODALITIES: tuple[str, ...] = ("saxs", "waxs", "gisaxs", "giwaxs")
GRAZING: tuple[str, ...] = ("gisaxs", "giwaxs")

#: each profile's parameters in the order of the parameter vector (workers/profiles.py)
SHAPE_PARAMS: dict[str, tuple[str, ...]] = {
    "gaussian": ("center", "fwhm", "area"),
    "lorentzian": ("center", "fwhm", "area"),
    "pseudo_voigt": ("center", "fwhm", "area", "eta"),
    "pseudo_voigt_tch": ("center", "fwhm_g", "area", "fwhm_l"),
    "voigt": ("center", "fwhm_g", "area", "fwhm_l"),
}

_STRICT = {"extra": "forbid"}      # pydantic's config when it validates these from YAML


@dataclass(frozen=True)
class PeakSpec:
    """One peak: initial guess and bounds. Positions and widths in 1/nm."""
    __pydantic_config__ = _STRICT
    name: str
    shape: Shape = "pseudo_voigt"
    center: float = 0.0
    fwhm: float = 0.1
    center_min: float | None = None
    center_max: float | None = None
    fwhm_min: float | None = None
    fwhm_max: float | None = None
    area: float | None = None          # None: estimated from data
    eta: float = 0.5                   # initial (pseudo_voigt) mixing; fixed with fix_eta=True


@dataclass(frozen=True)
class BackgroundSpec:
    __pydantic_config__ = _STRICT
    kind: Literal["polynomial", "power_law"] = "polynomial"
    degree: int = 1


@dataclass(frozen=True)
class ModelSpec:
    peaks: tuple[PeakSpec, ...]
    background: BackgroundSpec = field(default_factory=BackgroundSpec)
    q_range: tuple[float, float] | None = None    # fit only this radial range


@dataclass(frozen=True)
class RegularizerSpec:
    """Sliding-window temporal regularizer (workers/temporal.py): window in frames, penalty on
    frame-to-frame changes, strength in units of the parameters' standard errors."""
    __pydantic_config__ = _STRICT
    window: int = 16
    penalty: Penalty = "huber"
    strength: float = 2.0


def validate_model_spec(spec: ModelSpec) -> None:
    """Raise ValueError naming the offending value."""
    if not isinstance(spec.peaks, tuple):
        raise ValueError(f"ModelSpec.peaks must be a tuple of PeakSpec, got {type(spec.peaks).__name__}")
    names = [p.name for p in spec.peaks]
    if len(set(names)) != len(names):
        raise ValueError(f"peak names must be unique, got {names}")
    for p in spec.peaks:
        if p.shape not in SHAPE_PARAMS:
            raise ValueError(f"peak {p.name!r}: unknown shape {p.shape!r}; one of {tuple(SHAPE_PARAMS)}")
        if not p.fwhm > 0:
            raise ValueError(f"peak {p.name!r}: fwhm must be > 0, got {p.fwhm}")
        if not 0.0 <= p.eta <= 1.0:
            raise ValueError(f"peak {p.name!r}: eta must be in [0, 1], got {p.eta}")
        for lo, hi, what in ((p.center_min, p.center_max, "center"), (p.fwhm_min, p.fwhm_max, "fwhm")):
            if lo is not None and hi is not None and not lo < hi:
                raise ValueError(f"peak {p.name!r}: {what}_min={lo} must be < {what}_max={hi}")
        if p.fwhm_min is not None and p.fwhm_min < 0:
            raise ValueError(f"peak {p.name!r}: fwhm_min must be >= 0, got {p.fwhm_min}")
    bg = spec.background
    if bg.kind not in ("polynomial", "power_law"):
        raise ValueError(f"background kind must be 'polynomial' or 'power_law', got {bg.kind!r}")
    if bg.kind == "polynomial" and not (isinstance(bg.degree, int) and 0 <= bg.degree <= 8):
        raise ValueError(f"polynomial background degree must be an int in [0, 8], got {bg.degree!r}")
    if spec.q_range is not None and not (len(spec.q_range) == 2 and spec.q_range[0] < spec.q_range[1]):
        raise ValueError(f"q_range must be (min, max) with min < max, got {spec.q_range!r}")


def validate_regularizer(reg: RegularizerSpec) -> None:
    if reg.penalty not in ("none", "quadratic", "huber", "tv"):
        raise ValueError(f"penalty must be one of none, quadratic, huber, tv; got {reg.penalty!r}")
    if not isinstance(reg.window, int) or reg.window < (1 if reg.penalty == "none" else 2):
        raise ValueError(f"window must be an int >= 2, got {reg.window!r}")
    if not (reg.strength > 0 and math.isfinite(reg.strength)):
        raise ValueError(f"strength must be a positive number, got {reg.strength!r}")


@dataclass(frozen=True)
class GrazingSpec:
    """The grazing-incidence part of a reduction (workers/grazing.py). Angles in rad, q in 1/nm,
    sectors in degrees of |χ| from the surface normal.

    gisaxs: the fitted profile is the Yoneda cut I(q_xy) (exit angles αc ± yoneda_half_width,
    None: αc/4); the vertical cut I(q_z) along the rod integrates q_xy in ``rod_q_xy_band``.
    giwaxs: the fitted profile is the out-of-plane wedge, the in-plane wedge is an extra profile,
    Hermans' orientation of the |q| ring ``orientation_q_band`` (None: off) a per-frame scalar.
    Both: (q_xy, q_z) maps on ``qmap_npt`` (n_qxy, n_qz) bins."""
    modality: Literal["gisaxs", "giwaxs"]
    incident_angle: float
    tilt_angle: float = 0.0
    sample_orientation: int = 1                 # pyFAI EXIF orientation; 1: q_z up
    critical_angle: float | None = None         # required for gisaxs
    yoneda_half_width: float | None = None
    rod_q_xy_band: tuple[float, float] | None = None    # required for gisaxs
    out_of_plane_sector: tuple[float, float] = (0.0, 20.0)
    in_plane_sector: tuple[float, float] = (70.0, 90.0)
    orientation_q_band: tuple[float, float] | None = (16.5, 18.5)
    orientation_chi_range: tuple[float, float] = (-90.0, 90.0)
    qmap_npt: tuple[int, int] = (256, 256)
    qmap_q_xy_range: tuple[float, float] | None = None
    qmap_q_z_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class ReductionSpec:
    """Azimuthal integration of a run's frames (workers/integrate.py): ``npt`` bins of ``unit``,
    pixel splitting ``method``, polarization factor (None: no correction), ranges in the unit
    and in degrees of χ; a corrected 2D snapshot of the first frame and of every
    ``snapshot_every``-th seq_num (0: none); ``grazing`` set for gisaxs/giwaxs runs."""
    npt: int = 1000
    unit: Unit = "q_nm^-1"
    method: Method = "bbox"
    polarization: float | None = 0.95
    radial_range: tuple[float, float] | None = None
    azimuth_range: tuple[float, float] | None = None
    snapshot_every: int = 25
    modality: Modality = "saxs"
    grazing: GrazingSpec | None = None

    def integrator_key(self) -> tuple:
        """The fields that decide the integration matrices (not ``snapshot_every``)."""
        return (self.npt, self.unit, self.method, self.polarization, self.radial_range, self.azimuth_range,
                self.modality, self.grazing)


@dataclass(frozen=True, eq=False)
class InversionSpec:
    """Per-frame structural inversion of SAXS profiles (workers/inversion): the encoder's state
    (a checkpoint's dict), bounded LM refinement of at most ``max_iter`` iterations, only the
    points with q in ``q_range`` (1/nm; None: all)."""
    state: dict[str, Any]
    refine: bool = True
    max_iter: int = 40
    q_range: tuple[float, float] | None = None
