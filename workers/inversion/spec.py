"""The SAXS models the inversion offers, the run's inversion spec, and the GISAXS ``Substrate``
(no torch here: the configuration reads the names and default bounds).

Every model is I(q) = sum_k a_k g_k(q; shape) + background, with non-negative linear amplitudes
a_k (``amplitudes``) and nonlinear ``shape`` parameters in [lo, hi] (``log``: searched on a log
grid). Parameters in that order: shape..., amplitudes..., background (``ModelInfo.names``).

| model | shape (bounds) | amplitudes | encoder |
| --- | --- | --- | --- |
| ``sphere_hs`` | radius 2-25 nm, pd 0.02-0.3, volfraction 0-0.4 | i0 | shipped (service/models/saxs_encoder.pt) |
| ``powerlaw_spheres`` | radius 1-300 nm, pd 0.02-0.5, power 1-5 | i0, power_scale | none: grid search |
| ``unified_level`` | rg 0.5-500 nm, power 1-5 | G, B | none: grid search |

(forward models in ``workers.inversion.saxs``). ``sphere_hs``'s bounds are the encoder's
training ranges; the others' span what SAXS and USAXS measure (q 0.002-5 1/nm).

GISAXS (``GISAXS_MODELS``, ``workers.inversion.gisaxs`` (Born) and ``workers.inversion.dwba``
(``_dwba``: the distorted-wave Born approximation on a ``Substrate``)), amplitude i0:

| model | shape (bounds) |
| --- | --- |
| ``spheres_paracrystal[_dwba]`` | radius 1-30 nm, pd 0.02-0.2, distance 5-100 nm, disorder 0.05-0.3 |
| ``cylinders_paracrystal[_dwba]`` | radius 1-30 nm, pd 0.02-0.2, height 1-60 nm, distance 5-100 nm, disorder 0.05-0.3 |
| ``spheres_hard_disk[_dwba]`` | radius 1-30 nm, pd 0.02-0.2, coverage 0.05-0.6 |

``spheres_histogram_paracrystal_dwba`` (``HISTOGRAM_MODELS``): distance 5-100 nm, disorder
0.05-0.3 and a histogram of the radii on the encoder checkpoint's bins (LM on the bins' logits,
``workers.inversion.histogram_map``; the checkpoint's ranges, distance 12-40 nm, are the
defaults where it is loaded).

pd <= 0.2 keeps the Gauss-Hermite radii positive; the shipped encoder (spheres, Born maps)
narrows radius to 2-8 nm and distance to 12-40 nm where it gives the start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from workers.specs import InversionSpec


@dataclass(frozen=True)
class ModelInfo:
    """Names, default bounds and search grid of one SAXS model (module docstring)."""
    name: str
    shape: tuple[str, ...]
    amplitudes: tuple[str, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    log: tuple[bool, ...]
    grid: tuple[int, ...]         # grid-search points per shape parameter

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.shape, *self.amplitudes, "background")


SAXS_MODELS: dict[str, ModelInfo] = {m.name: m for m in (
    ModelInfo("sphere_hs", ("radius", "pd", "volfraction"), ("i0",), (2.0, 0.02, 0.0), (25.0, 0.3, 0.4),
              (True, False, False), (24, 3, 3)),
    ModelInfo("powerlaw_spheres", ("radius", "pd", "power"), ("i0", "power_scale"), (1.0, 0.02, 1.0),
              (300.0, 0.5, 5.0), (True, False, False), (24, 3, 9)),
    ModelInfo("unified_level", ("rg", "power"), ("G", "B"), (0.5, 1.0), (500.0, 5.0), (True, False), (32, 9)),
)}


def _gisaxs_models() -> dict[str, ModelInfo]:
    r, pd, dist, dis = (1.0, 30.0, True, 16), (0.02, 0.2, False, 2), (5.0, 100.0, True, 8), (0.05, 0.3, False, 2)
    kinds = {"spheres_paracrystal": (("radius", r), ("pd", pd), ("distance", dist), ("disorder", dis)),
             "cylinders_paracrystal": (("radius", (1.0, 30.0, True, 12)), ("pd", pd), ("height", (1.0, 60.0, True, 4)),
                                       ("distance", (5.0, 100.0, True, 6)), ("disorder", dis)),
             "spheres_hard_disk": (("radius", (1.0, 30.0, True, 24)), ("pd", pd), ("coverage", (0.05, 0.6, False, 4)))}
    out = {}
    for kind, params in kinds.items():
        for name in (kind, kind + "_dwba"):
            out[name] = ModelInfo(name, tuple(p for p, _ in params), ("i0",), tuple(v[0] for _, v in params),
                                  tuple(v[1] for _, v in params), tuple(v[2] for _, v in params),
                                  tuple(v[3] for _, v in params))
    return out


GISAXS_MODELS: dict[str, ModelInfo] = _gisaxs_models()

# a radius histogram instead of a Gaussian size (``workers.inversion.histogram_map``): shape
# parameters distance, disorder; the histogram's K logits are the LM's too, on the encoder
# checkpoint's radius bins (service/models/gisaxs_dwba_encoder.pt: 16 bins, 2-8 nm)
HISTOGRAM_MODELS: dict[str, ModelInfo] = {m.name: m for m in (
    ModelInfo("spheres_histogram_paracrystal_dwba", ("distance", "disorder"), ("i0",), (5.0, 0.05), (100.0, 0.3),
              (True, False), (24, 1)),
)}


def is_dwba(model: str) -> bool:
    """The GISAXS model needs a Substrate (the DWBA)."""
    return model.endswith("_dwba")


def shape_bounds(model: str, overrides: tuple[tuple[str, float, float], ...] | dict = ()) -> tuple[tuple, tuple]:
    """(lo, hi) of ``model``'s shape parameters (a SAXS_MODELS or GISAXS_MODELS key): its
    defaults, replaced by ``overrides`` ((name, lo, hi) triples or {name: (lo, hi)}).
    ValueError naming the model, parameter or bound."""
    models = {**SAXS_MODELS, **GISAXS_MODELS, **HISTOGRAM_MODELS}
    if model not in models:
        raise ValueError(f"inversion model must be one of {tuple(models)}, got {model!r}")
    info = models[model]
    items = overrides.items() if isinstance(overrides, dict) else ((n, (a, b)) for n, a, b in overrides)
    lo, hi = list(info.lo), list(info.hi)
    for name, (a, b) in items:
        if name not in info.shape:
            raise ValueError(f"inversion bounds: {name!r} is not a shape parameter of {model} {info.shape}")
        a, b = float(a), float(b)
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            raise ValueError(f"inversion bounds: {name} needs finite lo < hi, got ({a}, {b})")
        j = info.shape.index(name)
        if info.log[j] and not a > 0:
            raise ValueError(f"inversion bounds: {name} is a size, its lower bound must be > 0, got {a}")
        lo[j], hi[j] = a, b
    return tuple(lo), tuple(hi)


def _check_starts_and_verdict(n_starts: int, good_p_value: float, bad_chi2: float) -> None:
    """ValueError unless the grid-search starts and the verdict's thresholds are usable."""
    if not 1 <= n_starts <= 16:
        raise ValueError(f"inversion n_starts must be in 1..16, got {n_starts!r}")
    if not 0 < good_p_value < 1 or not bad_chi2 > 1:
        raise ValueError(f"inversion needs 0 < good_p_value < 1 and bad_chi2 > 1, got "
                         f"{good_p_value!r}, {bad_chi2!r}")


@dataclass(frozen=True, eq=False)
class SaxsInversionSpec(InversionSpec):
    """InversionSpec (``state``: the encoder checkpoint, or None; refine, max_iter, q_range) and:

    model: a SAXS_MODELS key; bounds: (name, lo, hi) overrides of its shape bounds;
    min_q_overlap: the encoder gives the LM's start only when at least this fraction of the
    profiles' log-q span lies inside the encoder's grid (else: grid search); n_starts: LM
    starts from the grid search; good_p_value, bad_chi2: the fit-quality verdict's thresholds
    (``workers.inversion.quality``)."""
    model: str = "sphere_hs"
    bounds: tuple[tuple[str, float, float], ...] = ()
    min_q_overlap: float = 0.5
    n_starts: int = 3
    good_p_value: float = 1e-3
    bad_chi2: float = 4.0

    def __post_init__(self):
        shape_bounds(self.model, self.bounds)
        if not 0 < self.min_q_overlap <= 1:
            raise ValueError(f"inversion min_q_overlap must be in (0, 1], got {self.min_q_overlap!r}")
        _check_starts_and_verdict(self.n_starts, self.good_p_value, self.bad_chi2)


@dataclass(frozen=True)
class Substrate:
    """What GISAXS particles sit on (``workers.inversion.dwba``): a substrate of refractive index
    n = 1 - delta + i beta under vacuum; film_thickness (nm) > 0 adds one film of index
    1 - film_delta + i film_beta on it. All values finite and >= 0."""
    delta: float
    beta: float
    film_delta: float = 0.0
    film_beta: float = 0.0
    film_thickness: float = 0.0

    def __post_init__(self):
        vals = (self.delta, self.beta, self.film_delta, self.film_beta, self.film_thickness)
        if not all(math.isfinite(v) and v >= 0 for v in vals):
            raise ValueError(f"Substrate: delta, beta and the film's values must be finite and >= 0, got {vals}")


def check_qmap_npt(npt) -> None:
    """ValueError unless npt is two bin counts (n_qxy, n_qz) in 4..2048."""
    if not (len(npt) == 2 and all(4 <= int(n) <= 2048 for n in npt)):
        raise ValueError(f"qmap_npt must be two bin counts in 4..2048, got {tuple(npt)!r}")


@dataclass(frozen=True, eq=False)
class GisaxsInversionSpec(InversionSpec):
    """Per-frame inversion of a GISAXS run's (q_xy, q_z) map (``workers.inversion.maps``,
    ``GisaxsInverter.invert_map``). InversionSpec (``state``: the map encoder's checkpoint or
    None; refine, max_iter; ``q_range``: the |q_xy| band (1/nm) of the fitted bins, None: all)
    and:

    model: a GISAXS_MODELS or HISTOGRAM_MODELS key (the latter needs ``state`` with
    radius_bins); substrate: the DWBA's (delta, beta at the run's energy; None: the
    checkpoint's ``substrate``); bounds: (name, lo, hi) overrides of the shape bounds;
    qmap_npt: (n_qxy, n_qz) bins of the fitted map; min_map_overlap: the encoder gives the LM's
    start only when the run's map covers at least this fraction of its grid's pixels (else, and
    when the incidence angles differ by more than 2x: grid search); n_starts, good_p_value,
    bad_chi2: as SaxsInversionSpec."""
    model: str = "spheres_paracrystal_dwba"
    substrate: Substrate | None = None
    bounds: tuple[tuple[str, float, float], ...] = ()
    qmap_npt: tuple[int, int] = (128, 128)
    min_map_overlap: float = 0.5
    n_starts: int = 2
    good_p_value: float = 1e-3
    bad_chi2: float = 4.0

    def __post_init__(self):
        if self.model not in GISAXS_MODELS and self.model not in HISTOGRAM_MODELS:
            raise ValueError(f"GISAXS inversion model must be one of {(*GISAXS_MODELS, *HISTOGRAM_MODELS)}, "
                             f"got {self.model!r}")
        if self.model in HISTOGRAM_MODELS and "radius_bins" not in (self.state or {}):
            raise ValueError(f"the {self.model} model needs its encoder checkpoint (radius_bins; "
                             "service/models/gisaxs_dwba_encoder.pt)")
        shape_bounds(self.model, self.bounds)
        if is_dwba(self.model) and self.substrate is None and not (self.state or {}).get("substrate"):
            raise ValueError(f"substrate: the {self.model} model needs the substrate's delta and beta "
                             "(at the run's energy)")
        check_qmap_npt(self.qmap_npt)
        if not 0 < self.min_map_overlap <= 1:
            raise ValueError(f"inversion min_map_overlap must be in (0, 1], got {self.min_map_overlap!r}")
        _check_starts_and_verdict(self.n_starts, self.good_p_value, self.bad_chi2)
