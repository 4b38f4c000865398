"""The edge where a run's settings become the workers' frozen `RunSpec` (workers/pipeline.py):
configuration, then the start document's keys (service/detectors.py), geometry, mask, dark and
flat images, the phase classifier and inversion encoder (each read once per service).

Bad values raise ValueError naming the key; a size above its ceiling (``limits``) raises
LimitExceeded naming the key, the value and the ceiling, before anything is allocated; a
missing checkpoint, or configured settings above a ceiling, is a ConfigError at start.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import ValidationError

from workers.specs import GRAZING, GrazingSpec, ReductionSpec

from .config import FitConfig, InversionConfig, LimitsConfig, ReductionConfig, Settings
from .detectors import DETECTOR_DOC_KEY, detector_entries, run_settings
from .errors import ConfigError, LimitExceeded
from .images import read_image

log = logging.getLogger(__name__)

MODELS = Path(__file__).parent / "models"          # checkpoints shipped with the service


def check_limits(r: ReductionConfig, fit: FitConfig, limits: LimitsConfig) -> None:
    """LimitExceeded naming the first size of these settings above its ceiling."""
    sizes = (("reduction.npt", r.npt, "npt"), ("reduction.qmap_npt", max(r.qmap_npt), "qmap_npt"),
             ("fit.peaks", len(fit.peaks), "peaks"), ("fit.regularizer.window", fit.regularizer.window, "window"))
    for key, value, ceiling in sizes:
        _check(key, value, ceiling, limits)


def _check(key: str, value: int, ceiling: str, limits: LimitsConfig) -> None:
    most = getattr(limits, ceiling)
    if value > most:
        raise LimitExceeded(f"{key} = {value} is above the ceiling limits.{ceiling} = {most}")


def reduction_spec(r: ReductionConfig, fit: FitConfig) -> ReductionSpec:
    """The ReductionSpec of merged settings; ValueError naming the key where a grazing
    modality lacks what it needs."""
    grazing = grazing_spec(r, fit) if r.modality in GRAZING else None
    return ReductionSpec(npt=r.npt, unit=r.unit, method=r.method, polarization=r.polarization,
                         radial_range=r.radial_range, azimuth_range=r.azimuth_range,
                         snapshot_every=r.snapshot_every, modality=r.modality, grazing=grazing)


def grazing_spec(r: ReductionConfig, fit: FitConfig) -> GrazingSpec:
    modality = r.modality
    if r.incident_angle is None:
        raise ValueError(f"modality {modality!r} needs reduction.incident_angle (rad), "
                         "or start['scatterflow']['incident_angle']")
    if r.method not in ("no", "bbox"):
        raise ValueError(f"modality {modality!r} supports reduction.method 'no' or 'bbox', got {r.method!r}")
    if r.unit != "q_nm^-1":
        raise ValueError(f"modality {modality!r} works in q_nm^-1, got reduction.unit {r.unit!r}")
    if r.azimuth_range is not None:
        raise ValueError(f"reduction.azimuth_range applies to saxs/waxs only, got {r.azimuth_range!r}")
    band = None
    if modality == "gisaxs":
        if r.critical_angle is None:
            raise ValueError("modality 'gisaxs' needs reduction.critical_angle (rad) for the Yoneda cut")
        if r.yoneda_half_width is not None and not r.yoneda_half_width < r.critical_angle:
            raise ValueError(f"reduction.yoneda_half_width must be < critical_angle {r.critical_angle}, "
                             f"got {r.yoneda_half_width!r}")
        band = rod_band(r, fit)
    return GrazingSpec(modality=modality, incident_angle=r.incident_angle, tilt_angle=r.tilt_angle,
                       sample_orientation=r.sample_orientation, critical_angle=r.critical_angle,
                       yoneda_half_width=r.yoneda_half_width, rod_q_xy_band=band,
                       out_of_plane_sector=r.out_of_plane_sector, in_plane_sector=r.in_plane_sector,
                       orientation_q_band=r.orientation_q_band, orientation_chi_range=r.orientation_chi_range,
                       qmap_npt=r.qmap_npt, qmap_q_xy_range=r.qmap_q_xy_range, qmap_q_z_range=r.qmap_q_z_range)


def rod_band(r: ReductionConfig, fit: FitConfig) -> tuple[float, float]:
    """q_xy band (1/nm) of the GISAXS vertical cut: ``reduction.rod_q_xy_band``, else the
    first fitted peak's centre ± its FWHM."""
    band = r.rod_q_xy_band
    if band is None:
        if not fit.peaks:
            raise ValueError("reduction.rod_q_xy_band is unset and the fit has no peak to centre it on")
        c, w = float(fit.peaks[0].center), float(fit.peaks[0].fwhm)
        band = (c - w, c + w)
    lo, hi = (float(v) for v in band)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"rod q_xy band must satisfy 0 < lo < hi (1/nm), got {tuple(band)!r}")
    return lo, hi


class RunSpecBuilder:
    """``build(start, calibrated)`` -> RunSpec for the analysis of ``start`` (a detector's copy
    for a multi-detector run). Checkpoints are read at construction: a bad path fails the
    service's start, not each run."""

    def __init__(self, settings: Settings):
        self.settings = settings
        try:
            check_limits(settings.reduction, settings.fit, settings.limits)
        except LimitExceeded as exc:
            raise ConfigError(f"configuration: {exc}") from None
        self.phases = self._phase_spec()
        self.phase_checkpoint = self._phase_checkpoint()
        model = settings.fit.model_spec()
        try:
            if self.phases is not None:
                self.phases.check_peaks([p.name for p in model.peaks] if model is not None else [])
        except ValueError as exc:       # said once here; runs whose own fit lacks them are logged at INFO
            log.warning("phases: %s; only runs whose own fit (start['scatterflow']['fit']) has them get phases "
                        "(phases.enabled: false turns this off)", exc)
        self.inversion = self._inversion_spec()

    def build(self, start: dict, calibrated=None):
        """``calibrated``: the Geometry of the service's last calibrant run, used when the start
        document names no detector geometry of its own."""
        from workers.geometry import Geometry
        from workers.pipeline import RunSpec
        g, limits = self.settings.geometry, self.settings.limits
        if DETECTOR_DOC_KEY not in start:          # above the ceiling, ingest opened one analysis for them all
            _check("start.scatterflow detector entries", len(detector_entries(start)), "detectors", limits)
        run = run_settings(start, self.settings.reduction, self.settings.fit)   # modality, per-run/detector keys
        check_limits(run.reduction, run.fit, limits)        # before any array is sized by them
        reduction = reduction_spec(run.reduction, run.fit)
        if run.geometry is not None:                        # the detector's own PONI mapping (start document)
            geometry = Geometry.from_pyfai(_pyfai_load(run.geometry, "start.scatterflow detector geometry"))
        elif calibrated is not None:
            geometry = calibrated
        elif g.poni is not None:
            geometry = Geometry.from_poni(g.poni)
        elif isinstance(start.get("geometry"), dict):       # a PONI mapping, as pyFAI's get_config()
            geometry = Geometry.from_pyfai(_pyfai_load(start["geometry"], "start.geometry"))
        else:       # fine for runs of reduced 1D profiles; 2D frames of this run fail as "no_geometry"
            log.info("run %s: no geometry (geometry.poni unset, no 'geometry' in the start document)",
                        str(start.get("uid", "?"))[:8])
            geometry = None
        if geometry is not None and geometry.shape is not None:     # before a mask or matrix of that size
            _check("detector pixels", int(geometry.shape[0]) * int(geometry.shape[1]), "detector_pixels", limits)
        mask = _image_for(g.mask, geometry, "mask")
        mask = mask.astype(bool) if mask is not None else None
        if mask is not None and geometry is not None:
            mask = mask | geometry.detector_mask()
        calibrant = start.get("calibrant")
        if calibrant is not None and not isinstance(calibrant, str):
            raise ValueError(f"start document 'calibrant' must be a calibrant name, got {calibrant!r}")
        model = run.fit.model_spec()
        phases = self.phases
        if phases is not None:
            names = [] if model is None else [p.name for p in model.peaks]
            try:
                if not names:
                    raise ValueError("no peaks are fitted")
                phases.check_peaks(names)
            except ValueError as exc:
                log.info("run %s: no phase identification: %s", str(start.get("uid", "?"))[:8], exc)
                phases = None
        return RunSpec(geometry=geometry, reduction=reduction, model=model, regularizer=run.fit.regularizer,
                       phases=phases, phase_checkpoint=self.phase_checkpoint if phases is not None else None,
                       inversion=self._run_inversion(start, reduction.modality), mask=mask,
                       dark=_image_for(g.dark, geometry, "dark"),
                       flat=_image_for(g.flat, geometry, "flat"), calibrant=calibrant)

    def _phase_spec(self):
        cfg = self.settings.phases
        if not cfg.enabled:
            return None
        from workers.phase import phase_spec_from_dict
        try:
            return phase_spec_from_dict(dict(cfg.spec))
        except ValueError as exc:
            raise ConfigError(f"phases.spec: {exc}") from None

    def _phase_checkpoint(self) -> dict | None:
        cfg = self.settings.phases
        if not cfg.enabled or cfg.checkpoint is None:
            return None
        path = MODELS / "phase_classifier.pt" if cfg.checkpoint == "default" else Path(cfg.checkpoint)
        if not path.is_file():
            if cfg.checkpoint != "default":
                raise ConfigError(f"phases.checkpoint: no file {path}")
            log.warning("no phase classifier at %s: phases from rules on the fitted parameters", path)
            return None
        import torch
        log.info("phase classifier: %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)

    def _inversion_spec(self):
        """The configuration's inversion (None: off); reads the encoder checkpoint once."""
        cfg = self.settings.inversion
        self._encoder = self._load_encoder(cfg) if cfg.enabled else _UNREAD
        self._gisaxs_states: dict[str, dict | None] = {}  # GISAXS map encoders read, by resolved path
        if cfg.enabled:
            self._gisaxs_encoder(cfg.gisaxs.checkpoint, cfg.gisaxs.model)
        return self._saxs_inversion(cfg) if cfg.enabled else None

    def _load_encoder(self, cfg: InversionConfig) -> dict | None:
        """The SAXS encoder of ``inversion.checkpoint``; None where the default is missing and the
        model is not sphere_hs (the LM starts from a grid search then)."""
        path = MODELS / "saxs_encoder.pt" if cfg.checkpoint == "default" else Path(cfg.checkpoint)
        if not path.is_file():
            if cfg.checkpoint != "default" or cfg.model == "sphere_hs":
                raise ConfigError(f"inversion.checkpoint: no file {path}")
            log.info("no SAXS inversion encoder at %s: LM from a grid search", path)
            return None
        import torch
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("model") != "sphere_hs":
            raise ConfigError(f"inversion.checkpoint: {path} is a {state.get('model')!r} encoder; "
                              "per-frame inversion takes SAXS profiles (sphere_hs)")
        log.info("SAXS inversion encoder: %s", path)
        return state

    def _saxs_inversion(self, cfg: InversionConfig):
        from workers.inversion.spec import SaxsInversionSpec
        return SaxsInversionSpec(state=self._encoder, refine=cfg.refine, max_iter=cfg.max_iter, q_range=cfg.q_range,
                                 model=cfg.model, bounds=tuple((k, lo, hi) for k, (lo, hi) in cfg.bounds.items()),
                                 min_q_overlap=cfg.min_q_overlap, n_starts=cfg.n_starts,
                                 good_p_value=cfg.good_p_value, bad_chi2=cfg.bad_chi2)

    def _run_inversion(self, start: dict, modality: str):
        """The run's inversion: the configuration's, with the keys of start["scatterflow"]["inversion"]
        (any InversionConfig key but the checkpoints: a start document names no files); a gisaxs
        run's inverts its (q_xy, q_z) map (``_gisaxs_inversion``). ValueError naming the key for a
        bad value."""
        hints = start.get("scatterflow")
        over = hints.get("inversion") if isinstance(hints, dict) else None
        where = "start.scatterflow.inversion"
        if over is None:
            if modality != "gisaxs":
                return self.inversion
            cfg, where = self.settings.inversion, "inversion"
        else:
            cfg = self._merged_inversion(over, where)
        if not cfg.enabled:
            return None
        if modality == "gisaxs":
            return self._gisaxs_inversion(cfg, where, str(start.get("uid", "?"))[:8])
        if self._encoder is _UNREAD:                  # inversion off in the configuration, on for this run
            try:
                self._encoder = self._load_encoder(self.settings.inversion.model_copy(update={"model": cfg.model}))
            except ConfigError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return self._saxs_inversion(cfg)

    def _merged_inversion(self, over, where: str) -> InversionConfig:
        if not isinstance(over, dict):
            raise ValueError(f"{where} must be a mapping, got {over!r}")
        if "checkpoint" in over or (isinstance(over.get("gisaxs"), dict) and "checkpoint" in over["gisaxs"]):
            raise ValueError(f"{where}.checkpoint: a start document may not name files")
        base = self.settings.inversion.model_dump()
        if isinstance(over.get("gisaxs"), dict):      # its keys over the configuration's, the checkpoint kept
            over = {**over, "gisaxs": {**base["gisaxs"], **over["gisaxs"]}}
        try:
            return InversionConfig.model_validate({**base, **over})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}{'.' + loc if loc else ''}: {err['msg']}") from None

    def _gisaxs_inversion(self, cfg: InversionConfig, where: str, run: str):
        """The GisaxsInversionSpec of a gisaxs run (workers/inversion/spec.py); the map encoder
        of ``inversion.gisaxs.checkpoint`` read once (None: LM from a grid search). A DWBA model
        without a substrate: no inversion for the run (a warning), its reduction goes on."""
        from workers.inversion.spec import GisaxsInversionSpec, Substrate, is_dwba
        g = cfg.gisaxs
        _check(f"{where}.gisaxs.qmap_npt", max(g.qmap_npt), "qmap_npt", self.settings.limits)
        try:
            state = self._gisaxs_encoder(g.checkpoint, g.model)
        except ConfigError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if is_dwba(g.model) and cfg.substrate is None and not (state or {}).get("substrate"):
            log.warning("run %s: no inversion: the %s model needs %s.substrate (delta, beta at the run's "
                        "energy), or gisaxs.model: %s for the Born approximation", run, g.model, where,
                        g.model.removesuffix("_dwba"))
            return None
        try:
            return GisaxsInversionSpec(
                state=state, refine=cfg.refine, max_iter=cfg.max_iter, q_range=cfg.q_range,
                model=g.model, substrate=None if cfg.substrate is None else Substrate(**cfg.substrate.model_dump()),
                bounds=tuple((k, lo, hi) for k, (lo, hi) in g.bounds.items()), qmap_npt=tuple(g.qmap_npt),
                min_map_overlap=cfg.min_q_overlap, n_starts=cfg.n_starts, good_p_value=cfg.good_p_value,
                bad_chi2=cfg.bad_chi2)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def _gisaxs_encoder(self, checkpoint: str | None, model: str) -> dict | None:
        """The map encoder of ``checkpoint`` for ``model``, read once per file ("default":
        service/models/gisaxs_encoder.pt, or gisaxs_dwba_encoder.pt for a histogram model)."""
        from workers.inversion.spec import HISTOGRAM_MODELS
        if checkpoint is None:
            if model in HISTOGRAM_MODELS:
                raise ConfigError(f"inversion.gisaxs.checkpoint: the {model} model needs its encoder "
                                  "(the checkpoint holds the radius bins)")
            return None
        default = "gisaxs_dwba_encoder.pt" if model in HISTOGRAM_MODELS else "gisaxs_encoder.pt"
        path = MODELS / default if checkpoint == "default" else Path(checkpoint)
        key = str(path)
        if key not in self._gisaxs_states:
            self._gisaxs_states[key] = self._load_gisaxs_encoder(path, checkpoint == "default"
                                                                 and model not in HISTOGRAM_MODELS)
        return self._gisaxs_states[key]

    @staticmethod
    def _load_gisaxs_encoder(path: Path, optional: bool) -> dict | None:
        if not path.is_file():
            if not optional:
                raise ConfigError(f"inversion.gisaxs.checkpoint: no file {path}")
            log.info("no GISAXS inversion encoder at %s: LM from a grid search", path)
            return None
        import torch
        log.info("GISAXS inversion encoder: %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)


_UNREAD = object()          # the encoder checkpoint not read yet


def _pyfai_load(mapping: dict, where: str):
    """pyFAI's integrator of a start document's PONI mapping. pyFAI reads a file for a detector
    named by a path (NexusDetector) and for a spline file: a document may name neither
    (ValueError naming the key), so that it reads nothing outside ingest's confined roots."""
    import pyFAI
    import pyFAI.detectors
    config = mapping.get("detector_config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}.detector_config must be a mapping, got {type(config).__name__}")
    files = [str(k) for k, v in (*mapping.items(), *config.items()) if "file" in str(k).lower() and v]
    if files:
        raise ValueError(f"{where}: a start document may not name files ({files[0]})")
    name = mapping.get("detector", "Detector")
    known = pyFAI.detectors.Detector.registry
    cls = getattr(pyFAI.detectors, name, None) if isinstance(name, str) else None
    if not (isinstance(name, str) and (name.lower() in known or name.lower().replace(" ", "_") in known
                                       or isinstance(cls, type) and issubclass(cls, pyFAI.detectors.Detector))):
        raise ValueError(f"{where}.detector: {name!r} is not a pyFAI detector name")
    return pyFAI.load(mapping)


def _image_for(path, geometry, what: str):
    """The configured mask/dark/flat image, or None when unset or when its shape is not the
    detector's (another detector of a multi-detector run: logged, not applied)."""
    if not path:
        return None
    image = read_image(path)
    if geometry is not None and geometry.shape is not None and tuple(image.shape) != tuple(geometry.shape):
        log.warning("geometry.%s %s has shape %s, the detector %s: not applied", what, path, image.shape,
                    tuple(geometry.shape))
        return None
    return image
