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
"""
from __future__ import annotations

import torch


def solve(diag: torch.Tensor, off: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = H^-1 rhs. diag (B, W, P, P); off (B, W-1, P) the couplings e_t; rhs (B, W, P, M).
    Returns x (B, W, P, M) and ok (B,) bool: False where H is not positive definite (x is then
    not meaningful)."""
    W = diag.shape[1]
    ee = off[..., :, None] * off[..., None, :]           # E S^-1 E = (e e^T) * S^-1, elementwise
    s_inv, ys, infos = [], [], []
    for t in range(W):
        s, r = diag[:, t], rhs[:, t]
        if t:
            s = torch.addcmul(s, ee[:, t - 1], s_inv[-1], value=-1.0)
            r = torch.addcmul(r, off[:, t - 1, :, None], ys[-1], value=-1.0)
        chol, info = torch.linalg.cholesky_ex(s)
        s_inv.append(torch.cholesky_inverse(chol))
        ys.append(torch.bmm(s_inv[-1], r))
        infos.append(info)
    x = [ys[-1]]
    for t in range(W - 2, -1, -1):
        x.append(torch.baddbmm(ys[t], s_inv[t], off[:, t, :, None] * x[-1], alpha=-1.0))
    ok = (torch.stack(infos, 1) == 0).all(1)
    return torch.stack(x[::-1], 1), ok


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
