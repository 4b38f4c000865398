"""Symmetric block-tridiagonal systems with diagonal couplings, batched: the normal equations of
a window of frames whose penalty links each frame only to its neighbours.

    H = [[D_0, E_0,           ],
         [E_0, D_1, E_1,      ],
         [     E_1, D_2, ...  ]],   D_t (P, P) symmetric, E_t = diag(e_t),

solved by block Cholesky (the block Thomas algorithm; Golub & Van Loan, Matrix Computations,
4th ed., §4.5.4): forward elimination S_0 = D_0, S_t = D_t - E_{t-1} S_{t-1}^-1 E_{t-1},
y_t = S_t^-1 (r_t - E_{t-1} y_{t-1}); back substitution x_t = y_t - S_t^-1 E_t x_{t+1}.
O(W P^3) for W blocks instead of O((W P)^3) for the dense matrix; H is positive definite iff
every S_t is.

The sweeps are W steps one after the other, each a few small operations whose cost on a CPU is
mostly their call overhead, so long systems (a batch's whole span) are partitioned: chunks of
about ``CHUNK`` blocks separated by single separator blocks are swept side by side (one batch),
each for its right-hand side and for its couplings to the two separators next to it; the
separators' Schur complement (a dense (m-1) P system for m chunks) is then solved by Cholesky,
and the chunks' solutions follow from it (the partition method of domain decomposition, e.g.
Polizzi & Sameh, Parallel Computing 32, 177 (2006)). H is positive definite iff every chunk and
the Schur complement are.
"""
from __future__ import annotations

import math

import torch

CHUNK = 8       # blocks per chunk of the partitioned solve
MIN_CHUNKS = 5  # fewer would be chunks: the system is swept whole (the partition's own cost)


def solve(diag: torch.Tensor, off: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = H^-1 rhs. diag (B, W, P, P); off (B, W-1, P) the couplings e_t; rhs (B, W, P, M).
    Returns x (B, W, P, M) and ok (B,) bool: False where H is not positive definite (x is then
    not meaningful)."""
    W = diag.shape[1]
    m = math.ceil((W + 1) / (CHUNK + 1))
    return _partitioned(diag, off, rhs, m) if m >= MIN_CHUNKS else _sweeps(diag, off, rhs)


def _sweeps(diag, off, rhs):
    """The block Thomas algorithm (module docstring)."""
    W = diag.shape[1]
    d, r = diag.unbind(1), rhs.unbind(1)
    ee = (off[..., :, None] * off[..., None, :]).unbind(1)      # E S^-1 E = (e e^T) * S^-1, elementwise
    e = off[..., None].unbind(1)
    s_inv, ys, infos = [], [], []
    for t in range(W):
        s, rt = d[t], r[t]
        if t:
            s = torch.addcmul(s, ee[t - 1], s_inv[-1], value=-1.0)
            rt = torch.addcmul(rt, e[t - 1], ys[-1], value=-1.0)
        chol, info = torch.linalg.cholesky_ex(s)
        s_inv.append(torch.cholesky_inverse(chol))
        ys.append(torch.bmm(s_inv[-1], rt))
        infos.append(info)
    x = [ys[-1]]
    for t in range(W - 2, -1, -1):
        x.append(torch.baddbmm(ys[t], s_inv[t], e[t] * x[-1], alpha=-1.0))
    ok = (torch.stack(infos, 1) == 0).all(1)
    return torch.stack(x[::-1], 1), ok


def _partitioned(diag, off, rhs, m: int):
    """The partition method (module docstring) with m chunks of L blocks and m - 1 separators:
    chunk j holds blocks j (L+1) .. j (L+1) + L - 1, separator j the block after it; the system
    is padded at its end with decoupled identity blocks."""
    B, W, P, M = *diag.shape[:3], rhs.shape[-1]
    L = math.ceil((W - (m - 1)) / m)
    Wp = m * L + m - 1
    dt, dev = diag.dtype, diag.device
    if Wp > W:
        pad = Wp - W
        diag = torch.cat([diag, torch.eye(P, dtype=dt, device=dev).expand(B, pad, P, P)], 1)
        off = torch.cat([off, off.new_zeros(B, pad, P)], 1)
        rhs = torch.cat([rhs, rhs.new_zeros(B, pad, P, M)], 1)
    first = torch.arange(m, device=dev) * (L + 1)
    blocks = first[:, None] + torch.arange(L, device=dev)                 # (m, L)
    sep = first[:-1] + L                                                   # (m-1,)
    # each chunk's right-hand sides: rhs, and -E to its left and right separators (P columns each)
    zr = rhs.new_zeros(B, m, L, P, M + 2 * P)
    zr[..., :M] = rhs[:, blocks]
    zr[:, 1:, 0, :, M:M + P] = -torch.diag_embed(off[:, sep])              # left separator -> first block
    zr[:, :-1, -1, :, M + P:] = -torch.diag_embed(off[:, sep - 1])         # last block <- right separator
    z, ok = _sweeps(diag[:, blocks].reshape(B * m, L, P, P), off[:, blocks[:, :-1]].reshape(B * m, L - 1, P),
                    zr.reshape(B * m, L, P, M + 2 * P))
    z = z.reshape(B, m, L, P, M + 2 * P)
    ok = ok.reshape(B, m).all(1)
    # Schur complement on the separators: separator k sits between chunks k and k + 1
    ea, eb = off[:, sep - 1, :, None], off[:, sep, :, None]                # (B, m-1, P, 1)
    last, nxt = z[:, :-1, -1], z[:, 1:, 0]                                 # (B, m-1, P, M+2P)
    n = m - 1
    S = diag.new_zeros(B, n, P, n, P)
    k = torch.arange(n, device=dev)
    S[:, k, :, k, :] = (diag[:, sep] + ea * last[..., M + P:] + eb * nxt[..., M:M + P]).transpose(0, 1)
    S[:, k[1:], :, k[:-1], :] = (ea[:, 1:] * last[:, 1:, :, M:M + P]).transpose(0, 1)
    S[:, k[:-1], :, k[1:], :] = (eb[:, :-1] * nxt[:, :-1, :, M + P:]).transpose(0, 1)
    b = rhs[:, sep] - ea * last[..., :M] - eb * nxt[..., :M]
    chol, info = torch.linalg.cholesky_ex(S.reshape(B, n * P, n * P))
    xs = torch.cholesky_solve(b.reshape(B, n * P, M), chol).reshape(B, n, P, M)
    ok = ok & (info == 0)
    # chunks from their separators (none left of chunk 0 and right of chunk m-1)
    zero = xs.new_zeros(B, 1, P, M)
    x_left, x_right = torch.cat([zero, xs], 1), torch.cat([xs, zero], 1)   # (B, m, P, M)
    xc = z[..., :M] + z[..., M:M + P] @ x_left[:, :, None] + z[..., M + P:] @ x_right[:, :, None]
    x = rhs.new_empty(B, Wp, P, M)
    x[:, blocks] = xc
    x[:, sep] = xs
    return x[:, :W], ok


def to_dense(diag: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """The dense H (B, W*P, W*P) of diag (B, W, P, P) and off (B, W-1, P), for references."""
    B, W, P, _ = diag.shape
    H = torch.zeros(B, W, P, W, P, dtype=diag.dtype, device=diag.device)
    t = torch.arange(W, device=diag.device)
    H[:, t, :, t, :] = diag.transpose(0, 1)
    e = torch.diag_embed(off).transpose(0, 1)
    H[:, t[:-1], :, t[1:], :] = e
    H[:, t[1:], :, t[:-1], :] = e
    return H.reshape(B, W * P, W * P)
