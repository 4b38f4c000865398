"""Small encoders that map a SAXS profile or a GISAXS map to bounded physical parameters.

As DONUT (arXiv 2507.14038), the last layer's outputs are physical parameters: each raw output
z_j goes through a sigmoid and is scaled into its interval, p = lo + (hi - lo) sigmoid(z) (or
log-scaled: p = exp(log lo + (log hi - log lo) sigmoid(z)) for scale-like parameters such as
radii), so an encoder can never return a value outside [lo, hi].

Inputs are normalised so that the encoder sees shape, not amplitude:

* profiles (``profile_features``): a fixed log-spaced grid ``q_grid`` (L,); each frame's
  log10 I is averaged into the grid's cells (linear log-log interpolation where a cell holds no
  point), minus its mean over valid cells; channels (B, 3, L) = (log10 I - mean, log10 of the
  relative error of that mean, valid mask). Cells outside the measured range are masked (0).
* maps (``map_features``): log10 I on the model's own q_xy/q_z grid minus its mean, and a mask.

``MapHistogramEncoder`` also returns a radius distribution: K softmax volume fractions on fixed
radius bins (``workers.inversion.distribution``) beside the bounded parameters.

Checkpoints are plain dicts of tensors, strings, numbers and lists (``encoder_state`` /
``encoder_from_state``), so ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamBounds:
    """Names and physical intervals of the encoded parameters; log=True scales in log space."""
    names: tuple[str, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    log: tuple[bool, ...]

    def __post_init__(self):
        n = len(self.names)
        if not (len(self.lo) == len(self.hi) == len(self.log) == n):
            raise ValueError(f"ParamBounds: names, lo, hi, log must have equal lengths, got "
                             f"{len(self.names)}, {len(self.lo)}, {len(self.hi)}, {len(self.log)}")
        for nm, lo, hi, lg in zip(self.names, self.lo, self.hi, self.log):
            if not lo < hi:
                raise ValueError(f"ParamBounds: {nm}: lo={lo} must be < hi={hi}")
            if lg and not lo > 0:
                raise ValueError(f"ParamBounds: {nm}: log scaling needs lo > 0, got {lo}")

    def _t(self, like: torch.Tensor):
        lo = torch.tensor(self.lo, dtype=like.dtype, device=like.device)
        hi = torch.tensor(self.hi, dtype=like.dtype, device=like.device)
        lg = torch.tensor(self.log, device=like.device)
        return torch.where(lg, lo.log(), lo), torch.where(lg, hi.log(), hi), lg

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        """u in [0, 1] (B, P) -> physical parameters in [lo, hi] (B, P)."""
        a, b, lg = self._t(u)
        v = a + (b - a) * u
        return torch.where(lg, v.exp(), v)

    def to_unit(self, p: torch.Tensor) -> torch.Tensor:
        """Physical parameters (B, P) -> u (B, P), 0 at lo and 1 at hi (not clipped)."""
        a, b, lg = self._t(p)
        v = torch.where(lg, p.clamp_min(1e-300).log(), p)
        return (v - a) / (b - a)

    def lower(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.lo, dtype=like.dtype, device=like.device)

    def upper(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.hi, dtype=like.dtype, device=like.device)

    def as_dict(self) -> dict:
        return {"names": list(self.names), "lo": list(self.lo), "hi": list(self.hi), "log": list(self.log)}

    @classmethod
    def from_dict(cls, d: dict) -> "ParamBounds":
        return cls(tuple(d["names"]), tuple(float(v) for v in d["lo"]), tuple(float(v) for v in d["hi"]),
                   tuple(bool(v) for v in d["log"]))


# --------------------------------------------------------------------------------------------
# features
def log_grid(q_min: float, q_max: float, n: int) -> torch.Tensor:
    """Log-spaced encoder grid (n,), float64, 1/nm."""
    if not 0 < q_min < q_max or n < 8:
        raise ValueError(f"log_grid needs 0 < q_min < q_max and n >= 8, got {q_min}, {q_max}, {n}")
    return torch.logspace(math.log10(q_min), math.log10(q_max), n, dtype=torch.float64)


def profile_features(q_grid: torch.Tensor, q: torch.Tensor, intensity: torch.Tensor,
                     sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder input (B, 3, L) from profiles on any increasing grid q (N,) 1/nm.

    intensity, sigma: (B, N); points with non-finite or non-positive I or sigma are ignored.
    Cells (geometric midpoints of q_grid (L,)) average log10 I of their points; empty cells
    inside the measured range get log-log linear interpolation; outside it they are masked.
    """
    if intensity.dim() != 2 or q.dim() != 1 or intensity.shape[-1] != q.shape[0]:
        raise ValueError(f"intensity must be (B, N) with N = len(q) = {q.shape[0]}, got {tuple(intensity.shape)}")
    dt, dev = intensity.dtype, intensity.device
    if sigma is None:
        sigma = intensity.abs().clamp_min(1e-30) * 0.01
    qg = q_grid.to(device=dev, dtype=torch.float64).log()
    lq = q.to(device=dev, dtype=torch.float64).clamp_min(1e-30).log()
    ok = torch.isfinite(intensity) & (intensity > 0) & torch.isfinite(sigma) & (sigma > 0) & (q > 0)
    li = torch.where(ok, intensity.clamp_min(1e-30).log10(), torch.zeros_like(intensity)).to(torch.float64)
    rel = torch.where(ok, sigma / intensity.clamp_min(1e-30), torch.zeros_like(intensity)).to(torch.float64)
    L = qg.shape[0]
    edges = 0.5 * (qg[1:] + qg[:-1])
    cell = torch.bucketize(lq, edges)                                   # (N,) in 0..L-1
    inside = (lq >= qg[0] - (edges[0] - qg[0])) & (lq <= qg[-1] + (qg[-1] - edges[-1]))
    w = (ok & inside).to(torch.float64)
    idx = cell.expand_as(li)
    cnt = torch.zeros(li.shape[0], L, dtype=torch.float64, device=dev).scatter_add_(1, idx, w)
    s1 = torch.zeros_like(cnt).scatter_add_(1, idx, w * li)
    s2 = torch.zeros_like(cnt).scatter_add_(1, idx, w * rel * rel)
    have = cnt > 0
    mean = s1 / cnt.clamp_min(1)
    rel_mean = torch.sqrt(s2 / cnt.clamp_min(1) / cnt.clamp_min(1))
    # empty cells: interpolate between the nearest filled cells left and right
    ar = torch.arange(L, device=dev).expand_as(cnt)
    left = torch.where(have, ar, torch.full_like(ar, -1)).cummax(1).values
    right = torch.where(have, ar, torch.full_like(ar, L)).flip(1).cummin(1).values.flip(1)
    both = (left >= 0) & (right < L)
    lc, rc = left.clamp(0, L - 1), right.clamp(0, L - 1)
    span = (qg[rc] - qg[lc]).clamp_min(1e-30)
    t = torch.where(rc > lc, (qg.expand_as(mean) - qg[lc]) / span, torch.zeros_like(mean))
    interp = mean.gather(1, lc) * (1 - t) + mean.gather(1, rc) * t
    rel_i = torch.maximum(rel_mean.gather(1, lc), rel_mean.gather(1, rc))
    valid = have | both
    val = torch.where(have, mean, interp)
    relv = torch.where(have, rel_mean, rel_i)
    return _stack_features(val, relv, valid).to(dt)


def grid_features(log_i: torch.Tensor, rel_err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder input (B, 3, L) from values already on the encoder grid (training data)."""
    return _stack_features(log_i, rel_err, valid)


def _stack_features(log_i, rel, valid):
    v = valid.to(log_i.dtype)
    n = v.sum(-1, keepdim=True).clamp_min(1)
    mean = (log_i * v).sum(-1, keepdim=True) / n
    c0 = (log_i - mean) * v / 2.0
    c1 = (rel.clamp_min(1e-6).log10().clamp(-5.0, 1.0) + 2.0) * v / 2.0
    return torch.stack([c0, c1, v], 1)


def map_features(log_i: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder input (B, 2, H, W) from log10 I maps (B, H, W) on the model grid."""
    v = valid.to(log_i.dtype)
    n = v.sum((-1, -2), keepdim=True).clamp_min(1)
    mean = (log_i * v).sum((-1, -2), keepdim=True) / n
    return torch.stack([(log_i - mean) * v / 2.0, v], 1)


# --------------------------------------------------------------------------------------------
# networks
class _BoundedEncoder(nn.Module):
    """A network ``conv`` then ``head`` whose outputs are squashed into ``bounds``."""

    def forward_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Parameters in unit coordinates u in (0, 1), (B, P)."""
        return torch.sigmoid(self.head(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bounds.from_unit(self.forward_unit(x))


class ProfileEncoder(_BoundedEncoder):
    """1D CNN: (B, 3, L) features -> (B, P) parameters within ``bounds``.

    Three strided conv blocks (kernel 5, GELU) keep the position along log q (which is what
    sets a size), then a two-layer MLP; sigmoid-scaled outputs (module docstring).
    """

    def __init__(self, bounds: ParamBounds, length: int = 128, channels: tuple[int, ...] = (16, 32, 48),
                 hidden: int = 96):
        super().__init__()
        if length % (2 ** len(channels)) != 0:
            raise ValueError(f"length {length} must be divisible by 2**{len(channels)}")
        self.bounds, self.length, self.channels, self.hidden = bounds, length, tuple(channels), hidden
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv1d(c_in, c, 5, stride=2, padding=2), nn.GELU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        n_flat = c_in * (length // 2 ** len(channels))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, hidden), nn.GELU(),
                                  nn.Linear(hidden, len(bounds.names)))


class MapEncoder(_BoundedEncoder):
    """2D CNN: (B, 2, H, W) GISAXS map features -> (B, P) parameters within ``bounds``."""

    def __init__(self, bounds: ParamBounds, shape: tuple[int, int] = (32, 64),
                 channels: tuple[int, ...] = (12, 24, 32), hidden: int = 96):
        super().__init__()
        f = 2 ** len(channels)
        if shape[0] % f or shape[1] % f:
            raise ValueError(f"map shape {shape} must be divisible by {f}")
        self.bounds, self.shape, self.channels, self.hidden = bounds, tuple(shape), tuple(channels), hidden
        layers, c_in = [], 2
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        n_flat = c_in * (shape[0] // f) * (shape[1] // f)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, hidden), nn.GELU(),
                                  nn.Linear(hidden, len(bounds.names)))


class MapHistogramEncoder(MapEncoder):
    """MapEncoder with a second head: a softmax over ``n_bins`` radius bins (volume fractions on
    the checkpoint's ``distribution.RadiusBins``; ``distribution.number_fractions`` gives the
    models' number histogram) next to the bounded parameters, both on the same conv features.
    ``forward`` -> (parameters (B, P) within ``bounds``, volume fractions (B, K))."""

    def __init__(self, bounds: ParamBounds, n_bins: int, shape: tuple[int, int] = (32, 64),
                 channels: tuple[int, ...] = (12, 24, 32), hidden: int = 96):
        super().__init__(bounds, shape, channels, hidden)
        self.n_bins = n_bins
        f = 2 ** len(channels)
        n_flat = channels[-1] * (shape[0] // f) * (shape[1] // f)
        self.hist_head = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, hidden), nn.GELU(), nn.Linear(hidden, n_bins))

    def forward_unit_log(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters in unit coordinates (B, P) and log weights (B, K) (log-softmax), for training."""
        h = self.conv(x)
        return torch.sigmoid(self.head(h)), torch.log_softmax(self.hist_head(h), -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, log_w = self.forward_unit_log(x)
        return self.bounds.from_unit(u), log_w.exp()


def encoder_state(enc: nn.Module, **meta) -> dict:
    """Checkpoint dict (float32 weights, architecture, bounds, plus ``meta``: grids, model name)."""
    arch = {"class": type(enc).__name__, "channels": list(enc.channels), "hidden": enc.hidden}
    arch["length" if isinstance(enc, ProfileEncoder) else "shape"] = (
        enc.length if isinstance(enc, ProfileEncoder) else list(enc.shape))
    if isinstance(enc, MapHistogramEncoder):
        arch["n_bins"] = enc.n_bins
    return {"arch": arch, "bounds": enc.bounds.as_dict(),
            "state_dict": {k: v.detach().float().cpu() for k, v in enc.state_dict().items()}, **meta}


def encoder_from_state(state: dict) -> nn.Module:
    """Rebuild an encoder (eval mode, float32, CPU) from ``encoder_state``'s dict."""
    arch, bounds = state["arch"], ParamBounds.from_dict(state["bounds"])
    if arch["class"] == "ProfileEncoder":
        enc = ProfileEncoder(bounds, int(arch["length"]), tuple(arch["channels"]), int(arch["hidden"]))
    elif arch["class"] == "MapEncoder":
        enc = MapEncoder(bounds, tuple(arch["shape"]), tuple(arch["channels"]), int(arch["hidden"]))
    elif arch["class"] == "MapHistogramEncoder":
        enc = MapHistogramEncoder(bounds, int(arch["n_bins"]), tuple(arch["shape"]), tuple(arch["channels"]),
                                  int(arch["hidden"]))
    else:
        raise ValueError(f"unknown encoder class {arch['class']!r}")
    enc.load_state_dict(state["state_dict"])
    return enc.eval()
