"""A radius distribution as a histogram on fixed log-spaced bins, for the GISAXS models.

``RadiusBins(r_min, r_max, n_bins, n_sub)``: K bins with edges log-spaced over [r_min, r_max]
(nm); bin k holds the number fraction w_k of the particles (w_k >= 0, sum w_k = 1), spread
uniformly in log r within the bin. The forward models sum over ``n_sub`` Gauss-Legendre nodes in
log r per bin (``nodes``): radius r_kj = exp(l_k + h (1 + x_j) / 2), weight w_k g_j / 2, with
l_k the bin's lower log edge, h its log width and (x_j, g_j) the Legendre nodes on [-1, 1], so the
model is a smooth (linear) function of the weights.

``volume_fractions`` and ``number_fractions`` convert between the number histogram the models
take and the volume-weighted one (w_k <r^3>_k, normalised; <r^3>_k the bin's mean over its nodes),
which the encoder returns and the modes are read from: the scattering weighs a particle by
V^2 ~ r^6, the number histogram of the larger particles is then ill-determined, the volume one
less so (as McSAS reports volume-weighted distributions).

``bin_masses``: the histogram of a number density given by its CDF (mass per bin, renormalised
to the bins' span); ``gaussian_cdf`` and ``lognormal_cdf`` are the two laws the training and
tests use. ``moments``: number-weighted mean radius and relative width (std / mean) of a
histogram (bins as their nodes). ``find_modes``: the modes of a histogram (maxima separated by a
dip), each with its position (mean radius of its basin) and weight (its basin's mass).
``cdf_distance``: Wasserstein-1 distance in log r between histograms (sum |CDF_a - CDF_b| h).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RadiusBins:
    """K log-spaced radius bins over [r_min, r_max] nm, n_sub Legendre nodes each (module docstring)."""
    r_min: float
    r_max: float
    n_bins: int
    n_sub: int = 3

    def __post_init__(self):
        if not (0 < self.r_min < self.r_max and self.n_bins >= 2 and self.n_sub >= 1):
            raise ValueError(f"RadiusBins: need 0 < r_min < r_max, n_bins >= 2, n_sub >= 1, got "
                             f"{self.r_min}, {self.r_max}, {self.n_bins}, {self.n_sub}")

    @property
    def log_width(self) -> float:
        return math.log(self.r_max / self.r_min) / self.n_bins

    def edges(self) -> np.ndarray:
        """(K + 1,) bin edges, nm."""
        return self.r_min * np.exp(self.log_width * np.arange(self.n_bins + 1))

    def centres(self) -> np.ndarray:
        """(K,) geometric bin centres, nm."""
        return self.r_min * np.exp(self.log_width * (np.arange(self.n_bins) + 0.5))

    def nodes(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Radii (K n_sub,) nm and node weights (B, K n_sub) of histograms ``weights`` (B, K)."""
        x, g = np.polynomial.legendre.leggauss(self.n_sub)
        lr = math.log(self.r_min) + self.log_width * (np.arange(self.n_bins)[:, None] + 0.5 * (1.0 + x[None]))
        r = torch.as_tensor(np.exp(lr).reshape(-1), dtype=weights.dtype, device=weights.device)
        gw = torch.as_tensor(0.5 * g, dtype=weights.dtype, device=weights.device)
        return r, (weights[:, :, None] * gw).reshape(weights.shape[0], -1)

    def mean_r3(self, like: torch.Tensor) -> torch.Tensor:
        """(K,) mean of r^3 (nm^3) over each bin's nodes, dtype and device of ``like``."""
        r, w = self.nodes(torch.eye(self.n_bins, dtype=like.dtype, device=like.device))
        return w @ r ** 3

    def as_dict(self) -> dict:
        return {"r_min": self.r_min, "r_max": self.r_max, "n_bins": self.n_bins, "n_sub": self.n_sub}

    @classmethod
    def from_dict(cls, d: dict) -> "RadiusBins":
        return cls(float(d["r_min"]), float(d["r_max"]), int(d["n_bins"]), int(d["n_sub"]))


def volume_fractions(bins: RadiusBins, number: torch.Tensor) -> torch.Tensor:
    """Volume-weighted histograms (B, K) of number histograms (B, K) (module docstring)."""
    v = number * bins.mean_r3(number)
    return v / v.sum(-1, keepdim=True)


def number_fractions(bins: RadiusBins, volume: torch.Tensor) -> torch.Tensor:
    """Number histograms (B, K) of volume-weighted histograms (B, K): the inverse of ``volume_fractions``."""
    n = volume / bins.mean_r3(volume)
    return n / n.sum(-1, keepdim=True)


def gaussian_cdf(mean, sd):
    """CDF of a Gaussian number density in r (nm): r -> Phi((r - mean) / sd); arrays broadcast."""
    from scipy.special import ndtr
    return lambda r: ndtr((r - mean) / sd)


def lognormal_cdf(median, s):
    """CDF of a log-normal number density in r: r -> Phi(ln(r / median) / s)."""
    from scipy.special import ndtr
    return lambda r: ndtr(np.log(r / median) / s)


def bin_masses(bins: RadiusBins, cdf) -> np.ndarray:
    """Histogram (B, K) of number densities given by ``cdf`` (edges (K + 1,) -> (B, K + 1)): the
    mass of each bin, renormalised to the mass inside [r_min, r_max]."""
    c = np.atleast_2d(cdf(bins.edges()))
    m = np.diff(c, axis=-1)
    return m / m.sum(-1, keepdims=True)


def radius_moments(bins: RadiusBins, number: torch.Tensor) -> torch.Tensor:
    """(B, 2): number-weighted mean radius (nm) and relative width (std / mean) of number
    histograms (B, K); differentiable."""
    r, wn = bins.nodes(number)
    s = wn.sum(-1)
    mean = (wn * r).sum(-1) / s
    var = (wn * (r - mean[:, None]) ** 2).sum(-1) / s
    return torch.stack([mean, var.clamp_min(0).sqrt() / mean], -1)


def moments(bins: RadiusBins, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number-weighted mean radius (B,) nm and relative width std / mean (B,) of histograms
    (B, K), in numpy (``radius_moments``)."""
    m = radius_moments(bins, torch.as_tensor(np.asarray(weights, np.float64))).numpy()
    return m[:, 0], m[:, 1]


def find_modes(bins: RadiusBins, weights: np.ndarray, dip: float = 0.7, min_mass: float = 0.05) -> list:
    """Modes of one histogram (K,): local maxima whose basins (bins between the neighbouring
    minima) hold at least ``min_mass``, two maxima merged unless the lowest bin between them is
    below ``dip`` times the smaller maximum. Returns [(mean radius of the basin nm, its mass)],
    by increasing radius."""
    w = np.asarray(weights, np.float64)
    c = bins.centres()
    n = len(w)
    peaks = [k for k in range(n) if w[k] > 0 and (k == 0 or w[k] >= w[k - 1]) and (k == n - 1 or w[k] > w[k + 1])]
    merged = [peaks[0]] if peaks else []
    for k in peaks[1:]:
        j = merged[-1]
        if w[j:k + 1].min() < dip * min(w[j], w[k]):
            merged.append(k)
        elif w[k] > w[j]:
            merged[-1] = k
    cuts = [0] + [a + int(np.argmin(w[a:b + 1])) for a, b in zip(merged[:-1], merged[1:])] + [len(w)]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        m = w[a:b].sum()
        if m >= min_mass:
            out.append((float((w[a:b] * c[a:b]).sum() / m), float(m)))
    return out


def cdf_distance(bins: RadiusBins, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Wasserstein-1 distance in ln r between histograms a, b (B, K): sum_k |A_k - B_k| h (B,)."""
    return (a.cumsum(-1) - b.cumsum(-1)).abs().sum(-1) * bins.log_width
