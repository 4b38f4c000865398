"""Simulated grazing-incidence frames (GISAXS, GIWAXS) of the azopolymer film of ``AzoCycle``.

Intensity per solid angle of a pixel at exit angle αf (rad) and scattering vector q (1/nm):

    I = T(αf) · S(q) for αf > 0,   0 for αf <= 0 (the sample horizon shadows the film)

    T(α) = |t(α)|²,  t(α) = 2 sin α / (sin α + √(sin²α − αc² + 2iβ))

the Fresnel transmission of the exit wave (αc = √(2δ), PHYSICS.md); its maximum at αf ≈ αc is
the Yoneda band (with β = 2e-9 at 0.996 αc). The constant incident factor |t(αi)|² is folded
into the flux; no specular or direct beam is drawn.

* ``"gisaxs"``: S = B(|q|) + Σ± (A/2) pV(q_xy ∓ c; Γ, η) R(q_z), R = 1 / (1 + (q_z/q_rod)²):
  Bragg rods of standing lamellae at q_xy = ±2π/d, extended along q_z. A horizontal cut at
  R = T = 1 shows two rods of area A/2 each.
* ``"giwaxs"``: S = B(|q|) + halo(|q|) + Σ_{lamellar, π-π} pV(|q|; c, Γ, η, A) g_p(χ), with
  χ the polar angle of q from the surface normal and g_p = f_iso + (1 − f_iso) G(ψ)/N,
  G = exp(−ψ²/(2σ²)), ψ the angle of q from the preferred axis (π-π face-on: the normal;
  lamellar edge-on: the plane), N such that ∫₀^{π/2} g sin χ dχ = 1, so each arc averaged
  over the hemisphere is AzoCycle's powder peak (same area).

B, halo and the peak centres c, FWHM Γ, shape η and areas A (∝ crystalline fraction) come
from ``AzoCycle.truth(t)``. Expected counts λ = flux · exposure · I · Ω · P as
``FrameSimulator`` (pyFAI solid angle and polarization), so a ``workers.grazing`` map with
the same corrections returns flux · exposure · I. q, αf and χ per pixel are computed here from
pyFAI's pixel positions with PHYSICS.md's angle formulas, independently of
``workers.grazing`` (the tests compare the two): k_f = R_y(αi) R_x(−τ) k̂_lab,
αf = asin(k_f,z), 2θf = atan2(k_f,y, k_f,x), q_x = k (cos αf cos 2θf − cos αi),
q_y = k cos αf sin 2θf, q_z = k (sin αf + sin αi), q_xy = sign(q_y) √(q_x² + q_y²).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from service.sim.azopolymer import AzoCycle, flatten_truth, pseudo_voigt

Mode = Literal["gisaxs", "giwaxs"]

#: Pilatus 300k (619 x 487, portrait) at 0.5 m, beam 40 rows above the bottom edge.
GISAXS_GEOMETRY = dict(dist=0.5, poni1=0.0070, poni2=0.0419, wavelength=1.0e-10, detector="Pilatus300k")
#: a landscape 300k-pixel detector (487 x 619, 172 µm) at 0.15 m, beam near the bottom edge.
GIWAXS_GEOMETRY = dict(dist=0.15, poni1=0.0050, poni2=0.0532, wavelength=1.0e-10, detector="Detector",
                       pixel1=172e-6, pixel2=172e-6, shape=(487, 619))
INCIDENT_ANGLE = 3.5e-3      # rad, 0.2°
CRITICAL_ANGLE = 1.8e-3      # rad, polymer film at 12.4 keV (δ ≈ 1.6e-6)


def default_grazing_geometry(mode: Mode = "giwaxs"):
    """The demo ``workers.grazing.GrazingGeometry`` for ``mode`` (αi = 3.5 mrad, no tilt)."""
    from workers.geometry import Geometry
    from workers.grazing import GrazingGeometry

    if mode not in ("gisaxs", "giwaxs"):
        raise ValueError(f"mode must be 'gisaxs' or 'giwaxs', got {mode!r}")
    geo = Geometry(**(GISAXS_GEOMETRY if mode == "gisaxs" else GIWAXS_GEOMETRY))
    return GrazingGeometry(geo, incident_angle=INCIDENT_ANGLE)


def fresnel_transmission(alpha: np.ndarray, critical_angle: float, beta: float) -> np.ndarray:
    """|t(α)|² of the film surface (α in rad; 0 for α <= 0)."""
    s = np.sin(np.asarray(alpha, dtype=float))
    kz = np.sqrt(s * s - critical_angle ** 2 + 2j * beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = 2.0 * s / (s + kz)
    return np.where(s > 0, np.abs(t) ** 2, 0.0)


def reference_gi_pixels(ai, incident_angle: float, tilt_angle: float = 0.0) -> dict[str, np.ndarray]:
    """Per-pixel GI quantities (H, W) from a pyFAI integrator's pixel positions (see module doc).

    Keys q_x, q_y, q_z, q_xy, q (1/nm), alpha_f, tth_f, chi (rad); sample orientation 1.
    """
    d1, d2 = np.indices(ai.detector.shape, dtype=np.float64)       # float64 indices: float64 positions
    z, y, x = ai.calc_pos_zyx(d1=d1, d2=d2, use_cython=False)      # t3 (beam), t1 (up), t2
    r = np.sqrt(x * x + y * y + z * z)
    beam, horz, vert = z / r, x / r, y / r
    ca, sa, ct, st = math.cos(incident_angle), math.sin(incident_angle), math.cos(tilt_angle), math.sin(tilt_angle)
    horz, vert = ct * horz + st * vert, -st * horz + ct * vert            # R_x(−τ)
    kx, kz = ca * beam + sa * vert, -sa * beam + ca * vert                 # R_y(αi)
    ky = horz
    alpha_f = np.arcsin(np.clip(kz, -1.0, 1.0))
    tth_f = np.arctan2(ky, kx)
    k = 2.0e-9 * math.pi / ai.wavelength
    q_x = k * (np.cos(alpha_f) * np.cos(tth_f) - ca)
    q_y = k * np.cos(alpha_f) * np.sin(tth_f)
    q_z = k * (np.sin(alpha_f) + sa)
    q_xy = np.where(q_y > 0, 1.0, -1.0) * np.hypot(q_x, q_y)
    return dict(q_x=q_x, q_y=q_y, q_z=q_z, q_xy=q_xy, q=np.sqrt(q_xy ** 2 + q_z ** 2),
                alpha_f=alpha_f, tth_f=tth_f, chi=np.arctan2(q_xy, q_z))


def orientation_weight(chi: np.ndarray, *, axis: Literal["normal", "plane"], width: float,
                       isotropic_fraction: float) -> np.ndarray:
    """g(χ) (module doc): pole density per solid angle, hemisphere-normalised; χ in rad."""
    from scipy.integrate import quad

    def psi(c):
        c = np.minimum(np.abs(c), math.pi - np.abs(c))        # up-down symmetric film
        return c if axis == "normal" else 0.5 * math.pi - c

    gauss = lambda c: np.exp(-0.5 * (psi(c) / width) ** 2)
    norm = quad(lambda c: gauss(c) * math.sin(c), 0.0, 0.5 * math.pi, limit=200)[0]
    return isotropic_fraction + (1.0 - isotropic_fraction) * gauss(chi) / norm


class GrazingFrameSimulator:
    """Poisson GISAXS/GIWAXS frames of an :class:`AzoCycle` film (model in the module doc).

    ``geometry``: a ``workers.grazing.GrazingGeometry`` (None: :func:`default_grazing_geometry`),
    sample orientation 1; ``critical_angle`` αc and ``beta`` (film absorption) of the film;
    ``orientation_width`` σ (rad) and ``isotropic_fraction`` of the GIWAXS arcs; ``rod_decay``
    q_rod (1/nm) of the GISAXS rods; ``flux``, ``exposure``, ``polarization_factor``,
    ``noise``, ``seed`` as ``FrameSimulator``. Frames are int32, module gaps −1.
    """

    def __init__(self, geometry=None, cycle: AzoCycle | None = None, *, mode: Mode = "giwaxs",
                 critical_angle: float = CRITICAL_ANGLE, beta: float = 2e-9,
                 orientation_width: float = 0.2, isotropic_fraction: float = 0.1,
                 rod_decay: float = 2.0, flux: float = 1.0, exposure: float = 1.0,
                 polarization_factor: float | None = 0.95,
                 noise: Literal["poisson", "none"] = "poisson", seed: int | None = 0):
        if mode not in ("gisaxs", "giwaxs"):
            raise ValueError(f"mode must be 'gisaxs' or 'giwaxs', got {mode!r}")
        checks = {"critical_angle": critical_angle, "orientation_width": orientation_width,
                  "rod_decay": rod_decay, "flux": flux, "exposure": exposure}
        for name, value in checks.items():
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"GrazingFrameSimulator {name} must be positive, got {value!r}")
        if not (0.0 <= beta < 1e-3):
            raise ValueError(f"beta must be in [0, 1e-3), got {beta!r}")
        if not 0.0 <= isotropic_fraction <= 1.0:
            raise ValueError(f"isotropic_fraction must be in [0, 1], got {isotropic_fraction!r}")
        if noise not in ("poisson", "none"):
            raise ValueError(f"noise must be 'poisson' or 'none', got {noise!r}")
        if polarization_factor is not None and not -1.0 <= polarization_factor <= 1.0:
            raise ValueError(f"polarization_factor must be in [-1, 1] or None, got {polarization_factor!r}")
        self.grazing = geometry if geometry is not None else default_grazing_geometry(mode)
        if getattr(self.grazing, "sample_orientation", None) != 1:
            raise ValueError("GrazingFrameSimulator needs a GrazingGeometry with sample_orientation 1, "
                             f"got {self.grazing!r}")
        self.mode, self.noise = mode, noise
        self.cycle = cycle if cycle is not None else AzoCycle()
        self.critical_angle, self.beta = float(critical_angle), float(beta)
        self.orientation_width, self.isotropic_fraction = float(orientation_width), float(isotropic_fraction)
        self.rod_decay = float(rod_decay)
        self.flux, self.exposure = float(flux), float(exposure)
        self.rng = np.random.default_rng(seed)

        ai = self.ai = self.grazing.geometry.to_pyfai()        # pyFAI integrator (plans: start["geometry"])
        self.polarization_factor = polarization_factor
        self.shape: tuple[int, int] = tuple(self.grazing.shape)
        self.pixels = reference_gi_pixels(ai, self.grazing.incident_angle, self.grazing.tilt_angle)
        omega = np.asarray(ai.solidAngleArray(self.shape), dtype=float)
        pol = (np.ones(self.shape) if polarization_factor is None
               else np.asarray(ai.polarization(self.shape, factor=polarization_factor), dtype=float))
        det_mask = ai.detector.mask
        self.gap_mask = np.zeros(self.shape, bool) if det_mask is None else np.asarray(det_mask, bool)
        self.horizon_mask = self.pixels["alpha_f"] <= 0
        self.transmission = fresnel_transmission(self.pixels["alpha_f"], self.critical_angle, self.beta)
        self._gain = self.scale * omega * pol
        self._gain[self.gap_mask] = 0.0
        if mode == "giwaxs":
            kw = dict(width=self.orientation_width, isotropic_fraction=self.isotropic_fraction)
            self.orientation = {"pi_pi": orientation_weight(self.pixels["chi"], axis="normal", **kw),
                                "lamellar": orientation_weight(self.pixels["chi"], axis="plane", **kw)}
        else:
            self.rod_profile = 1.0 / (1.0 + (self.pixels["q_z"] / self.rod_decay) ** 2)

    @property
    def scale(self) -> float:
        """flux * exposure: a corrected map shows scale * I."""
        return self.flux * self.exposure

    @property
    def mask(self) -> np.ndarray:
        """bool (H, W), True = module gap."""
        return self.gap_mask

    def intensity(self, t: float) -> np.ndarray:
        """Noiseless I (H, W) per solid angle at time t s (module doc), before flux and corrections."""
        tr = self.cycle.truth(float(t))
        px = self.pixels
        s = self.cycle.background(np.maximum(px["q"], 1e-6))
        if self.mode == "gisaxs":
            p = tr["lamellar"]
            for sign in (1.0, -1.0):
                s = s + pseudo_voigt(px["q_xy"], sign * p["center"], p["fwhm"], 0.5 * p["area"],
                                     p["eta"]) * self.rod_profile
        else:
            h = tr["halo"]
            s = s + pseudo_voigt(px["q"], h["center"], h["fwhm"], h["area"], h["eta"])
            for name in ("lamellar", "pi_pi"):
                p = tr[name]
                s = s + pseudo_voigt(px["q"], p["center"], p["fwhm"], p["area"], p["eta"]) * self.orientation[name]
        return self.transmission * s

    def expected(self, t: float) -> np.ndarray:
        """Expected counts (H, W) float64 at time t s (gaps 0)."""
        return self._gain * self.intensity(t)

    def frame(self, t: float) -> np.ndarray:
        """One frame at time t s: int32 (H, W), module gaps −1."""
        lam = self.expected(t)
        counts = (self.rng.poisson(lam) if self.noise == "poisson" else np.rint(lam)).astype(np.int32)
        counts[self.gap_mask] = -1
        return counts

    def truth(self, t) -> dict[str, np.ndarray]:
        """Flat truth at time(s) t (``flatten_truth`` columns, areas x ``scale``) plus
        ``incident_angle``, ``critical_angle`` (rad), ``yoneda_qz`` (1/nm) and, for GISAXS,
        ``rod_center`` (±, 1/nm), ``rod_fwhm`` (1/nm), ``rod_area`` (per rod at R = T = 1)."""
        t = np.asarray(t, dtype=float)
        nested = self.cycle.truth(t)
        out = flatten_truth(nested, scale=self.scale)
        k = 2.0e-9 * math.pi / self.grazing.geometry.wavelength
        ai = self.grazing.incident_angle
        out["incident_angle"] = np.full(t.shape, ai)
        out["critical_angle"] = np.full(t.shape, self.critical_angle)
        out["yoneda_qz"] = np.full(t.shape, k * (math.sin(ai) + math.sin(self.critical_angle)))
        if self.mode == "gisaxs":
            lam = nested["lamellar"]
            out["rod_center"], out["rod_fwhm"] = lam["center"], lam["fwhm"]
            out["rod_area"] = 0.5 * lam["area"] * self.scale
        return out
