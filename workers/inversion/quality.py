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


class InversionTally:
    """A run's inversion at a glance, counted batch by batch (bounded memory for any run length):
    frames, model(s), verdict counts, ``adequate_fraction`` (verdict not bad),
    ``converged_fraction``, ``at_bound_fraction`` per parameter and the LM starts used
    (``warm_start`` counts). ``add`` takes ``inversion_rows``' columns."""

    def __init__(self):
        self.frames = 0
        self.models: set[str] = set()
        self.verdicts = dict.fromkeys(QUALITY, 0)
        self.converged = 0
        self.at_bound: dict[str, int] = {}
        self.warm_start: dict[str, int] = {}

    def add(self, rows: dict) -> None:
        n = len(rows.get("seq_num", ()))
        if n == 0:
            return
        self.frames += n
        self.models.update(np.asarray(rows["model"]).astype(str).tolist())
        q = np.asarray(rows["fit_quality"]).astype(str)
        for k in QUALITY:
            self.verdicts[k] += int((q == k).sum())
        self.converged += int(np.asarray(rows["converged"]).astype(bool).sum())
        for c in rows:
            if c.endswith("_at_bound"):
                name = c[:-len("_at_bound")]
                self.at_bound[name] = self.at_bound.get(name, 0) + int(np.asarray(rows[c]).astype(bool).sum())
        for s in np.asarray(rows["warm_start"]).astype(str).tolist():
            self.warm_start[s] = self.warm_start.get(s, 0) + 1

    def summary(self) -> dict:
        """JSON-ready (ints, floats, strings); {"frames": 0} before the first row."""
        n = self.frames
        if n == 0:
            return {"frames": 0}
        return {"frames": n, "model": ",".join(sorted(self.models)), **self.verdicts,
                "adequate_fraction": (n - self.verdicts["bad"]) / n, "converged_fraction": self.converged / n,
                "at_bound_fraction": {k: v / n for k, v in self.at_bound.items()},
                "warm_start": dict(sorted(self.warm_start.items()))}


def inversion_summary(rows) -> dict:
    """``InversionTally.summary`` of all ``rows`` (one dict of columns or a list of batches) and
    ``median_chi2`` (reduced) over them."""
    t = _cat(rows)
    tally = InversionTally()
    tally.add(t)
    out = tally.summary()
    if out["frames"]:
        chi2 = t["chi2"].astype(float)
        out["median_chi2"] = float(np.nanmedian(chi2)) if np.isfinite(chi2).any() else float("nan")
    return out
