"""Per-modality reduction in the worker: the profile that goes to the fitter, and what else a
frame batch yields (``reduction.modality``; per run from the start document, service/detectors.py).

* ``saxs``, ``waxs`` (transmission): the worker's 1D azimuthal integrator
  (``workers.integrate.build_integrator_1d``, service/worker.py); no extras.
* ``gisaxs``: fitted profile I(q_xy), the Yoneda cut (``workers.grazing.build_yoneda_cut``:
  the q_z band of exit angles αc ± ``yoneda_half_width``, default αc/4); extras: the vertical
  cut I(q_z) along the rod (``build_vertical_cut``, q_xy in ``rod_q_xy_band`` on both sides),
  and (q_xy, q_z) maps.
* ``giwaxs``: fitted profile I(|q|), the out-of-plane wedge (|χ| in ``out_of_plane_sector``
  from the surface normal, ``build_wedge_profiles``); extras: the in-plane wedge, Hermans'
  orientation f = (3⟨cos²χ⟩ − 1)/2 of I(χ)|sin χ| over |q| in ``orientation_q_band``
  (``build_chi_sector`` with the |sin χ| correction, ``hermans_orientation``; background under
  the ring not subtracted), and (q_xy, q_z) maps.

Profiles of grazing runs are masked below the sample horizon (``horizon_mask``); maps are not,
so the horizon's shadow shows. Maps are taken of the run's first frame and of every
``snapshot_every``-th seq_num (as the worker's 2D snapshots) on ``qmap_npt`` bins.

Extras added to the worker's answer (``out``), rows in batch order:

    "maps":           {"q_xy": (Nxy,) 1/nm, "q_z": (Nz,) 1/nm,
                       "images": [(seq_num, (Nz, Nxy) float32, NaN = no pixel: missing wedge, off detector), ...]}
    "extra_profiles": {name: {"radial": (N,), "unit": str, "intensity": (B, N) float32, "sigma": (B, N) float32}}
    "scalars":        {name: (B,) float64}

torch and workers.grazing are imported only when a grazing run is set up.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .detectors import GRAZING, MODALITIES, rod_band

log = logging.getLogger(__name__)

__all__ = ["GRAZING", "MODALITIES", "GrazingReduction", "pick_snapshots"]

CHI_BINS = 90          # bins of the orientation sector over orientation_chi_range


def pick_snapshots(seq: np.ndarray, every: int, first_pending: bool) -> np.ndarray:
    """Indices of the frames of a batch to snapshot: the run's first frame (when
    ``first_pending``) and every seq_num divisible by ``every`` (0: none)."""
    if not every or len(seq) == 0:
        return np.zeros(0, np.int64)
    pick = np.asarray(seq, np.int64) % every == 0
    if first_pending:
        pick[0] = True
    return np.flatnonzero(pick)


@dataclass
class _Parts:
    """The integrators of one grazing setup (cached per geometry, mask and reduction)."""
    main: object                                  # workers.grazing.LineIntegrator: the fitted profile
    extra: dict = field(default_factory=dict)     # name -> LineIntegrator
    chi: object | None = None                     # orientation sector (giwaxs)
    qmap: object | None = None                    # workers.grazing.QMapIntegrator


def _build(setup, device: str) -> _Parts:
    from workers.grazing import (GrazingGeometry, build_chi_sector, build_qmap, build_vertical_cut,
                                 build_wedge_profiles, build_yoneda_cut, horizon_mask)
    r = setup.reduction
    ggeo = GrazingGeometry(setup.geometry, incident_angle=r["incident_angle"], tilt_angle=r.get("tilt_angle", 0.0),
                           sample_orientation=r.get("sample_orientation", 1))
    mask = setup.mask if setup.mask is not None else setup.geometry.detector_mask()
    below = mask | horizon_mask(ggeo)
    opts = dict(method=r.get("method", "bbox"), dummy=-1.0, delta_dummy=0.5, polarization_factor=r.get("polarization"),
                dark=setup.dark, flat=setup.flat, device=device)
    npt = int(r.get("npt", 1000))
    log.info("worker %d: building %s matrices for %s (αi %.4g rad, %d bins, map %s)", os.getpid(), r["modality"],
             setup.geometry.detector, r["incident_angle"], npt, tuple(r["qmap_npt"]))
    qmap = build_qmap(ggeo, npt=tuple(r["qmap_npt"]), q_xy_range=r.get("qmap_q_xy_range"),
                      q_z_range=r.get("qmap_q_z_range"), mask=mask, **opts)
    if r["modality"] == "gisaxs":
        main = build_yoneda_cut(ggeo, critical_angle=r["critical_angle"], half_width=r.get("yoneda_half_width"),
                                npt=npt, q_xy_range=r.get("radial_range"), mask=below, **opts)
        rod = build_vertical_cut(ggeo, q_xy_band=rod_band(r, setup.fit), both_sides=True, npt=npt,
                                 q_z_range=r.get("qmap_q_z_range"), mask=below, **opts)
        return _Parts(main=main, extra={"vertical_cut": rod}, qmap=qmap)
    oop, ip = build_wedge_profiles(ggeo, npt=npt, q_range=r.get("radial_range"), out_of_plane=r["out_of_plane_sector"],
                                   in_plane=r["in_plane_sector"], mask=below, **opts)
    chi = None
    if r.get("orientation_q_band") is not None:
        try:
            chi = build_chi_sector(ggeo, q_band=r["orientation_q_band"], npt=CHI_BINS,
                                   chi_range=r.get("orientation_chi_range"), mask=below, **opts)
        except ValueError as exc:         # e.g. no pixel in the band: the run goes on without it
            log.warning("worker %d: no orientation sector: %s", os.getpid(), exc)
    return _Parts(main=oop, extra={"in_plane": ip}, chi=chi, qmap=qmap)


def _as_profile(result) -> dict:
    return {"radial": result.radial.double().cpu().numpy(), "unit": result.unit,
            "intensity": result.intensity.float().cpu().numpy(), "sigma": result.sigma.float().cpu().numpy()}


class GrazingReduction:
    """GISAXS/GIWAXS reduction of one run (module doc). ``cache``: the worker's integrator
    cache (matrices are built once per geometry, mask and reduction settings).

    Call with a (B, H, W) frame batch tensor on the worker's device and its seq_nums; returns
    (main integrator, fitted profile ``IntegrationResult``, extras dict)."""

    def __init__(self, setup, device: str, cache: dict):
        r = setup.reduction
        if r.get("modality") not in GRAZING:
            raise ValueError(f"GrazingReduction needs modality in {GRAZING}, got {r.get('modality')!r}")
        if setup.geometry is None:
            raise ValueError("GrazingReduction needs a geometry")
        key = f"{setup.integrator_key(tuple(setup.geometry.shape))}:{r['modality']}"
        if key not in cache:
            cache[key] = _build(setup, device)
        self.parts: _Parts = cache[key]
        self.every = int(r.get("snapshot_every") or 0)
        self._first_pending = True

    @property
    def integrator(self):
        """The integrator of the fitted profile (its ``corrected`` gives the 2D snapshots)."""
        return self.parts.main

    def __call__(self, batch, seq: np.ndarray):
        from workers.grazing import hermans_orientation
        p = self.parts
        result = p.main(batch)
        extras: dict = {"extra_profiles": {name: _as_profile(integ(batch)) for name, integ in p.extra.items()}}
        if p.chi is not None:
            sector = p.chi(batch)
            f = hermans_orientation(p.chi.radial, sector.intensity.double())
            extras["scalars"] = {"hermans_orientation": f.cpu().numpy().astype(np.float64)}
        maps = self._maps(batch, seq)
        if maps is not None:
            extras["maps"] = maps
        return p.main, result, extras

    def _maps(self, batch, seq: np.ndarray) -> dict | None:
        idx = pick_snapshots(seq, self.every, self._first_pending)
        if len(seq):
            self._first_pending = False
        if idx.size == 0:
            return None
        qm = self.parts.qmap
        try:
            images = qm(batch[idx.tolist()]).intensity.float().cpu().numpy()
        except Exception:        # a view for people: never lose the batch's profiles over it
            log.exception("worker %d: q-map of frame(s) %s failed", os.getpid(), np.asarray(seq)[idx].tolist())
            return None
        return {"q_xy": np.asarray(qm.q_xy, np.float64), "q_z": np.asarray(qm.q_z, np.float64),
                "images": [(int(seq[i]), images[k]) for k, i in enumerate(idx)]}
