"""Does the model describe the frame? A verdict per frame and a summary per run.

Per frame, from the fit's chi2 = chi2_red * dof with dof = N - P (N points with weight, P
parameters): the p-value P(X >= chi2) of X ~ chi2(dof), i.e. Q(dof/2, chi2/2) with Q the
regularised upper incomplete gamma function (``torch.special.gammaincc``), and the verdict

* ``good``: p_value >= good_p_value (default 1e-3): the model describes the data within their
  errors;
* ``bad``: chi2_red > bad_chi2 (default 4), or no finite chi2: the misfit exceeds the noise by
  more than sqrt(bad_chi2 - 1) ~ 1.7 sigma rms; the model cannot describe the sample (hard
  spheres on a profile with a low-q upturn give 10-34, issue 28);
* ``poor``: otherwise: a significant misfit of the order of the noise (a slightly wrong model,
  or errors underestimated up to 2x).

A model is "adequate" for a frame unless the verdict is ``bad``. With N ~ 300 points, p = 1e-3
is chi2_red ~ 1.27: real data whose errors are underestimated are "poor", not "bad".
"""
from __future__ import annotations

import numpy as np
import torch

QUALITY = ("good", "poor", "bad")


def fit_verdict(chi2_red: torch.Tensor, dof: torch.Tensor, *, good_p_value: float = 1e-3,
                bad_chi2: float = 4.0) -> tuple[torch.Tensor, np.ndarray]:
    """p-value (B,) float64 and verdict (B,) str (module docstring) from chi2_red, dof (B,)."""
    c = chi2_red.detach().to(torch.float64)
    k = dof.detach().to(c).clamp_min(1)
    finite = torch.isfinite(c)
    p = torch.special.gammaincc(k / 2, torch.where(finite, c, torch.zeros_like(c)).clamp_min(0) * k / 2)
    p = torch.where(finite, p, torch.full_like(p, float("nan")))
    good = (p >= good_p_value).cpu().numpy()
    bad = (~finite | (c > bad_chi2)).cpu().numpy()
    verdict = np.where(bad, "bad", np.where(good, "good", "poor"))
    return p, verdict


def _cat(rows) -> dict[str, np.ndarray]:
    if isinstance(rows, dict):
        return {k: np.asarray(v) for k, v in rows.items()}
    rows = [r for r in rows if r and len(r["seq_num"])]
    return {k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in rows[0]} if rows else {}


def inversion_summary(rows) -> dict:
    """A run's inversion at a glance, from its rows (``inversion_rows``' columns, one dict or a
    list of batches): frames, model, verdict counts, ``adequate_fraction`` (verdict not bad),
    ``median_chi2`` (reduced), ``converged_fraction``, ``at_bound_fraction`` per parameter and
    the LM starts used (``warm_start`` counts). JSON-ready (floats, ints, strings)."""
    t = _cat(rows)
    n = len(t.get("seq_num", ()))
    if n == 0:
        return {"frames": 0}
    q = t["fit_quality"].astype(str)
    chi2 = t["chi2"].astype(float)
    out = {"frames": n, "model": ",".join(sorted(set(t["model"].astype(str)))),
           **{k: int((q == k).sum()) for k in QUALITY},
           "adequate_fraction": float((q != "bad").mean()),
           "median_chi2": float(np.nanmedian(chi2)) if np.isfinite(chi2).any() else float("nan"),
           "converged_fraction": float(t["converged"].astype(bool).mean()),
           "at_bound_fraction": {c[:-len("_at_bound")]: float(t[c].astype(bool).mean())
                                 for c in t if c.endswith("_at_bound")},
           "warm_start": {s: int((t["warm_start"].astype(str) == s).sum()) for s in sorted(set(t["warm_start"].astype(str)))}}
    return out
