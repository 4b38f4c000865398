"""Ground truth for the simulated operando experiment: a photo-switchable azopolymer film.

Imitates Shin et al., PNAS 116, 5973 (2019): azobenzene polymer films switch reversibly
between a crystalline (trans) state and a liquid (cis) state under UV and visible light,
in tens of seconds at room temperature. The crystalline state shows a sharp lamellar peak
at small q and a pi-pi stacking peak near q = 17.5 1/nm; the liquid state shows weaker,
shifted, broader peaks and a stronger amorphous halo. Peak values are generic for such
polymers, not quoted from the paper.

Kinetics: the crystalline fraction x follows first-order kinetics toward a target set by the
light,  dx/dt = -(x - x_target) / tau,  solved exactly segment by segment between light
changes (x(t) = x_target + (x0 - x_target) exp(-(t - t0) / tau)). UV drives x toward
``crystallinity_floor`` with ``tau_uv``; visible light drives it back to 1 with ``tau_vis``;
darkness holds it (or relaxes it to 1 with ``tau_dark`` when given: thermal cis -> trans).
``step=True`` makes every change instantaneous (tau -> 0), for testing step detection.

Peak parameters are linear in the amorphous fraction
a = (1 - x) / (1 - crystallinity_floor), clipped to [0, 1]: centres and widths move from their
crystalline to their amorphous values; the lamellar and pi-pi areas are proportional to x;
the halo area grows linearly with 1 - x.

Units: q in 1/nm, times in s (relative to the start of the experiment). Intensities are the
1D model I(q) "before corrections": what a pyFAI-integrated profile of the frames shows when
flux * exposure = 1 (counts per pixel of relative solid angle 1, unpolarised). Areas are
integrals of I(q) dq (intensity x 1/nm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Light = Literal["uv", "visible", "dark"]
LIGHTS: tuple[str, ...] = ("uv", "visible", "dark")
PEAKS: tuple[str, ...] = ("lamellar", "pi_pi", "halo")
PHASES: tuple[str, ...] = ("crystalline", "transition", "amorphous")

#: default light schedule (t_start s, light): 10 s crystalline, 30 s UV, 30 s visible, dark.
#: Fits a 90-frame demo at 1 s per frame.
DEFAULT_SCHEDULE: tuple[tuple[float, str], ...] = (
    (0.0, "dark"), (10.0, "uv"), (40.0, "visible"), (70.0, "dark"))
DEFAULT_DURATION_S = 90.0

_GAUSS_NORM = math.sqrt(4.0 * math.log(2.0) / math.pi)
_FOUR_LN2 = 4.0 * math.log(2.0)


def pseudo_voigt(q: np.ndarray, center, fwhm, area, eta) -> np.ndarray:
    """Area-normalised pseudo-Voigt with a shared FWHM: area * (eta L + (1 - eta) G).

    L = (Γ/2π) / ((q - q0)² + (Γ/2)²), G = sqrt(4 ln2 / π) / Γ · exp(-4 ln2 (q - q0)² / Γ²).
    Parameters broadcast against ``q`` (1/nm).
    """
    dq = q - center
    lor = (fwhm / (2.0 * math.pi)) / (dq * dq + 0.25 * fwhm * fwhm)
    gau = _GAUSS_NORM / fwhm * np.exp(-_FOUR_LN2 * dq * dq / (fwhm * fwhm))
    return area * (eta * lor + (1.0 - eta) * gau)


@dataclass(frozen=True)
class PeakStates:
    """One peak's parameters in the crystalline (x = 1) and amorphous (x = floor) states."""

    center: tuple[float, float]      # 1/nm (crystalline, amorphous)
    fwhm: tuple[float, float]        # 1/nm
    area: tuple[float, float]        # intensity x 1/nm
    eta: float                       # pseudo-Voigt Lorentzian fraction

    def __post_init__(self):
        for name in ("center", "fwhm", "area"):
            pair = getattr(self, name)
            if len(pair) != 2 or min(pair) < 0 or (name != "area" and min(pair) <= 0):
                raise ValueError(f"PeakStates.{name} must be two positive values, got {pair!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"PeakStates.eta must be in [0, 1], got {self.eta!r}")


def _default_peaks() -> dict[str, PeakStates]:
    return {
        # peak height ~300 (crystalline) on a background of ~30
        "lamellar": PeakStates(center=(3.2, 3.0), fwhm=(0.18, 0.40), area=(60.0, 0.0), eta=0.3),
        # pi-pi stacking, d = 3.6 Å
        "pi_pi": PeakStates(center=(17.5, 17.1), fwhm=(0.9, 1.8), area=(70.0, 0.0), eta=0.5),
        # amorphous halo, height ~15 -> ~60
        "halo": PeakStates(center=(14.0, 14.0), fwhm=(5.0, 5.0), area=(85.0, 340.0), eta=0.2),
    }


@dataclass
class AzoCycle:
    """Kinetics and 1D scattering model of the azopolymer light cycle.

    ``schedule``: light history as (t_start s, "uv" | "visible" | "dark") segments, sorted by
    time; before the first segment the film is dark at ``initial_crystallinity``. The history
    can be extended while an experiment runs with :meth:`set_light` (the ophyd light source
    does this), so the film follows the light it actually received.
    """

    tau_uv: float = 8.0                      # s, first-order time constant under UV
    tau_vis: float = 10.0                    # s, recovery under visible light
    tau_dark: float | None = None            # s, thermal recovery in the dark; None: hold
    crystallinity_floor: float = 0.1         # steady-state crystalline fraction under UV
    initial_crystallinity: float = 1.0
    step: bool = False                       # tau -> 0: abrupt changes at light switches
    peaks: dict[str, PeakStates] = field(default_factory=_default_peaks)
    background_amplitude: float = 675.0      # power law A q^-n (I at q = 1 1/nm)
    background_exponent: float = 3.0
    background_constant: float = 10.0
    schedule: tuple[tuple[float, str], ...] = DEFAULT_SCHEDULE

    def __post_init__(self):
        for name in ("tau_uv", "tau_vis"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"AzoCycle.{name} must be a positive number of seconds, got {value!r}")
        if self.tau_dark is not None and not self.tau_dark > 0:
            raise ValueError(f"AzoCycle.tau_dark must be positive or None, got {self.tau_dark!r}")
        if not 0.0 <= self.crystallinity_floor < 1.0:
            raise ValueError(f"AzoCycle.crystallinity_floor must be in [0, 1), got {self.crystallinity_floor!r}")
        if not 0.0 <= self.initial_crystallinity <= 1.0:
            raise ValueError(f"AzoCycle.initial_crystallinity must be in [0, 1], got {self.initial_crystallinity!r}")
        if set(self.peaks) != set(PEAKS):
            raise ValueError(f"AzoCycle.peaks must have exactly the keys {PEAKS}, got {sorted(self.peaks)!r}")
        if self.background_amplitude < 0 or self.background_constant < 0:
            raise ValueError("AzoCycle background amplitude and constant must be >= 0, got "
                             f"{self.background_amplitude!r}, {self.background_constant!r}")
        self.schedule = self._checked_schedule(self.schedule)
        self._rebuild()

    # ---- light history ---------------------------------------------------------------
    @staticmethod
    def _checked_schedule(schedule) -> tuple[tuple[float, str], ...]:
        out = []
        for item in schedule:
            try:
                t, light = item
                t = float(t)
            except (TypeError, ValueError):
                raise ValueError(f"schedule entries must be (t_start, light), got {item!r}") from None
            if light not in LIGHTS:
                raise ValueError(f"unknown light {light!r}; expected one of {LIGHTS}")
            if not math.isfinite(t):
                raise ValueError(f"schedule time must be finite, got {t!r}")
            if out and t < out[-1][0]:
                raise ValueError(f"schedule must be sorted by time; {t!r} comes after {out[-1][0]!r}")
            out.append((t, str(light)))
        return tuple(out)

    def _target_tau(self, light: str, x0: float) -> tuple[float, float]:
        """(x_target, tau) for a light; tau = 0 means instantaneous, inf means hold."""
        if light == "uv":
            target, tau = self.crystallinity_floor, self.tau_uv
        elif light == "visible":
            target, tau = 1.0, self.tau_vis
        elif self.tau_dark is None:
            return x0, math.inf
        else:
            target, tau = 1.0, self.tau_dark
        return target, (0.0 if self.step else tau)

    def _rebuild(self) -> None:
        """Crystallinity at the start of every segment (exact ODE solution, chained)."""
        starts, x0s, targets, taus = [], [], [], []
        x = self.initial_crystallinity
        for i, (t0, light) in enumerate(self.schedule):
            if i:
                prev_t0 = starts[-1]
                x = _relax(x0s[-1], targets[-1], taus[-1], t0 - prev_t0)
            target, tau = self._target_tau(light, x)
            starts.append(t0), x0s.append(x), targets.append(target), taus.append(tau)
        self._starts = np.asarray(starts, dtype=float)
        self._x0 = np.asarray(x0s, dtype=float)
        self._target = np.asarray(targets, dtype=float)
        self._tau = np.asarray(taus, dtype=float)

    def set_light(self, t: float, light: str) -> None:
        """Switch the light at time ``t`` s: scheduled segments after ``t`` are dropped."""
        if light not in LIGHTS:
            raise ValueError(f"unknown light {light!r}; expected one of {LIGHTS}")
        t = float(t)
        kept = tuple(seg for seg in self.schedule if seg[0] < t)
        self.schedule = kept + ((t, light),)
        self._rebuild()

    def restart(self, light: str = "dark", t: float = 0.0) -> None:
        """Forget the history: film at ``initial_crystallinity`` with ``light`` from ``t``."""
        if light not in LIGHTS:
            raise ValueError(f"unknown light {light!r}; expected one of {LIGHTS}")
        self.schedule = ((float(t), light),)
        self._rebuild()

    # ---- state at time t -------------------------------------------------------------
    def _segment(self, t: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, t, side="right") - 1

    def light(self, t) -> np.ndarray:
        """Light at time ``t`` (str array, shape of t); "dark" before the schedule."""
        t = np.asarray(t, dtype=float)
        seg = self._segment(t)
        names = np.array([light for _, light in self.schedule] + ["dark"])
        return names[np.where(seg >= 0, seg, len(self.schedule))]

    def crystallinity(self, t) -> np.ndarray:
        """Crystalline fraction x(t) in [0, 1] (shape of t)."""
        t = np.asarray(t, dtype=float)
        if len(self._starts) == 0:
            return np.full(t.shape, self.initial_crystallinity)
        seg = self._segment(t)
        ok = seg >= 0
        i = np.where(ok, seg, 0)
        x = _relax(self._x0[i], self._target[i], self._tau[i], t - self._starts[i])
        return np.where(ok, x, self.initial_crystallinity)

    def amorphous_fraction(self, t) -> np.ndarray:
        """a = (1 - x) / (1 - floor), clipped to [0, 1]: 0 crystalline, 1 fully switched."""
        x = self.crystallinity(t)
        return np.clip((1.0 - x) / (1.0 - self.crystallinity_floor), 0.0, 1.0)

    def truth(self, t) -> dict:
        """Ground truth at time(s) ``t`` s (arrays with the shape of t).

        Returns ``{"lamellar": {"center", "fwhm", "area", "eta"}, "pi_pi": {...},
        "halo": {...}, "crystallinity", "phase", "light", "time"}``; centre and FWHM in 1/nm,
        area in intensity x 1/nm (1D model units), phase one of "crystalline" (a < 0.1),
        "transition", "amorphous" (a > 0.9) with a the amorphous fraction.
        """
        t = np.asarray(t, dtype=float)
        x = self.crystallinity(t)
        a = np.clip((1.0 - x) / (1.0 - self.crystallinity_floor), 0.0, 1.0)
        out: dict = {}
        for name, p in self.peaks.items():
            if name == "halo":
                area = p.area[0] + (p.area[1] - p.area[0]) * (1.0 - x) / (1.0 - self.crystallinity_floor)
            else:
                area = p.area[0] * x + p.area[1] * (1.0 - x)
            out[name] = {
                "center": p.center[0] + (p.center[1] - p.center[0]) * a,
                "fwhm": p.fwhm[0] + (p.fwhm[1] - p.fwhm[0]) * a,
                "area": np.asarray(area, dtype=float),
                "eta": np.full(t.shape, p.eta),
            }
        out["crystallinity"] = x
        out["phase"] = np.where(a < 0.1, "crystalline", np.where(a > 0.9, "amorphous", "transition"))
        out["light"] = self.light(t)
        out["time"] = t
        return out

    def background(self, q) -> np.ndarray:
        """Smooth background A q^-n + C (q in 1/nm, q > 0)."""
        q = np.asarray(q, dtype=float)
        return self.background_amplitude * q ** (-self.background_exponent) + self.background_constant

    def profile(self, q, t) -> np.ndarray:
        """Noiseless 1D model I(q, t): background + three pseudo-Voigts.

        ``q``: (N,) 1/nm; ``t``: scalar -> (N,), or (T,) -> (T, N).
        """
        q = np.asarray(q, dtype=float)
        t = np.asarray(t, dtype=float)
        tr = self.truth(t[..., None])                        # params shaped (..., 1)
        out = np.broadcast_to(self.background(q), t.shape + q.shape).copy()
        for name in PEAKS:
            p = tr[name]
            out += pseudo_voigt(q, p["center"], p["fwhm"], p["area"], p["eta"])
        return out


def _relax(x0, target, tau, dt):
    """Exact first-order relaxation x0 -> target over dt (tau = 0: jump, inf: hold)."""
    x0, target, tau, dt = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x0, target, tau, dt)))
    with np.errstate(divide="ignore", invalid="ignore"):
        decay = np.where(tau == 0.0, 0.0, np.exp(-np.maximum(dt, 0.0) / np.where(tau == 0.0, 1.0, tau)))
    out = target + (x0 - target) * decay
    return out if out.ndim else float(out)


def flatten_truth(truth: dict, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Nested truth -> flat columns ``lamellar_center``, ..., ``halo_eta``, ``crystallinity``,
    ``phase``, ``light``, ``time``; areas multiplied by ``scale`` (e.g. flux x exposure)."""
    flat: dict[str, np.ndarray] = {}
    for name in PEAKS:
        for key, value in truth[name].items():
            flat[f"{name}_{key}"] = value * scale if key == "area" else value
    for key in ("crystallinity", "phase", "light", "time"):
        flat[key] = truth[key]
    return flat
