"""Service configuration: one YAML file validated by pydantic, every key overridable by
environment variables ``SCATTERFLOW_<SECTION>__<KEY>`` (e.g. ``SCATTERFLOW_API__PORT=8001``).

Defaults run the demo with nothing set. Errors surface as one clear line (`ConfigError`).
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from workers.specs import (BackgroundSpec, ModelSpec, PeakSpec, RegularizerSpec, validate_model_spec,
                           validate_regularizer)

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(_Section):
    address: str = "tcp://127.0.0.1:5578"
    prefix: str = ""
    serializer: Literal["msgpack", "pickle"] = "msgpack"
    allow_pickle: bool = False
    detector_field: str | None = None       # None: the first 2D field of the descriptor
    detector_fields: list[str] = Field(default_factory=list)   # 2+ fields: one analysis per detector (service/detectors.py)
    profile_intensity_field: str = "intensity"   # reduced 1D profiles (no 2D field): go straight to fitting
    profile_q_field: str = "q"              # 1/nm
    profile_sigma_field: str = "sigma"
    max_message_bytes: int = Field(256 * 2**20, ge=1)   # larger messages are rejected ("message_too_large")
    max_frame_pixels: int = Field(64 * 2**20, ge=1)     # larger frames are rejected ("frame_too_large")
    max_objects: int = Field(2**20, ge=1)   # msgpack objects per message ("too_complex"): ~60 bytes each once built
    max_depth: int = Field(64, ge=1)        # msgpack nesting per message ("too_complex"): JSON/Tiled recurse
    max_open_runs: int = Field(64, ge=1)    # runs without a stop document kept at once; past it the idlest is evicted
    max_seq_gap: int = Field(5000, ge=0)    # a seq_num further ahead is refused ("seq_num_out_of_range"), not counted lost
    max_queue_bytes: int = Field(2 * 2**30, ge=1)   # bytes waiting in the receive queue; receive blocks past it
    queue_size: int = 1000                  # bounded receive queue (documents)
    root_map: dict[str, str] = Field(default_factory=dict)   # resource roots -> local paths
    # local directories documents may name without a root_map entry; none: such paths are refused
    # ("path_outside_root"), as are paths that resolve (.., symlinks) outside their root
    allowed_roots: list[str] = Field(default_factory=list)
    file_retries: int = Field(20, ge=0)     # waits for frames not yet in a file being written
    file_retry_delay_s: float = Field(0.05, ge=0)
    file_open_timeout_s: float = Field(5.0, gt=0)   # a read blocked longer (plus its retry waits) is abandoned
    rcvhwm: int = 100_000
    # CURVE encryption and authentication with bluesky's proxy (`bluesky-0MQ-proxy --out-curve-secret
    # ... --out-curve-client-keys DIR`): this service's secret key file and the proxy's public key
    # file, as zmq.auth.create_certificates writes them (bluesky's ClientCurve)
    curve_secret_key: str | None = None
    curve_server_public_key: str | None = None

    @model_validator(mode="after")
    def _curve_pair(self):
        if (self.curve_secret_key is None) != (self.curve_server_public_key is None):
            raise ValueError("curve_secret_key and curve_server_public_key go together")
        for path in filter(None, (self.curve_secret_key, self.curve_server_public_key)):
            if not os.path.isfile(path):
                raise ValueError(f"no CURVE key file {path}")
        return self

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[str]) -> list[str]:
        for root in roots:
            if not os.path.isabs(root):
                raise ValueError(f"allowed_roots must be absolute paths, got {root!r}")
        return roots


class GeometryConfig(_Section):
    poni: Path | None = None                # None: the PONI mapping `geometry` of the run's start document
    mask: Path | None = None
    dark: Path | None = None
    flat: Path | None = None


class ReductionConfig(_Section):
    npt: int = Field(1000, gt=1)
    unit: Literal["q_nm^-1", "q_A^-1", "2th_deg"] = "q_nm^-1"
    method: Literal["no", "bbox", "full"] = "bbox"
    polarization: float | None = 0.95
    radial_range: tuple[float, float] | None = None
    azimuth_range: tuple[float, float] | None = None
    snapshot_every: int = Field(25, ge=0)   # corrected 2D snapshot every n-th seq_num (+ the first frame); 0 = off
    # modality (workers/pipeline.py); a run's start document may override it and the angles
    # (start["scatterflow"]: modality, incident_angle, ...; see service/detectors.py).
    # saxs/waxs: transmission, 1D azimuthal profile; gisaxs: Yoneda cut I(q_xy) fitted, vertical
    # cut along the rod, q_xy/q_z maps; giwaxs: out-of-plane wedge I(q) fitted, in-plane wedge,
    # Hermans orientation, q_xy/q_z maps. Angles in rad, q in 1/nm, sectors in deg.
    modality: Literal["saxs", "waxs", "gisaxs", "giwaxs"] = "saxs"
    incident_angle: float | None = Field(None, ge=0.0, lt=1.5707963)   # αi; required for gisaxs/giwaxs
    tilt_angle: float = Field(0.0, gt=-1.5707963, lt=1.5707963)       # roll of the surface about the beam
    sample_orientation: int = Field(1, ge=1, le=8)                    # pyFAI EXIF orientation; 1: q_z up
    critical_angle: float | None = Field(None, gt=0.0, lt=1.5707963)   # αc of the film; required for gisaxs
    yoneda_half_width: float | None = Field(None, gt=0.0)   # gisaxs: Yoneda band αc ± this (None: αc/4)
    rod_q_xy_band: tuple[float, float] | None = None        # gisaxs vertical cut; None: first peak centre ± FWHM
    out_of_plane_sector: tuple[float, float] = (0.0, 20.0)  # giwaxs fitted wedge, |χ| from the surface normal
    in_plane_sector: tuple[float, float] = (70.0, 90.0)     # giwaxs in-plane wedge
    orientation_q_band: tuple[float, float] | None = (16.5, 18.5)   # giwaxs Hermans f of this |q| ring; None: off
    orientation_chi_range: tuple[float, float] = (-90.0, 90.0)      # its χ range (deg)
    qmap_npt: tuple[int, int] = (256, 256)                  # (n_qxy, n_qz) of the map snapshots (grazing)
    qmap_q_xy_range: tuple[float, float] | None = None      # None: the detector's extent
    qmap_q_z_range: tuple[float, float] | None = None

    @field_validator("qmap_npt")
    @classmethod
    def _qmap_bins(cls, npt: tuple[int, int]) -> tuple[int, int]:
        if min(npt) < 2:
            raise ValueError(f"qmap_npt needs at least 2 bins per axis, got {npt!r}")
        return npt


def _default_peaks() -> list[PeakSpec]:
    # The simulated azopolymer film (service/sim): lamellar peak, amorphous halo, pi-pi stacking.
    return [PeakSpec(name="lamellar", shape="pseudo_voigt", center=3.2, fwhm=0.2,
                     center_min=2.7, center_max=3.6, fwhm_min=0.03, fwhm_max=1.0),
            PeakSpec(name="halo", shape="pseudo_voigt", center=14.0, fwhm=5.0,
                     center_min=12.0, center_max=16.0, fwhm_min=2.0, fwhm_max=9.0),
            PeakSpec(name="pi_pi", shape="pseudo_voigt", center=17.5, fwhm=1.0,
                     center_min=16.5, center_max=18.5, fwhm_min=0.2, fwhm_max=3.0)]


class FitConfig(_Section):
    """Peaks, background and temporal regularizer as the workers' own specs (workers/specs.py),
    validated here, at the edge. ``peaks: []`` turns peak fitting off."""
    q_range: tuple[float, float] | None = (2.0, 19.5)
    background: BackgroundSpec = BackgroundSpec(kind="power_law")
    peaks: list[PeakSpec] = Field(default_factory=_default_peaks)
    regularizer: RegularizerSpec = RegularizerSpec()

    @field_validator("peaks", mode="before")
    @classmethod
    def _centre_given(cls, peaks):
        for p in peaks if isinstance(peaks, (list, tuple)) else ():
            if isinstance(p, dict) and "center" not in p:
                raise ValueError(f"peak {p.get('name')!r} needs a center")
        return peaks

    @model_validator(mode="after")
    def _valid_specs(self) -> "FitConfig":
        validate_regularizer(self.regularizer)
        model = self.model_spec()
        if model is not None:
            validate_model_spec(model)
        return self

    def model_spec(self) -> ModelSpec | None:
        """The fit model of these settings; None without peaks."""
        if not self.peaks:
            return None
        return ModelSpec(tuple(self.peaks), self.background,
                         None if self.q_range is None else (float(self.q_range[0]), float(self.q_range[1])))


class WorkersConfig(_Section):
    count: int = Field(1, ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch: int | Literal["auto"] = "auto"   # frames per batch; auto: by load (service/dispatch.py)
    max_batch: int = Field(64, ge=1)
    max_batch_pixels: int = Field(32_000_000, ge=1)   # and at most this many pixels per batch
    threads: int | None = Field(None, ge=1)  # torch threads per CPU worker; None: cores / (count + 1)
    latency_budget_s: float = Field(0.05, gt=0)   # fixed batch: send a partial one after this
    queue_batches: int = Field(8, ge=1)     # bounded queue per worker, in batches
    backpressure: Literal["block", "drop_oldest"] = "block"
    shared_memory: bool = True              # frames to workers through /dev/shm, not pickled (service/frame_slots.py)
    # engine: local processes on this host (service/worker.py), or Ray actors across a cluster's
    # nodes and GPUs (service/ray_engine.py; `pip install 'scatterflow[ray]'`)
    engine: Literal["local", "ray"] = "local"
    # ray.init's address: "auto" (the cluster this host is a node of), "host:port" (its GCS),
    # "ray://host:10001" (Ray Client to a remote head), or "local" (a private one-node Ray started here)
    ray_address: str = "auto"
    ray_object_store_mb: int | None = Field(None, ge=75)   # only for "local": its object store size


class TiledConfig(_Section):
    enabled: bool = True                    # false: no Tiled publishing (REST and results stream only)
    uri: str | None = None                  # None: embedded server under `directory`
    api_key: SecretStr | None = None        # masked in repr and JSON dumps; `secret()` unwraps it
    directory: Path = Path("./var/tiled")
    # the embedded server (uri None): its port (0: a free one) and, without api_key, a random key
    # written to <directory>/api_key (owner-only) for other processes (tiled clients, reports)
    port: int = Field(0, ge=0, le=65535)
    # Tiled is the archive (live consumers read the results stream and REST); each flush costs
    # several requests whatever its size, so flushes are rare (benchmarks/RESULTS.md, 2026-12-07)
    flush_rows: int = 4000     # peak/table rows (about 8 per frame) or frames buffered per run
    # the analysis runs also as BlueskyRuns (the results stream's documents through bluesky's
    # TiledWriter; service/publish/catalog_writer.py), found by Key("start.source_run_uid")
    bluesky_runs: bool = True
    flush_seconds: float = 5.0


class CatalogConfig(_Section):
    """The beamline's catalogue of raw runs: a Tiled server fed by bluesky's TiledWriter (or a
    databroker catalogue served through Tiled). `scatterflow reprocess` reads runs from it, and
    ingest fetches from it the events lost on the 0MQ link (service/recovery.py)."""
    uri: str | None = None                  # e.g. http://tiled:8000/api/v1 (or .../api/v1/metadata/raw)
    api_key: SecretStr | None = None
    recover: bool = True                    # fetch lost events (seq_num gaps, stop's num_events) when uri is set
    # how long a gap's events are awaited while the run goes on (its later frames wait behind it);
    # bluesky's TiledWriter writes events in batches (batch_size, 10000 by default: at the stop)
    recover_wait_s: float = Field(5.0, ge=0)
    recover_wait_at_stop_s: float = Field(30.0, ge=0)   # at the stop: for the writer's last batch


class ApiConfig(_Section):
    """REST API (read-only). `api_key` is a SecretStr: its repr and JSON dump are masked.

    Memory: each run held keeps the newest `held_rows` rows (at least; up to 1/16 more) of each
    result table (peaks ~87 B a row, phases ~45 B, inversion, scalar series) and of its events'
    scalar fields; older rows, and runs past the newest `max_runs`, are read back from Tiled
    (`archive_cache_rows` rows of such reads kept for the next polls, ~87 B a peak row)."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: SecretStr | None = None        # required when host is not a loopback address
    held_rows: int = Field(100_000, ge=1)   # rows per table and run held in memory
    max_runs: int = Field(100, ge=1)        # runs held in memory; past it the oldest finished one is forgotten
    archive_cache_rows: int = Field(1_000_000, ge=0)   # rows read back from Tiled kept for later polls


def secret(value: SecretStr | str | None) -> str | None:
    """The plain string of an API key setting (None or "" stay None)."""
    plain = value.get_secret_value() if isinstance(value, SecretStr) else value
    return plain or None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); False for anything
    else, including ``0.0.0.0``, ``::`` and host names, which may reach other machines."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ResultsConfig(_Section):
    address: str | None = "tcp://127.0.0.1:5579"   # None: no results stream
    prefix: str = ""


class PhasesConfig(_Section):
    """Live phase identification (workers/phase.py). `spec`: phases and their signatures as
    `workers.phase.phase_spec_from_dict` reads them ({} = the azopolymer demo's crystalline /
    transition / amorphous set); `checkpoint`: "default" (the classifier shipped in
    service/models), a path, or null for rules on the fitted parameters. Runs whose fit lacks the
    spec's peaks get no phases (logged)."""
    enabled: bool = True
    spec: dict = Field(default_factory=dict)
    checkpoint: str | None = "default"


class SubstrateConfig(_Section):
    """What GISAXS particles sit on, for the DWBA (workers.inversion.spec.Substrate): refractive
    index n = 1 - delta + i beta of the substrate (dimensionless, at the run's X-ray energy: e.g.
    Si at 12.4 keV delta 3.16e-6, beta 4.2e-8; Henke tables), optionally one film on it
    (film_delta, film_beta, film_thickness in nm; thickness 0: none)."""
    delta: float = Field(ge=0)
    beta: float = Field(ge=0)
    film_delta: float = Field(0.0, ge=0)
    film_beta: float = Field(0.0, ge=0)
    film_thickness: float = Field(0.0, ge=0)


class GisaxsInversionConfig(_Section):
    """The GISAXS part of the inversion (gisaxs runs): `model` (workers/inversion/spec.py:
    spheres, cylinders on a radial paracrystal, spheres with hard-disk order; `_dwba`: on
    `inversion.substrate`, needed then), `checkpoint` of the map encoder ("default":
    service/models/gisaxs_encoder.pt, or service/models/gisaxs_dwba_encoder.pt for
    `spheres_histogram_paracrystal_dwba`; null: LM from a grid search), `bounds` of the shape
    parameters, `qmap_npt` (n_qxy, n_qz) bins of the fitted (q_xy, q_z) map (pixel centres,
    no splitting: independent bins). Bins no wider than a pixel keep the model exact at each
    pixel's q; coarser bins average pixels across the Yoneda band and a structure peak and bias
    the fit beyond the noise at high counts (3 pixels a bin, 1e5 counts at the peak: radius
    1 % off, chi2_red 4-6). The fit's errors come from the model's expected counts (two
    reweighting steps after the first fit), so maps of a few counts a pixel are fitted
    without bias. `spheres_histogram_paracrystal_dwba`: the radii as a histogram on the
    encoder's 16 bins (2-8 nm) instead of a Gaussian, fitted per frame with distance, disorder,
    i0 and background (workers/inversion/histogram_map.py); its rows add radius_mean,
    radius_width (std / mean of the number distribution), n_modes and the volume fractions
    radius_fraction_00..15, each with its _err. It needs its encoder (the checkpoint gives the
    bins)."""
    model: Literal["spheres_paracrystal_dwba", "spheres_paracrystal", "cylinders_paracrystal_dwba",
                   "cylinders_paracrystal", "spheres_hard_disk_dwba", "spheres_hard_disk",
                   "spheres_histogram_paracrystal_dwba"] = "spheres_paracrystal_dwba"
    checkpoint: str | None = "default"
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    qmap_npt: tuple[int, int] = (128, 128)

    @model_validator(mode="after")
    def _bounds_of_model(self):
        from workers.inversion.spec import check_qmap_npt, shape_bounds
        shape_bounds(self.model, self.bounds)
        check_qmap_npt(self.qmap_npt)
        return self


class InversionConfig(_Section):
    """Fast structural inversion of each reduced SAXS profile (workers/inversion) in the model
    `model`: "sphere_hs" (Schulz hard spheres: radius nm, pd, volfraction, i0, background),
    "powerlaw_spheres" (dilute Schulz spheres plus A q^-power for a low-q upturn) or
    "unified_level" (one Beaucage level: rg, power, G, B). The LM's start comes from the encoder of
    `checkpoint` ("default": service/models/saxs_encoder.pt, sphere_hs; or a path `scatterflow
    train saxs` wrote) where the model has one and at least `min_q_overlap` of the profiles'
    log-q span lies inside its grid (0.05-5 1/nm), else from a grid search (`n_starts` starts;
    a warning once per run). `refine` adds the bounded LM (projected steps: parameters on a bound
    flagged `<name>_at_bound`) with standard errors. `bounds` replaces the model's shape-parameter
    bounds ({radius: [2, 500]}; workers/inversion/spec.py has the defaults). Per frame a verdict
    `fit_quality`: good (chi2 p-value >= `good_p_value`), bad (chi2_red > `bad_chi2`: the model
    cannot describe the sample), else poor. `q_range` (1/nm) limits the points used. A run may
    set any of these but `checkpoint` in start["scatterflow"]["inversion"]. With `fit.peaks: []`
    peak fitting is off and runs are reduced and inverted only. GISAXS runs invert their own
    (q_xy, q_z) map per frame instead (`gisaxs`, `substrate`; `q_range` is then the |q_xy| band of
    the fitted bins and `min_q_overlap` the fraction of the encoder's grid the map must cover)."""
    enabled: bool = False
    checkpoint: str = "default"
    model: Literal["sphere_hs", "powerlaw_spheres", "unified_level"] = "sphere_hs"
    refine: bool = True
    max_iter: int = Field(40, ge=1)
    q_range: tuple[float, float] | None = None
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    min_q_overlap: float = Field(0.5, gt=0, le=1)
    n_starts: int = Field(3, ge=1, le=16)
    good_p_value: float = Field(1e-3, gt=0, lt=1)
    bad_chi2: float = Field(4.0, gt=1)
    substrate: SubstrateConfig | None = None
    gisaxs: GisaxsInversionConfig = Field(default_factory=GisaxsInversionConfig)

    @model_validator(mode="after")
    def _bounds_of_model(self):
        from workers.inversion.spec import shape_bounds       # no torch: names and default bounds
        shape_bounds(self.model, self.bounds)                  # ValueError naming the parameter
        return self


class LimitsConfig(_Section):
    """Ceilings on every size a run's settings can ask for (the configuration's and, above all,
    a start document's ``reduction`` and ``fit`` keys, service/detectors.py), checked where the
    RunSpec is built (service/run_spec.py) before anything is allocated. A run above one is
    refused with the key, its value and the ceiling (``runs_refused{reason="limits"}``).
    Defaults are far above what a beamline uses and far below what exhausts a worker."""
    npt: int = Field(20_000, ge=2)          # radial bins of a run's profiles and cuts (reduction.npt)
    qmap_npt: int = Field(2048, ge=2)       # bins per axis of a grazing q-map (reduction.qmap_npt)
    peaks: int = Field(32, ge=0)            # peaks fitted per frame (fit.peaks)
    window: int = Field(256, ge=2)          # frames in the temporal regularizer's window (fit.regularizer.window)
    detector_pixels: int = Field(64 * 2**20, ge=1)   # pixels of a run's detector geometry (rows x cols)
    detectors: int = Field(16, ge=1)        # detector entries of one start document (one analysis each)


class HealthConfig(_Section):
    """When ``/api/v1/health`` stops answering "ok", and how long `Service.close` may take (s).

    route_stuck_s: the ingest routing thread on one message longer than this is "stuck" (a file
    that hangs, or back-pressure from a worker that stopped reading); routing waits for a busy
    worker to take a batch, which takes seconds. worker_stuck_s: a worker whose oldest unanswered
    batch is older than this is "stuck" (a run's first batch builds its integrator and loads
    models: up to tens of seconds for a 4 Mpx detector on CPU). restart_s: a dead worker not
    replaced within this is "stuck" (before: "degraded"). close_timeout_s: `Service.close`
    stops ingest, stops the open runs (final fits) and the workers within about this; a worker
    that does not answer by then is killed and its runs closed as interrupted."""
    route_stuck_s: float = Field(30.0, gt=0)
    worker_stuck_s: float = Field(60.0, gt=0)
    restart_s: float = Field(10.0, gt=0)
    close_timeout_s: float = Field(10.0, gt=9.0)     # > ingest's 5 s + the workers' 4 s of it


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCATTERFLOW_", env_nested_delimiter="__",
                                      extra="forbid")
    ingest: IngestConfig = IngestConfig()
    geometry: GeometryConfig = GeometryConfig()
    reduction: ReductionConfig = ReductionConfig()
    fit: FitConfig = FitConfig()
    workers: WorkersConfig = WorkersConfig()
    tiled: TiledConfig = TiledConfig()
    catalog: CatalogConfig = CatalogConfig()
    api: ApiConfig = ApiConfig()
    results: ResultsConfig = ResultsConfig()
    phases: PhasesConfig = PhasesConfig()
    inversion: InversionConfig = InversionConfig()
    limits: LimitsConfig = LimitsConfig()
    health: HealthConfig = HealthConfig()
    run_timeout_s: float = Field(600.0, gt=0)   # a run with no stop document is closed after this idle time

    @field_validator("api")
    @classmethod
    def _key_when_exposed(cls, api: ApiConfig) -> ApiConfig:
        """An API bound beyond loopback needs a non-empty api.api_key (or SCATTERFLOW_API__API_KEY).

        Reasoning: on 127.0.0.1/localhost/::1 only processes of this machine reach the API, as
        they could reach the service's files anyway; any other address (0.0.0.0 listens on every
        interface) exposes run metadata and results to the network, so it must be authenticated.
        """
        if not is_loopback(api.host) and (api.api_key is None or not api.api_key.get_secret_value()):
            raise ValueError(f"api.host={api.host!r} is not loopback: set api.api_key "
                             "(or SCATTERFLOW_API__API_KEY)")
        return api

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables win over the YAML file (passed as init kwargs).
        return env_settings, init_settings


def load_settings(path: str | os.PathLike | None = None, **overrides) -> Settings:
    """Read the YAML file (if any), apply ``SCATTERFLOW_`` environment variables, validate.

    Raises ConfigError with one line naming the offending key.
    """
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration {path}: {yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"configuration {path}: top level must be a mapping")
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(one_line(exc)) from None


def yaml_problem(exc) -> str:
    """A YAML parse error in one line: where (line, column) and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML ({where}{getattr(exc, 'problem', None) or str(exc).splitlines()[0]})"


def one_line(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """The first error of a pydantic validation as one line naming the key."""
    err = exc.errors()[0]
    return f"configuration error at {'.'.join([*prefix, *(str(p) for p in err['loc'])])}: {err['msg']}"
