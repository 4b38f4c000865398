"""LM starts without an encoder: a grid over the shape parameters, non-negative linear
amplitudes at every grid point, and the best few distinct optima of the grid.

``nonneg_amplitudes``: per frame and basis, min ||W (y - X a)||^2 with a >= 0 (X = the K basis
functions and a constant): the weighted normal equations, Jacobi-scaled, solved on every
non-empty subset of the K + 1 columns (K <= 3: at most 15 small solves); the feasible subset of
least chi2 is the NNLS solution (Lawson & Hanson's KKT conditions are met by the best feasible
subset solution of a convex quadratic on the orthant).

``grid_starts``: the shape grid of ``ModelInfo.grid`` (log-spaced cell centres for sizes,
linear cell centres otherwise) within the run's bounds, the size (the first shape parameter:
radius or Rg) also within what the data resolve, ``size_window``; chi2 at every grid point with
its amplitudes; along the size the best chi2 over the other shape parameters, whose local
minima, best first (then the remaining sizes by chi2), give ``n_starts`` starts per frame.

Why the size window: a particle whose Guinier region lies below the data's q_min (q_min R >~ 4)
shows only its Porod tail, ~q^-4, which a power law or the other level's power term also
describe; such sizes win the coarse grid by absorbing an exponent between grid values and send
every start into that degenerate valley (seen on sphere + power-law profiles). The LM's bounds
are not narrowed: it may still go there when the data ask for it.
"""
from __future__ import annotations

import itertools
import math

import torch

from workers.inversion.spec import ModelInfo


def _normal_shared(basis: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor):
    """basis (G, K, N) shared by B frames y, sigma (B, N) -> M (B, G, L, L), v (B, G, L), yy (B,),
    L = K + 1 (the constant last)."""
    w2, yy0 = _weights(y, sigma)
    X = torch.cat([basis, torch.ones_like(basis[:, :1])], 1)                       # (G, L, N)
    L = X.shape[1]
    M = torch.empty(y.shape[0], X.shape[0], L, L, dtype=y.dtype, device=y.device)
    for k in range(L):
        for m in range(k, L):
            M[..., k, m] = M[..., m, k] = w2 @ (X[:, k] * X[:, m]).T
    v = torch.stack([(w2 * yy0) @ X[:, k].T for k in range(L)], -1)
    return M, v, (w2 * yy0 * yy0).sum(-1)


def _nnls_small(M: torch.Tensor, v: torch.Tensor, yy: torch.Tensor):
    """min a^T M a - 2 a.v + yy over a >= 0 by subsets: M (..., L, L), v (..., L), yy broadcast
    to v's leading shape -> a (..., L), chi2 (...)."""
    L = M.shape[-1]
    d = torch.diagonal(M, dim1=-2, dim2=-1)
    sc = torch.where(d > 0, d.clamp_min(1e-300).rsqrt(), torch.zeros_like(d))       # Jacobi scaling
    Ms, vs = M * sc[..., :, None] * sc[..., None, :], v * sc
    yy = yy.reshape(yy.shape + (1,) * (v.dim() - 1 - yy.dim())).expand(v.shape[:-1])
    best_a, best_c = torch.zeros_like(v), yy.clone()                                 # a = 0
    eye = torch.eye(L, dtype=M.dtype, device=M.device)
    for n in range(1, L + 1):
        for sub in itertools.combinations(range(L), n):
            m = torch.zeros(L, dtype=M.dtype, device=M.device)
            m[list(sub)] = 1.0
            chol, info = torch.linalg.cholesky_ex(Ms * m[:, None] * m[None, :] + eye * (1.0 - m))
            a = torch.cholesky_solve((vs * m)[..., None], chol)[..., 0] * m
            c = yy - 2.0 * (a * vs).sum(-1) + (a[..., None, :] @ Ms @ a[..., :, None])[..., 0, 0]
            feas = (info == 0) & (a >= 0).all(-1) & torch.isfinite(c) & ((sc > 0) | (m == 0)).all(-1)
            take = feas & (c < best_c)
            best_a = torch.where(take[..., None], a, best_a)
            best_c = torch.where(take, c, best_c)
    return best_a * sc, best_c


def _weights(y, sigma):
    ok = torch.isfinite(y) & torch.isfinite(sigma) & (sigma > 0)
    w2 = torch.where(ok, 1.0 / torch.where(ok, sigma, torch.ones_like(sigma)) ** 2, torch.zeros_like(y))
    return w2, torch.where(ok, y, torch.zeros_like(y))


def nonneg_amplitudes(basis: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor):
    """Non-negative amplitudes and background of per-frame bases: basis (B, K, N), y, sigma (B, N)
    -> (B, K + 1) (background last), chi2 (B,). Points with non-finite y or sigma <= 0 are ignored."""
    w2, y0 = _weights(y, sigma)
    X = torch.cat([basis, torch.ones_like(basis[:, :1])], 1)                       # (B, L, N)
    M = (X * w2[:, None]) @ X.transpose(1, 2)
    v = (X @ (w2 * y0)[..., None])[..., 0]
    return _nnls_small(M, v, (w2 * y0 * y0).sum(-1))


SIZE_WINDOW = (0.5, 4.0)      # sizes (nm) from SIZE_WINDOW[0] / q_max to SIZE_WINDOW[1] / q_min


def size_window(q: torch.Tensor, lo, hi) -> tuple[float, float]:
    """The size interval of the grid for data at q (N,) 1/nm (q > 0 points): the bounds
    intersected with [0.5 / q_max, 4 / q_min] (module docstring), or the bounds if empty."""
    qp = q[q > 0]
    if qp.numel() == 0:
        return lo, hi
    a, b = max(lo, SIZE_WINDOW[0] / float(qp.max())), min(hi, SIZE_WINDOW[1] / float(qp.min()))
    return (a, b) if a < b else (lo, hi)


def shape_grid(info: ModelInfo, lo, hi, dtype=torch.float64, device=None) -> torch.Tensor:
    """(G, S) grid over the shape bounds lo, hi (S,) (module docstring), the first parameter slowest."""
    axes = []
    for j, n in enumerate(info.grid):
        c = (torch.arange(n, dtype=dtype, device=device) + 0.5) / n
        if info.log[j]:
            axes.append(torch.exp(math.log(lo[j]) + c * (math.log(hi[j]) - math.log(lo[j]))))
        else:
            axes.append(lo[j] + c * (hi[j] - lo[j]))
    return torch.cartesian_prod(*axes).reshape(-1, len(axes))


def grid_starts(grid: torch.Tensor, grid_basis: torch.Tensor, n_size: int, y: torch.Tensor, sigma: torch.Tensor,
                n_starts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LM starts (B, n_starts, P) and their chi2 (B, n_starts) from a shape ``grid`` (G, S) whose
    first parameter takes ``n_size`` values (slowest), its basis (G, K, N) on the data's q."""
    M, v, yy = _normal_shared(grid_basis, y, sigma)
    amp, chi2 = _nnls_small(M, v, yy)                                 # (B, G, L), (B, G)
    B, G = chi2.shape
    chi2 = torch.where(torch.isfinite(chi2), chi2, torch.full_like(chi2, math.inf))
    per_size, which = chi2.reshape(B, n_size, G // n_size).min(-1)    # (B, n_size)
    left = torch.cat([torch.full_like(per_size[:, :1], math.inf), per_size[:, :-1]], 1)
    right = torch.cat([per_size[:, 1:], torch.full_like(per_size[:, :1], math.inf)], 1)
    is_min = (per_size <= left) & (per_size <= right)
    order = per_size.argsort(-1)
    order = order.gather(-1, (~is_min).gather(-1, order).to(torch.int8).argsort(dim=-1, stable=True))
    k = min(n_starts, n_size)
    size_idx = order[:, :k]
    g_idx = size_idx * (G // n_size) + which.gather(-1, size_idx)      # (B, k)
    shape = grid[g_idx]                                               # (B, k, S)
    a = amp.gather(1, g_idx[..., None].expand(-1, -1, amp.shape[-1]))
    starts = torch.cat([shape, a], -1)
    if k < n_starts:                                                  # fewer sizes than starts: repeat the best
        starts = torch.cat([starts, starts[:, :1].expand(-1, n_starts - k, -1)], 1)
    return starts, chi2.gather(1, g_idx)
