"""Bounded Levenberg-Marquardt by projected steps on an active set, B frames in lock step.

``fit_bounded`` minimises chi2(p) = sum_i ((y_i - f(q_i; p)) / sigma_i)^2 per frame with
lo <= p <= hi, in the physical parameters (no bound transform). Per iteration, with the
Jacobian J, A = J^T W J and g = J^T W r (chi2 decreases along +g):

  1. Active set: a parameter on a bound whose g points out of the box (on lo with g <= 0, on
     hi with g >= 0) is fixed for this step; the free block solves (A + lam D) delta = g
     (Marquardt scaling D = running max of diag A, MINPACK). A parameter on a bound whose step
     would still leave the box joins the fixed set, and the free block is solved again
     (at most two solves of a P x P system).
  2. Projection: p_new = clip(p + delta, lo, hi). The gain ratio compares the actual reduction
     with the Gauss-Newton model's for the step taken, 2 d.g - d^T A d, d = p_new - p; accept if
     chi2 decreases; lam as in Nielsen (1999): lam *= max(1/3, 1 - (2 rho - 1)^3) on accept,
     lam *= nu, nu *= 2 on reject.
  3. Converged (first-order optimality on the box, reported as such only when it holds):
     the projected gradient (g with the fixed components zeroed) in standard errors,
     max_j |g_j| / sqrt(A_jj chi2_red), is <= gtol; or, with lam <= 1 (nearly Gauss-Newton),
     an unclipped step whose predicted (and, if taken, actual) reduction is <= ftol * chi2_red
     + 16 eps chi2. A frame that reaches max_iter is not converged.

Compared with the smooth MINUIT transform of ``workers.fit`` (lmfit's), whose derivative
vanishes on a bound so that optima on bounds are approached geometrically and its gradient test
passes there too early, a projected step lands on the bound exactly and the bound then stops
costing iterations (Kanzow, Yamashita & Fukushima, J. Comput. Appl. Math. 172, 375 (2004);
Coleman & Li's reflective method in scipy's ``least_squares(method="trf")`` is the other
standard choice).

Results: ``at_bound`` (B, P): on a bound (within 1e-9 of a finite bound interval; exactly on a
one-sided bound). Standard errors as lmfit's ``scale_covar=True`` for the free block,
sqrt(diag((A_FF)^-1) chi2_red), F = the parameters not on a bound: the errors of the others
given the bound ones at their bounds; NaN for a parameter on a bound (the bound cuts its
likelihood: no symmetric error). chi2_red = chi2 / (N - P), P all parameters; NaN (and not
converged) for a frame with N <= P points of positive weight.

``fit_bounded_reference`` is the same algorithm as a plain per-frame loop (STYLE rule 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.fit import spd_inverse


@dataclass
class BoundedFit:
    """B frames, P parameters."""
    params: torch.Tensor       # (B, P) within [lower, upper]
    stderr: torch.Tensor       # (B, P); NaN on a bound (module docstring)
    chi2_red: torch.Tensor     # (B,) chi2 / (N - P); NaN where N <= P
    converged: torch.Tensor    # (B,) bool: optimality on the box within gtol / ftol
    at_bound: torch.Tensor     # (B, P) bool
    n_iter: torch.Tensor       # (B,) int64: model evaluations with a Jacobian after the first
    dof: torch.Tensor          # (B,) N - P (>= 1)


class _Weighted:
    """Weighted residuals and normal equations of a chunk of frames (w = 1/sigma, 0 where a
    point has non-finite y or sigma <= 0)."""

    def __init__(self, model, y, sigma):
        ok = torch.isfinite(sigma) & (sigma > 0) & torch.isfinite(y)
        self.model = model
        self.w = torch.where(ok, 1.0 / torch.where(ok, sigma, torch.ones_like(sigma)), torch.zeros_like(y))
        self.yw = torch.nan_to_num(y) * self.w
        self.n_points = ok.sum(-1)

    def normal(self, p, rows=None):
        """chi2 (B,), A (B, P, P), g (B, P) at p; ``rows``: p holds only those frames."""
        w, yw = (self.w, self.yw) if rows is None else (self.w[rows], self.yw[rows])
        fw, jw = self.model.evaluate_and_jacobian(p, w)
        r = yw - fw
        return (r * r).sum(-1), jw @ jw.transpose(1, 2), (jw @ r[..., None])[..., 0]


def _solve(a, g, lam, dd, flat, fixed):
    """delta (B, P) of (A + lam diag(dd)) delta = g on the free block (fixed entries 0), and the
    Cholesky info (B,). ``flat``: parameters whose curvature was never positive get 1 on the
    diagonal (as workers.fit)."""
    ff = (~fixed).to(a.dtype)
    aug = a + lam[:, None, None] * torch.diag_embed(dd) + torch.diag_embed(flat.to(a.dtype))
    aug = aug * ff[:, :, None] * ff[:, None, :] + torch.diag_embed(1.0 - ff)
    chol, info = torch.linalg.cholesky_ex(aug)
    return torch.cholesky_solve((g * ff)[..., None], chol)[..., 0] * ff, info


def _projected_step(p, a, g, lam, dsc, lo, hi):
    """Active set, step, projection (module docstring 1-2): p_new, d, pred, clipped, info, bind."""
    at_lo, at_hi = p <= lo, p >= hi
    bind = (at_lo & (g <= 0)) | (at_hi & (g >= 0))
    dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
    delta, info = _solve(a, g, lam, dd, dsc == 0, bind)
    bind2 = bind | (at_lo & (delta < 0)) | (at_hi & (delta > 0))
    redo = (bind2 != bind).any(-1)
    delta2, info2 = _solve(a, g, lam, dd, dsc == 0, bind2)
    delta = torch.where(redo[:, None], delta2, delta)
    info = torch.where(redo, info2, info)
    raw = p + delta
    p_new = torch.minimum(torch.maximum(raw, lo), hi)
    clipped = ((raw < lo) | (raw > hi)).any(-1)
    d = p_new - p
    pred = 2.0 * (d * g).sum(-1) - (d[:, None, :] @ a @ d[:, :, None])[:, 0, 0]
    return p_new, d, pred, clipped, info, bind | (bind2 & redo[:, None])


def _scaled_gradient(g, a, bind, chi2r, tiny):
    """max_j |g_j| / sqrt(A_jj chi2_red) over the parameters not held on a bound: (B,)."""
    diag = torch.diagonal(a, dim1=1, dim2=2)
    gs = torch.where(bind | (diag <= 0), torch.zeros_like(g),
                     g.abs() / torch.sqrt(diag * chi2r[:, None]).clamp_min(tiny))
    return gs.amax(-1)


def _lm_chunk(prob: _Weighted, p0, lo, hi, dof, *, max_iter, ftol, gtol, lambda0, early_exit):
    B, P = p0.shape
    dt, dev = p0.dtype, p0.device
    tiny, eps = torch.finfo(dt).tiny, torch.finfo(dt).eps
    p = p0.clone()
    cost, a, g = prob.normal(p)
    lam = torch.full((B,), lambda0, dtype=dt, device=dev)
    nu = torch.full_like(lam, 2.0)
    dsc = torch.zeros(B, P, dtype=dt, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    failed = ~torch.isfinite(cost)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    for _ in range(max_iter):
        dsc = torch.maximum(dsc, torch.diagonal(a, dim1=1, dim2=2))
        chi2r = (cost / dof).clamp_min(tiny)
        p_new, d, pred, clipped, info, bind = _projected_step(p, a, g, lam, dsc, lo, hi)
        tol = ftol * chi2r + 16.0 * eps * cost
        converged = converged | (~failed & (_scaled_gradient(g, a, bind, chi2r, tiny) <= gtol))
        converged = converged | (~failed & (info == 0) & ~clipped & (pred <= tol) & (lam <= 1.0))
        active = ~(converged | failed)
        if early_exit and not bool(active.any()):
            break
        if early_exit and not bool(active.all()):
            rows = torch.nonzero(active)[:, 0]
            cost_new, a_new, g_new = cost.clone(), a.clone(), g.clone()
            cost_new[rows], a_new[rows], g_new[rows] = prob.normal(p_new[rows], rows)
        else:
            cost_new, a_new, g_new = prob.normal(p_new)
        ok = (info == 0) & torch.isfinite(cost_new) & torch.isfinite(d).all(-1)
        accept = active & ok & (cost_new < cost)
        red = cost - cost_new
        rho = red / pred.clamp_min(tiny)
        small = accept & ~clipped & (red <= tol) & (pred <= tol) & (lam <= 1.0)
        p = torch.where(accept[:, None], p_new, p)
        a = torch.where(accept[:, None, None], a_new, a)
        g = torch.where(accept[:, None], g_new, g)
        cost = torch.where(accept, cost_new, cost)
        fac = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
        lam = torch.where(accept, lam * fac, torch.where(active, lam * nu, lam))
        nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(active, nu * 2.0, nu))
        n_iter = n_iter + active.to(torch.int64)
        converged = converged | small
        failed = failed | (active & (lam > 1e16))
        if early_exit and not bool((~(converged | failed)).any()):
            break
    return p, cost, a, converged & ~failed, n_iter


def bound_flags(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: p on a bound (module docstring)."""
    span = hi - lo
    tol = torch.where(torch.isfinite(span), 1e-9 * span, torch.zeros_like(span))
    return (p <= lo + tol) | (p >= hi - tol)


def free_block_stderr(a: torch.Tensor, at_bound: torch.Tensor, chi2_red: torch.Tensor) -> torch.Tensor:
    """sqrt(diag((A_FF)^-1) chi2_red) for the parameters not on a bound, NaN for those on one
    (and where A_FF is singular). a (B, P, P), at_bound (B, P), chi2_red (B,) -> (B, P)."""
    ff = (~at_bound).to(a.dtype)
    inv, _ = spd_inverse(a * ff[:, :, None] * ff[:, None, :] + torch.diag_embed(1.0 - ff))
    var = torch.diagonal(inv, dim1=1, dim2=2) * chi2_red[:, None]
    return torch.where(at_bound, torch.full_like(var, math.nan), var.clamp_min(0).sqrt())


def _check_args(max_iter, ftol, gtol, lambda0):
    for nm, v in (("max_iter", max_iter), ("ftol", ftol), ("gtol", gtol), ("lambda0", lambda0)):
        if not v > 0:
            raise ValueError(f"{nm} must be > 0, got {v!r}")


def fit_bounded(model, y: torch.Tensor, sigma: torch.Tensor, p0: torch.Tensor, lower: torch.Tensor,
                upper: torch.Tensor, *, max_iter: int = 40, ftol: float = 1e-6, gtol: float = 1e-4,
                lambda0: float = 1e-3, chunk_size: int | None = None, early_exit: bool | None = None) -> BoundedFit:
    """Fit B frames independently within [lower, upper] (P,) (inf allowed).

    model: evaluate_and_jacobian(p (B, P), scale (B, N), jac) -> (f * scale, J * scale (B, P, N))
      on its own q (``workers.inversion.models.BasisModel``). y, sigma: (B, N). p0: (B, P),
      clipped into the bounds (a start on a bound is fine). ftol, gtol: module docstring.
    chunk_size: frames per chunk (None: ~64k points per chunk on CPU, ~4M Jacobian entries on
      GPU). early_exit: evaluate only the frames still iterating and stop when none is (one host
      sync per iteration); default True on CPU, False on CUDA (max_iter iterations, no sync).
    """
    _check_args(max_iter, ftol, gtol, lambda0)
    if y.dim() != 2 or sigma.shape != y.shape or p0.dim() != 2 or p0.shape[0] != y.shape[0]:
        raise ValueError(f"need y, sigma (B, N) and p0 (B, P); got {tuple(y.shape)}, {tuple(sigma.shape)}, "
                         f"{tuple(p0.shape)}")
    lo, hi = lower.to(y), upper.to(y)
    if bool((lo >= hi).any()):
        raise ValueError(f"lower bounds must be < upper bounds, got {lo.tolist()} / {hi.tolist()}")
    B, N = y.shape
    P = p0.shape[1]
    if early_exit is None:
        early_exit = y.device.type == "cpu"
    if chunk_size is None:
        chunk_size = max(1, (1 << 16) // N if y.device.type == "cpu" else (1 << 22) // max(1, N * P))
    outs = []
    for s in range(0, B, chunk_size):
        sl = slice(s, min(B, s + chunk_size))
        prob = _Weighted(model, y[sl], sigma[sl])
        dof = (prob.n_points - P).clamp_min(1).to(y.dtype)
        p_start = torch.minimum(torch.maximum(p0[sl].to(y), lo), hi)
        p, cost, a, conv, nit = _lm_chunk(prob, p_start, lo, hi, dof, max_iter=max_iter, ftol=ftol, gtol=gtol,
                                          lambda0=lambda0, early_exit=early_exit)
        enough = prob.n_points > P                     # else nothing is determined: chi2 NaN, not converged
        chi2r = torch.where(enough, cost / dof, torch.full_like(cost, math.nan))
        at_b = bound_flags(p, lo, hi)
        outs.append((p, free_block_stderr(a, at_b, chi2r), chi2r, conv & enough, at_b, nit, dof))
    return BoundedFit(*[torch.cat([o[i] for o in outs]) for i in range(7)])


# --------------------------------------------------------------------------------------------
def _solve_free(aug, g, fixed: list[bool]) -> torch.Tensor:
    """aug[F, F] delta_F = g_F on the free parameters F, 0 elsewhere (one frame)."""
    free = [j for j, f in enumerate(fixed) if not f]
    delta = torch.zeros_like(g)
    if free:
        delta[free] = torch.linalg.solve(aug[free][:, free], g[free])
    return delta


def fit_bounded_reference(model, y, sigma, p0, lower, upper, *, max_iter: int = 40, ftol: float = 1e-6,
                          gtol: float = 1e-4, lambda0: float = 1e-3) -> BoundedFit:
    """Plain per-frame loop of ``fit_bounded``'s algorithm with host-side decisions (tests)."""
    _check_args(max_iter, ftol, gtol, lambda0)
    lo, hi = lower.to(y), upper.to(y)
    P = p0.shape[1]
    eps, tiny = torch.finfo(y.dtype).eps, torch.finfo(y.dtype).tiny
    rows = []
    for b in range(y.shape[0]):
        prob = _Weighted(model, y[b:b + 1], sigma[b:b + 1])
        dof = float(max(1, int(prob.n_points[0]) - P))
        p = torch.minimum(torch.maximum(p0[b].to(y), lo), hi)
        cost, a, g = (t[0] for t in prob.normal(p[None]))
        cost = float(cost)
        lam, nu, dsc = lambda0, 2.0, torch.zeros(P, dtype=y.dtype)
        conv, nit = False, 0
        for _ in range(max_iter):
            dsc = torch.maximum(dsc, torch.diagonal(a))
            chi2r = max(cost / dof, tiny)
            at_lo, at_hi = p <= lo, p >= hi
            fixed = [bool(at_lo[j] and g[j] <= 0 or at_hi[j] and g[j] >= 0) for j in range(P)]
            dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
            aug = a + lam * torch.diag(dd) + torch.diag((dsc == 0).to(a.dtype))

            delta = _solve_free(aug, g, fixed)
            fixed2 = [fixed[j] or bool(at_lo[j] and delta[j] < 0 or at_hi[j] and delta[j] > 0) for j in range(P)]
            if fixed2 != fixed:
                fixed, delta = fixed2, _solve_free(aug, g, fixed2)
            gs = max([abs(float(g[j])) / max(math.sqrt(float(a[j, j]) * chi2r), tiny)
                      for j in range(P) if not fixed[j] and a[j, j] > 0] or [0.0])
            raw = p + delta
            p_new = torch.minimum(torch.maximum(raw, lo), hi)
            clipped = bool(((raw < lo) | (raw > hi)).any())
            d = p_new - p
            pred = float(2.0 * (d @ g) - d @ a @ d)
            tol = ftol * chi2r + 16.0 * eps * cost
            if gs <= gtol or (not clipped and pred <= tol and lam <= 1.0):
                conv = True
                break
            c_new, a_new, g_new = (t[0] for t in prob.normal(p_new[None]))
            c_new = float(c_new)
            nit += 1
            if math.isfinite(c_new) and c_new < cost:
                red = cost - c_new
                rho = red / max(pred, tiny)
                small = not clipped and red <= tol and pred <= tol and lam <= 1.0
                p, cost, a, g = p_new, c_new, a_new, g_new
                lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
                if small:
                    conv = True
                    break
            else:
                lam *= nu
                nu *= 2.0
                if lam > 1e16:
                    break
        enough = int(prob.n_points[0]) > P
        chi2r = torch.tensor([cost / dof if enough else math.nan], dtype=y.dtype)
        conv = conv and enough
        at_b = bound_flags(p[None], lo, hi)
        rows.append((p, free_block_stderr(a[None], at_b, chi2r)[0], chi2r[0], conv, at_b[0], nit,
                     torch.tensor(dof, dtype=y.dtype)))
    return BoundedFit(*[torch.stack([torch.as_tensor(r[i]) for r in rows]) for i in range(7)])

