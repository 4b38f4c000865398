"""Live phase identification: crystallinity index, phase labels with probabilities, transitions.

Inputs are what the fitter already produces: PeakRows (``workers.temporal``, one row per frame
and peak, provisional then final) and the reduced profiles (q in 1/nm). Three parts:

* **Crystallinity index** (per frame, from the fitted areas; Ruland's ratio without the q²
  weight, as the simulated truth defines it):
      CI = C / (C + H),  C = sum_c A_c,  H = sum_h A_h,
  A_k the area of peak k inside ``q_range`` [q1, q2] (1/nm): the fitted pseudo-Voigt area (the
  PeakRows column ``amplitude`` holds the area) times
  the fraction of the profile in [q1, q2] (Gaussian part: erf, Lorentzian part: arctan);
  c over the crystalline peaks, h over the amorphous ones (the halo). The smooth background
  (power law / polynomial) is not scattering of either phase and is left out. Uncertainty by
  the delta method from the areas' standard errors, treating the areas as independent (the
  rows carry no covariances; the halo/pi-pi anti-correlation makes this slightly pessimistic):
      sigma_CI^2 = (H^2 sigma_C^2 + C^2 sigma_H^2) / (C + H)^4.
* **Labels**: with no checkpoint, rules on the fitted parameters. Each phase has ranges
  ``feature: [lo, hi]`` (feature ``crystallinity`` or ``<peak>_<center|fwhm|amplitude|eta>``);
  with Gaussian errors the probability of a phase is  prod_f [Phi((hi - v)/s) - Phi((lo - v)/s)],
  normalised over the phases; the label is the most probable one. With a checkpoint, a small
  MLP (``PhaseClassifier``) over the profile resampled on a fixed log-q grid plus the fitted
  parameters gives softmax probabilities.
* **Transitions**: see :meth:`PhaseTracker.transitions`.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

PARAMS = ("center", "fwhm", "amplitude", "eta")       # PeakRows columns a signature may use
_SQRT_LN2 = math.sqrt(math.log(2.0))


# ============================================================================================
# Specification
@dataclass(frozen=True)
class PhaseSignature:
    """One phase: its name and the ranges ``(feature, lo, hi)`` its frames fall in."""
    name: str
    ranges: tuple[tuple[str, float, float], ...]


@dataclass(frozen=True)
class PhaseSpec:
    """Phases (ordered, e.g. crystalline -> amorphous) and how the index and events are computed.

    q_range (1/nm) of the crystallinity index, None = whole peaks; min_frames: a new label must
    hold this many consecutive final frames to count as a phase change; change_point_frames: a
    fit change point this close (frames) to a label change places the transition on it;
    crossing_frames: frames on each side of a label change used to locate the crossing.
    """
    phases: tuple[PhaseSignature, ...]
    crystalline_peaks: tuple[str, ...] = ("lamellar", "pi_pi")
    amorphous_peaks: tuple[str, ...] = ("halo",)
    q_range: tuple[float, float] | None = (2.0, 19.5)
    min_frames: int = 2
    change_point_frames: int = 1
    crossing_frames: int = 2

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases)

    @property
    def peaks(self) -> tuple[str, ...]:
        """Peaks the spec needs in the rows."""
        used = {f.rsplit("_", 1)[0] for p in self.phases for f, _, _ in p.ranges if f != "crystallinity"}
        return tuple(dict.fromkeys((*self.crystalline_peaks, *self.amorphous_peaks, *sorted(used))))

    def check_peaks(self, fitted: tuple[str, ...] | list[str]) -> None:
        """ValueError naming the peaks the spec needs that the fit configuration lacks."""
        missing = [p for p in self.peaks if p not in fitted]
        if missing:
            raise ValueError(f"phase spec needs peaks {missing} that the fit does not have ({list(fitted)})")


#: default phases of the azopolymer demo (service/sim): the truth's phase boundaries a = 0.1 and
#: a = 0.9 (amorphous fraction, crystallinity floor 0.1) are CI = 0.521 and 0.073 in 2-19.5 1/nm.
DEFAULT_PHASES: dict[str, Any] = {
    "crystalline_peaks": ["lamellar", "pi_pi"],
    "amorphous_peaks": ["halo"],
    "q_range": [2.0, 19.5],
    "phases": [
        {"name": "crystalline", "crystallinity": [0.521, 1.0]},
        {"name": "transition", "crystallinity": [0.073, 0.521]},
        {"name": "amorphous", "crystallinity": [0.0, 0.073]},
    ],
    "min_frames": 2, "change_point_frames": 1, "crossing_frames": 2,
}


def default_phase_spec() -> PhaseSpec:
    return phase_spec_from_dict(DEFAULT_PHASES)


def _feature_ok(name: str) -> bool:
    if name == "crystallinity":
        return True
    peak, _, param = name.rpartition("_")
    return bool(peak) and param in PARAMS


def _range(value, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be [lo, hi], got {value!r}") from None
    if not (lo < hi) or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{what} must be [lo, hi] with lo < hi, got {value!r}")
    return lo, hi


def _int(d, key, default, lo) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"phase.{key} must be an int >= {lo}, got {v!r}")
    return v


def _names(d, key, default) -> tuple[str, ...]:
    v = d.get(key, default)
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"phase.{key} must be a non-empty list of peak names, got {v!r}")
    return tuple(v)


def phase_spec_from_dict(d: Mapping[str, Any]) -> PhaseSpec:
    """PhaseSpec from a configuration mapping (keys as ``DEFAULT_PHASES``; a missing key takes
    its default there, so ``{}`` is the demo's set); ValueError naming the bad value."""
    if hasattr(d, "model_dump"):
        d = d.model_dump()
    if not isinstance(d, Mapping):
        raise ValueError(f"phase configuration must be a mapping, got {type(d).__name__}")
    allowed = {"phases", "crystalline_peaks", "amorphous_peaks", "q_range", "min_frames",
               "change_point_frames", "crossing_frames"}
    if set(d) - allowed:
        raise ValueError(f"unknown phase keys {sorted(set(d) - allowed)}; allowed {sorted(allowed)}")
    raw = d.get("phases", DEFAULT_PHASES["phases"])
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise ValueError(f"phase.phases must be a list of at least two phases, got {raw!r}")
    phases = []
    for p in raw:
        if not isinstance(p, Mapping) or not isinstance(p.get("name"), str) or not p["name"]:
            raise ValueError(f"each phase must be a mapping with a name, got {p!r}")
        ranges = []
        for feat, value in p.items():
            if feat == "name":
                continue
            if not _feature_ok(feat):
                raise ValueError(f"phase {p['name']!r}: unknown feature {feat!r}; use 'crystallinity' "
                                 f"or '<peak>_<{'|'.join(PARAMS)}>'")
            ranges.append((feat, *_range(value, f"phase {p['name']!r} {feat}")))
        if not ranges:
            raise ValueError(f"phase {p['name']!r} has no signature (e.g. crystallinity: [lo, hi])")
        phases.append(PhaseSignature(p["name"], tuple(ranges)))
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique, got {names}")
    cryst, amor = _names(d, "crystalline_peaks", ["lamellar", "pi_pi"]), _names(d, "amorphous_peaks", ["halo"])
    if set(cryst) & set(amor):
        raise ValueError(f"peaks {sorted(set(cryst) & set(amor))} cannot be both crystalline and amorphous")
    qr = d.get("q_range", (2.0, 19.5))
    qr = None if qr is None else _range(qr, "phase.q_range")
    return PhaseSpec(tuple(phases), cryst, amor, qr, _int(d, "min_frames", 2, 1),
                     _int(d, "change_point_frames", 1, 0), _int(d, "crossing_frames", 2, 1))


# ============================================================================================
# PeakRows -> one row per frame
def frame_table(rows: Mapping[str, np.ndarray], peaks) -> dict[str, np.ndarray]:
    """One entry per (seq_num, final) pair of PeakRows (the last row wins), sorted by
    (final, seq_num): ``seq_num``, ``time``, ``final``, ``change_point`` and ``<peak>_<col>`` for
    col in center, fwhm, amplitude, eta and their ``_err`` (NaN where the peak has no row)."""
    seq = np.asarray(rows["seq_num"], np.int64)
    if len(seq) == 0:
        return {"seq_num": np.zeros(0, np.int64), "time": np.zeros(0), "final": np.zeros(0, bool),
                "change_point": np.zeros(0, bool), **{f"{p}_{c}": np.zeros(0) for p in peaks
                                                      for c in (*PARAMS, "center_err", "fwhm_err", "amplitude_err")}}
    names = set(np.asarray(rows["peak"]).tolist())
    missing = [p for p in peaks if p not in names]
    if missing:
        raise ValueError(f"peaks {missing} are not in the fitted rows (have {sorted(names)})")
    key = seq * 2 + np.asarray(rows["final"], bool)
    uk, last = np.unique(key[::-1], return_index=True)
    last = len(key) - 1 - last
    out = {"seq_num": uk // 2, "final": (uk % 2).astype(bool), "time": np.asarray(rows["time"], float)[last],
           "change_point": np.zeros(len(uk), bool)}
    peak = np.asarray(rows["peak"])
    for p in peaks:
        m = np.flatnonzero(peak == p)
        idx = np.searchsorted(uk, key[m])
        for c in (*PARAMS, "center_err", "fwhm_err", "amplitude_err"):
            col = np.full(len(uk), np.nan)
            col[idx] = np.asarray(rows[c], float)[m]
            out[f"{p}_{c}"] = col
        cp = np.zeros(len(uk), bool)
        cp[idx] = np.asarray(rows["change_point"], bool)[m]
        out["change_point"] |= cp
    return out


# ============================================================================================
# Crystallinity index
def pv_fraction(center, fwhm, eta, q_range: tuple[float, float] | None) -> np.ndarray:
    """Fraction of an area-normalised pseudo-Voigt (shared FWHM) inside [q1, q2] (1/nm):
    (1 - eta) [erf(2 sqrt(ln2) (q - c)/w)]/2 + eta [arctan(2 (q - c)/w)]/pi, from q1 to q2."""
    center, fwhm, eta = (torch.as_tensor(np.asarray(v, float)) for v in (center, fwhm, eta))
    if q_range is None:
        return np.ones(torch.broadcast_shapes(center.shape, fwhm.shape, eta.shape))
    u1, u2 = ((q - center) / fwhm for q in q_range)
    gauss = 0.5 * (torch.special.erf(2 * _SQRT_LN2 * u2) - torch.special.erf(2 * _SQRT_LN2 * u1))
    lor = (torch.atan(2 * u2) - torch.atan(2 * u1)) / math.pi
    return ((1.0 - eta) * gauss + eta * lor).numpy()


def crystallinity_index(table: Mapping[str, np.ndarray], spec: PhaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """(CI, sigma_CI) per frame of a ``frame_table`` (see the module docstring for the formula)."""
    def areas(peaks):
        a, v = 0.0, 0.0
        for p in peaks:
            eta = np.nan_to_num(table[f"{p}_eta"], nan=0.5)
            f = pv_fraction(table[f"{p}_center"], table[f"{p}_fwhm"], eta, spec.q_range)
            a = a + f * table[f"{p}_amplitude"]
            v = v + (f * table[f"{p}_amplitude_err"]) ** 2
        return a, v
    c, vc = areas(spec.crystalline_peaks)
    h, vh = areas(spec.amorphous_peaks)
    tot = c + h
    with np.errstate(divide="ignore", invalid="ignore"):
        ci = c / tot
        sig = np.sqrt(h * h * vc + c * c * vh) / (tot * tot)
    bad = ~(tot > 0)
    return np.where(bad, np.nan, ci), np.where(bad, np.nan, sig)


# ============================================================================================
# Rules
def rule_log_probabilities(table: Mapping[str, np.ndarray], ci: np.ndarray, ci_sigma: np.ndarray,
                           spec: PhaseSpec) -> np.ndarray:
    """log P(phase) (F, K) under Gaussian errors of the features (unnormalised; see module doc).
    A feature that is not finite gives no information (factor 1); an error that is not finite or
    zero makes the factor an indicator."""
    def log_ndtr(z):
        return torch.special.log_ndtr(torch.as_tensor(z, dtype=torch.float64)).numpy()

    F = len(ci)
    out = np.zeros((F, len(spec.phases)))
    for k, ph in enumerate(spec.phases):
        for feat, lo, hi in ph.ranges:
            if feat == "crystallinity":
                v, s = ci, ci_sigma
            else:
                v = table[feat]
                s = table.get(f"{feat}_err", np.zeros(F))
            s = np.where(np.isfinite(s) & (s > 0), s, 1e-12 * np.maximum(np.abs(v), 1.0))
            a, b = (lo - v) / s, (hi - v) / s
            # log(Phi(b) - Phi(a)) computed on the side of the smaller tail
            flip = a > 0
            a, b = np.where(flip, -b, a), np.where(flip, -a, b)
            lb, la = log_ndtr(b), log_ndtr(a)
            with np.errstate(divide="ignore", invalid="ignore"):
                term = lb + np.log1p(-np.exp(np.minimum(la - lb, 0.0)))
            term = np.where(np.isfinite(v), np.maximum(term, -1e4), 0.0)
            out[:, k] += term
    return out


# ============================================================================================
# Classifier
def log_grid(q_lo: float, q_hi: float, n: int) -> np.ndarray:
    """Bin edges (n + 1,) log-spaced in [q_lo, q_hi] 1/nm."""
    return np.geomspace(q_lo, q_hi, n + 1)


def resample_profile(radial: torch.Tensor, intensity: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin means (B, G) of profiles intensity (B, N) on radial (N,) over bins edges (G + 1,),
    from the cumulative trapezoid integrals of I*v and v (v = 1 where I is finite), linearly
    interpolated at the edges: mean_j = int_j I v dq / int_j v dq. Edges outside radial: NaN."""
    x = radial.to(intensity.dtype)
    ok = torch.isfinite(intensity)
    y = torch.where(ok, intensity, torch.zeros_like(intensity))
    v = ok.to(intensity.dtype)
    dx = torch.diff(x)

    def cum(z):
        c = torch.cumsum(0.5 * (z[:, 1:] + z[:, :-1]) * dx, -1)
        return torch.cat((torch.zeros_like(z[:, :1]), c), -1)
    e = edges.to(x)
    j = torch.searchsorted(x, e).clamp(1, len(x) - 1)
    w = (e - x[j - 1]) / (x[j] - x[j - 1])

    def at(c, z):      # cumulative integral at the edges (piecewise-linear z inside the cell)
        z0, z1 = z[:, j - 1], z[:, j]
        h = (e - x[j - 1])
        return c[:, j - 1] + h * (z0 + 0.5 * w * (z1 - z0))
    ci, cv = at(cum(y), y), at(cum(v), v)
    mean = torch.diff(ci, dim=-1) / torch.diff(cv, dim=-1)
    outside = (e[:-1] < x[0]) | (e[1:] > x[-1])
    return torch.where(outside, torch.full_like(mean, math.nan), mean)


def profile_features(radial, intensity, edges) -> torch.Tensor:
    """log(bin mean / mean over the grid) (B, G): scale-free shape of the profile."""
    m = resample_profile(radial, intensity, edges)
    ref = torch.nanmean(m, -1, keepdim=True).clamp_min(1e-30)
    return torch.log((m / ref).clamp_min(1e-3))


def param_features(table: Mapping[str, np.ndarray], ci: np.ndarray, ci_sigma: np.ndarray, names,
                   peaks) -> np.ndarray:
    """(F, len(names)) fitted-parameter features by name: ``crystallinity``,
    ``crystallinity_sigma``, any ``frame_table`` column (``<peak>_center`` 1/nm, ``<peak>_fwhm``
    1/nm, ...), ``<peak>_fraction`` (area over the summed areas of ``peaks``) and
    ``<peak>_rel_err`` (area standard error / area)."""
    area = np.stack([table[f"{p}_amplitude"] for p in peaks], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = dict(zip(peaks, (area / area.sum(1, keepdims=True)).T))
        cols = []
        for n in names:
            if n == "crystallinity":
                cols.append(ci)
            elif n == "crystallinity_sigma":
                cols.append(ci_sigma)
            elif n.endswith("_fraction"):
                cols.append(frac[n[:-len("_fraction")]])
            elif n.endswith("_rel_err"):
                p = n[:-len("_rel_err")]
                cols.append(table[f"{p}_amplitude_err"] / np.abs(table[f"{p}_amplitude"]))
            else:
                cols.append(np.asarray(table[n], float))
    return np.stack(cols, 1) if cols else np.zeros((len(ci), 0))


class PhaseClassifier(torch.nn.Module):
    """MLP over standardised features (B, F) -> logits (B, K). Non-finite features become the
    training mean (0 after standardisation)."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(n_features, hidden), torch.nn.GELU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, n_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.to(self.mean.dtype) - self.mean) / self.std
        return self.net(torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).clamp(-10, 10))

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], device="cpu") -> "PhaseClassifier":
        """From ``{"state_dict", "meta"}``; meta: phases, peaks, grid [q_lo, q_hi, n bins (0: no
        profile features)], params (feature names), hidden."""
        try:
            meta = checkpoint["meta"]
            model = cls(n_features(meta), len(meta["phases"]), int(meta["hidden"]))
            model.load_state_dict(checkpoint["state_dict"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"not a usable phase classifier checkpoint: {type(exc).__name__}: {exc}") from None
        return model.to(device).eval()


def n_features(meta: Mapping[str, Any]) -> int:
    return int(meta["grid"][2]) + len(meta["params"])


def meta_profile_features(meta: Mapping[str, Any], radial, intensity) -> torch.Tensor:
    """Profile features (B, G) on the checkpoint's grid, on the device of ``intensity`` (or CPU)."""
    inten = intensity if torch.is_tensor(intensity) else torch.as_tensor(np.asarray(intensity, float))
    inten = inten.to(torch.float64)
    inten = inten[None] if inten.dim() == 1 else inten
    n = int(meta["grid"][2])
    if n == 0:
        return inten.new_zeros((inten.shape[0], 0))
    radial = torch.as_tensor(np.asarray(radial, float) if not torch.is_tensor(radial) else radial).to(inten)
    edges = torch.as_tensor(log_grid(float(meta["grid"][0]), float(meta["grid"][1]), n)).to(inten)
    return profile_features(radial, inten, edges)


def classifier_features(meta: Mapping[str, Any], radial, intensity, table, ci, ci_sigma) -> torch.Tensor:
    """Features (B, G + len(params)) for the checkpoint's ``meta``: profile features on its grid
    and the named fitted-parameter features (``param_features``)."""
    prof = meta_profile_features(meta, radial, intensity)
    par = torch.as_tensor(param_features(table, ci, ci_sigma, meta["params"], meta["peaks"])).to(prof)
    return torch.cat((prof, par), 1)


# ============================================================================================
# Tracker
class PhaseTracker:
    """Phase labels and transition events for one run (one tracker per run, like the fitter).

    ``update(rows, seq_num=, radial=, intensity=)`` per batch: ``rows`` the PeakRows the
    fitter returned for the batch (provisional rows of its frames, final rows of older ones);
    the batch's profiles (``radial`` (N,) 1/nm, ``intensity`` (B, N), ``seq_num`` (B,)) are
    needed when a checkpoint is used (their resampled shape is kept until the frame is final).
    Returns one row per (frame, final) pair of ``rows`` (columns ``PHASE_COLUMNS``; phase "" and
    probability NaN where the rules have no finite feature). ``finish(rows)`` with the rows of
    ``TrajectoryFitter.finish()``; ``transitions()`` / ``pop_transitions()`` give the events.
    ``checkpoint``: ``{"state_dict", "meta"}`` (see ``service/train/phase.py``) or None: rules.
    """

    def __init__(self, spec: PhaseSpec, checkpoint: Mapping[str, Any] | None = None, *, device="cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.model: PhaseClassifier | None = None
        self.meta: Mapping[str, Any] | None = None
        if checkpoint is not None:
            meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
            if not isinstance(meta, Mapping) or "phases" not in meta:
                raise ValueError("not a phase classifier checkpoint: no meta with phases")
            if tuple(meta["phases"]) != spec.names:
                raise ValueError(f"checkpoint phases {list(meta['phases'])} differ from the spec's {list(spec.names)}")
            self.model, self.meta = PhaseClassifier.from_checkpoint(checkpoint, self.device), meta
        self.method = "rules" if self.model is None else "classifier"
        self._peaks = tuple(dict.fromkeys((*spec.peaks, *(self.meta["peaks"] if self.meta else ()))))
        self._profiles: dict[int, torch.Tensor] = {}       # seq -> profile features (G,), until final
        self._final: dict[int, tuple] = {}                  # seq -> (time, label, scores (K,), ci, ci_sigma, cp)
        self._popped: set[tuple] = set()
        self._done = False
        # incremental event search: final seqs in order, the events confirmed so far and the
        # seq where the next label scan starts (see transitions)
        self._order: list[int] = []
        self._events: list[dict[str, Any]] = []
        self._scan_seq: int | None = None
        self._timed = True                                   # every final frame has a finite time
        self._ci_only = all(f == "crystallinity" for ph in spec.phases for f, _, _ in ph.ranges)

    # ---- per batch
    def update(self, rows: Mapping[str, np.ndarray], *, seq_num=None, radial=None, intensity=None) -> dict[str, np.ndarray]:
        if self.model is not None and intensity is not None and radial is not None and self.meta["grid"][2]:
            self._store_profiles(seq_num, radial, intensity)
        table = frame_table(rows, self._peaks)
        ci, sig = crystallinity_index(table, self.spec)
        scores = self._scores(table, ci, sig)
        prob = np.exp(scores - scores.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        label = prob.argmax(1)
        names = np.array(self.spec.names, dtype=np.str_)
        phase, p = names[label], prob[np.arange(len(label)), label]
        if self.model is None and self._ci_only:          # no finite feature: no label
            phase, p = np.where(np.isfinite(ci), phase, ""), np.where(np.isfinite(ci), p, np.nan)
        for i in np.flatnonzero(table["final"]):
            s = int(table["seq_num"][i])
            self._profiles.pop(s, None)
            self._add_final(s, (float(table["time"][i]), int(label[i]) if phase[i] else -1, scores[i],
                                float(ci[i]), float(sig[i]), bool(table["change_point"][i])))
        return {"seq_num": table["seq_num"], "time": table["time"], "phase": phase, "probability": p,
                "crystallinity": ci, "crystallinity_sigma": sig, "final": table["final"]}

    def _add_final(self, s: int, record: tuple) -> None:
        if s not in self._final:
            if self._order and s < self._order[-1]:
                bisect.insort(self._order, s)
            else:
                self._order.append(s)
        if self._scan_seq is not None and s <= self._scan_seq:   # a late frame: scan all again
            self._events, self._scan_seq = [], None
        self._final[s] = record
        self._timed = self._timed and math.isfinite(record[0])

    def finish(self, rows: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Last rows (from ``TrajectoryFitter.finish()``); afterwards every event is confirmed."""
        out = self.update(rows if rows is not None else {c: np.zeros(0) for c in ("seq_num", "peak")})
        self._done, self._profiles = True, {}
        return out

    def _store_profiles(self, seq_num, radial, intensity) -> None:
        seq = np.asarray(seq_num, np.int64).reshape(-1)
        inten = intensity if torch.is_tensor(intensity) else torch.as_tensor(np.asarray(intensity, float))
        inten = inten[None] if inten.dim() == 1 else inten
        if inten.shape[0] != len(seq):
            raise ValueError(f"intensity has {inten.shape[0]} frames but seq_num {len(seq)}")
        feats = meta_profile_features(self.meta, radial, inten.to(self.device))
        for s, f in zip(seq.tolist(), feats):
            self._profiles[s] = f

    def _scores(self, table, ci, sig) -> np.ndarray:
        """(F, K) log-probabilities (rules) or log-softmax of the classifier (where a profile is kept)."""
        scores = rule_log_probabilities(table, ci, sig, self.spec)
        if self.model is None or len(ci) == 0:
            return scores
        if self.meta["grid"][2]:
            have = np.array([s in self._profiles for s in table["seq_num"].tolist()], bool)
            if not have.any():
                return scores
            idx = np.flatnonzero(have)
            prof = torch.stack([self._profiles[int(table["seq_num"][i])] for i in idx])
        else:
            idx = np.arange(len(ci))
            prof = torch.zeros((len(idx), 0), dtype=torch.float64, device=self.device)
        sub = {k: v[idx] for k, v in table.items()}
        par = torch.as_tensor(param_features(sub, ci[idx], sig[idx], self.meta["params"], self.meta["peaks"]),
                              device=self.device)
        with torch.no_grad():
            logits = self.model(torch.cat((prof, par.to(prof.dtype)), 1))
            scores[idx] = torch.log_softmax(logits.double(), -1).cpu().numpy()
        return scores

    # ---- transitions
    def transitions(self) -> list[dict[str, Any]]:
        """Phase changes of the final labels, in time order: ``{"from", "to", "seq_num", "time",
        "time_sigma", "frame_sigma", "change_point"}`` (time in the rows' unit, s; sigmas in s
        and frames).

        Estimator: a label change is a new label that holds ``min_frames`` consecutive final
        frames; k is its first frame. A score s_t crosses a boundary level at the change: the
        crystallinity index (boundary between the two phases' crystallinity ranges) with the
        rules, the classifier's log-probability difference log p_to - log p_from (boundary 0)
        with a checkpoint. If a fit change point (final rows) at frame j, |j - k| <=
        ``change_point_frames``, has s_{j-1} on the old side and s_j on the new side of the
        boundary, the phase changed between frames j-1 and j: time = (t_{j-1} + t_j)/2,
        sigma = (t_j - t_{j-1})/sqrt(12) (uniform), change_point True. (A change point with no
        crossing beside it, e.g. the onset of a smooth change, is not used.) Otherwise a straight
        line s = alpha + beta (t - t0) is fitted over the ``crossing_frames`` frames on each side
        of the change (weights 1/sigma_CI^2 for the index, scaled by max(1, chi2_red); uniform
        for the classifier, variance from the residuals) and its crossing t* of the level is
        returned, sigma_t^2 = (var(alpha) + (t* - t0)^2 var(beta)) / beta^2 (delta method). A line with the wrong slope or a crossing outside its frames falls back to
        the middle of frames k-1, k (sigma as above). Events are confirmed once the frames they
        use are final (all of them after ``finish``), and kept: each call scans only from the
        last frame of the current label before any pending change (with the frames a crossing
        fit needs before it), so a batch costs the same at frame 100 and at frame 100 000;
        frame_sigma uses the median frame spacing of the frames scanned.
        """
        if not self._final:
            return []
        sp = self.spec
        reach = max(sp.min_frames - 1, sp.change_point_frames, sp.crossing_frames - 1)
        k0 = 0 if self._scan_seq is None else bisect.bisect_left(self._order, self._scan_seq)
        s0 = max(0, k0 - max(sp.change_point_frames + 1, sp.crossing_frames))
        seq = np.array(self._order[s0:], np.int64)
        rec = [self._final[s] for s in self._order[s0:]]
        t = np.array([r[0] for r in rec])
        tax = t if self._timed else seq.astype(float)
        lab = np.array([r[1] for r in rec])
        scores = np.stack([r[2] for r in rec])
        ci, cis = np.array([r[3] for r in rec]), np.array([r[4] for r in rec])
        cp = np.array([r[5] for r in rec])
        changes, restart = _label_changes(lab[k0 - s0:], sp.min_frames)
        if restart < 0:                 # nothing labelled yet: as if the scan started at the end
            restart = len(seq) - 1 - (k0 - s0)
        for k, a, b, before in changes:
            k += k0 - s0
            if not self._done and k + reach >= len(seq):
                restart = before
                break
            self._events.append(self._locate(k, a, b, seq, t, tax, scores, ci, cis, cp))
        self._scan_seq = int(seq[restart + k0 - s0])
        return list(self._events)

    def pop_transitions(self) -> list[dict[str, Any]]:
        """The confirmed events not returned before."""
        out = []
        for ev in self.transitions():
            key = (ev["from"], ev["to"], ev["seq_num"])
            if key not in self._popped:
                self._popped.add(key)
                out.append(ev)
        return out

    def _locate(self, k, a, b, seq, t, tax, scores, ci, cis, cp) -> dict[str, Any]:
        sp, names = self.spec, self.spec.names
        step = float(np.median(np.diff(tax))) if len(tax) > 1 else 1.0
        bound = _ci_boundary(sp.phases[a], sp.phases[b]) if self.model is None else None
        if bound is not None:
            score, level, sign, sigma = ci, bound[0], bound[1], cis
        else:
            score, level, sign, sigma = scores[:, b] - scores[:, a], 0.0, 1.0, None
        side = sign * (score - level)                      # < 0: old phase's side, > 0: new one's
        near = [j for j in range(max(1, k - sp.change_point_frames), min(len(seq), k + sp.change_point_frames + 1))
                if cp[j] and side[j - 1] < 0 < side[j]]
        if near:
            j = min(near, key=lambda j: abs(j - k))
            tm, ts, jj, is_cp = 0.5 * (tax[j - 1] + tax[j]), (tax[j] - tax[j - 1]) / math.sqrt(12), j, True
        else:
            tm, ts = _crossing(tax, score, level, sign, k, sp.crossing_frames, sigma)
            jj, is_cp = int(np.clip(np.searchsorted(tax, tm), 1, len(seq) - 1)), False
        timed = self._timed
        return {"from": names[a], "to": names[b], "seq_num": int(seq[jj]), "time": float(tm) if timed else math.nan,
                "time_sigma": float(ts) if timed else math.nan,
                "frame_sigma": float(ts / step) if step > 0 else math.nan, "change_point": is_cp}


def _label_changes(lab: np.ndarray, min_frames: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """(k, from, to, restart) where a new label (>= 0) starts a run of >= min_frames frames; -1 =
    unknown frames are skipped. ``restart``: the last frame before k labelled with the current
    label, where a scan started anew reaches the same state; also returned for the end (-1 if
    no frame is labelled)."""
    out, cur, i, F, last = [], None, 0, len(lab), -1
    while i < F:
        if lab[i] < 0:
            i += 1
            continue
        j = i
        while j < F and lab[j] == lab[i]:
            j += 1
        if cur is None:
            cur = lab[i]
        elif lab[i] != cur and j - i >= min_frames:
            out.append((i, int(cur), int(lab[i]), last))
            cur = lab[i]
        if lab[i] == cur:
            last = j - 1
        i = j
    return out, last


def _ci_boundary(p_from: PhaseSignature, p_to: PhaseSignature) -> tuple[float, float] | None:
    """(CI level, expected sign of dCI/dt) between two phases' crystallinity ranges, or None."""
    rf = next(((lo, hi) for f, lo, hi in p_from.ranges if f == "crystallinity"), None)
    rt = next(((lo, hi) for f, lo, hi in p_to.ranges if f == "crystallinity"), None)
    if rf is None or rt is None:
        return None
    if rt[1] <= rf[0]:
        return 0.5 * (rt[1] + rf[0]), -1.0
    if rt[0] >= rf[1]:
        return 0.5 * (rf[1] + rt[0]), 1.0
    return None


def _crossing(t, s, level, sign, k, h, sigma=None) -> tuple[float, float]:
    """Time where a weighted straight line through (t, s) over frames k-h .. k+h-1 crosses
    ``level`` and its standard error (see ``PhaseTracker.transitions``)."""
    mid = (0.5 * (t[k - 1] + t[k]), (t[k] - t[k - 1]) / math.sqrt(12))
    lo, hi = max(0, k - h), min(len(t), k + h)
    tt, ss = t[lo:hi], s[lo:hi]
    w = np.ones_like(tt) if sigma is None else 1.0 / np.asarray(sigma[lo:hi]) ** 2
    ok = np.isfinite(ss) & np.isfinite(w) & (w > 0)
    n = int(ok.sum())
    if n < 2:
        return mid
    tt, ss, w = tt[ok], ss[ok], w[ok]
    t0 = float((w * tt).sum() / w.sum())
    x = tt - t0
    sxx = float((w * x * x).sum())
    if sxx <= 0:
        return mid
    alpha, beta = float((w * ss).sum() / w.sum()), float((w * x * ss).sum() / sxx)
    if not beta * sign > 0:
        return mid
    tc = t0 + (level - alpha) / beta
    if not (tt[0] <= tc <= tt[-1]):
        return mid
    rss = float((w * (ss - alpha - beta * x) ** 2).sum())
    scale = rss / (n - 2) if n > 2 else math.nan
    if sigma is not None:
        scale = max(1.0, scale) if n > 2 else 1.0
    if not math.isfinite(scale):
        return tc, mid[1]
    var = scale * (1.0 / float(w.sum()) + (tc - t0) ** 2 / sxx)
    return tc, math.sqrt(var) / abs(beta)
