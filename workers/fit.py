"""Batched bounded Levenberg-Marquardt fitting of peak models, frames in parallel.

``fit_batch`` is the functional kernel: B frames, each its own independent least-squares problem
``min_p sum_i ((y_i - f(x_i; p)) / sigma_i)^2`` solved at once on the tensors' device.

Algorithm (per frame, all frames in lock step, Nielsen/MINPACK style LM):
  * Marquardt scaling: damping lam * D with D the running maximum of diag(J^T J) (MINPACK).
  * Step (J^T J + lam D) delta = J^T r by batched Cholesky; gain ratio rho = actual / predicted
    reduction; accept if the cost decreases; lam *= max(1/3, 1 - (2 rho - 1)^3) on accept,
    lam *= nu, nu *= 2 on reject (Nielsen 1999, Madsen-Nielsen-Tingleff 2004 §3.2).
  * Bounds: the smooth MINUIT transform that lmfit uses (lmfit docs "Bounds Implementation"):
    p = lo + (sin t + 1)(hi - lo)/2 for two bounds, p = lo - 1 + sqrt(t^2 + 1) for a lower,
    p = hi + 1 - sqrt(t^2 + 1) for an upper bound. The LM works on t; covariances are computed
    in the external parameters p at the optimum.
  * Convergence per frame, on the device: an accepted step whose actual and predicted reductions
    are both <= ftol * chi2_red (parameters move < sqrt(ftol) standard errors), or a scaled
    gradient max_i |g_i| / sqrt(A_ii chi2_red) <= gtol. Converged frames are frozen by masks.
    The loop runs max_iter iterations with no host sync; on CPU (where a sync costs nothing) it
    stops early once every frame has converged or failed (``early_exit``).
  * Covariance as lmfit with scale_covar=True: C = (J^T W J)^-1 * chi2_red,
    chi2_red = chi2 / (N - P_free); stderr = sqrt(diag C).
  * Identifiability: a free parameter is not determined by the data when its error exceeds the
    span of its bounds: alone (sqrt(chi2_red / A_jj), e.g. a zero Jacobian column: the centre of
    a peak of zero area; such parameters are left out of the inversion), or jointly (sqrt(C_jj);
    the others' errors still include their correlation with it). Either way its rows and
    columns of C are NaN.

``fit_reference`` is the plain per-frame loop of the same algorithm (STYLE rule 7).
``method="adam" | "lbfgs"`` uses torch.optim on the transformed parameters instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from workers.profiles import (BackgroundSpec, BoundModel, ModelSpec, PeakModel, PeakSpec,  # noqa: F401
                              Shape)

Method = Literal["lm", "adam", "lbfgs"]


@dataclass
class FitResult:
    """Per-frame fit results; B frames, P parameters (external, bounded values)."""
    params: torch.Tensor       # (B, P)
    stderr: torch.Tensor       # (B, P), lmfit-scaled (cov * chi2_red); 0 for fixed parameters
    chi2_red: torch.Tensor     # (B,) chi2 / (N - P_free)
    converged: torch.Tensor    # (B,) bool
    n_iter: torch.Tensor       # (B,) int64, iterations until convergence
    covariance: torch.Tensor | None = None   # (B, P, P) scaled covariance
    normal: torch.Tensor | None = None       # (B, P, P) J^T W J (external parameters) at params
    gradient: torch.Tensor | None = None     # (B, P) J^T W (y - f) (external parameters) at params
    identified: torch.Tensor | None = None   # (B, P) bool: determined by the data (module docstring)


# --------------------------------------------------------------------------------------------
# bound transforms (MINUIT / lmfit)
class BoundTransform:
    """Maps internal t (unbounded) <-> external p within [lower, upper] (P,), inf allowed."""

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor):
        if bool((lower >= upper).any()):
            raise ValueError(f"lower bounds must be < upper bounds, got {lower.tolist()} / {upper.tolist()}")
        self.lo, self.hi = lower, upper
        fl, fh = torch.isfinite(lower), torch.isfinite(upper)
        self.both, self.low, self.up = fl & fh, fl & ~fh, ~fl & fh
        self.lo0 = torch.where(fl, lower, torch.zeros_like(lower))
        self.hi0 = torch.where(fh, upper, torch.zeros_like(upper))
        self.half = torch.where(self.both, (self.hi0 - self.lo0) / 2, torch.ones_like(lower))

    def to_internal(self, p: torch.Tensor) -> torch.Tensor:
        s = ((p - self.lo0) / self.half - 1.0).clamp(-1.0, 1.0)
        tb = torch.asin(s)
        tl = torch.sqrt(((p - self.lo0 + 1.0).clamp_min(1.0)) ** 2 - 1.0)
        tu = torch.sqrt(((self.hi0 - p + 1.0).clamp_min(1.0)) ** 2 - 1.0)
        return torch.where(self.both, tb, torch.where(self.low, tl, torch.where(self.up, tu, p)))

    def to_external(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns p and dp/dt, both shaped like t."""
        sq = torch.sqrt(t * t + 1.0)
        pb, db = self.lo0 + (torch.sin(t) + 1.0) * self.half, torch.cos(t) * self.half
        pl, dl = self.lo0 - 1.0 + sq, t / sq
        pu, du = self.hi0 + 1.0 - sq, -t / sq
        one = torch.ones_like(t)
        p = torch.where(self.both, pb, torch.where(self.low, pl, torch.where(self.up, pu, t)))
        d = torch.where(self.both, db, torch.where(self.low, dl, torch.where(self.up, du, one)))
        return p, d


# --------------------------------------------------------------------------------------------
# model adapters
class _Problem:
    """Weighted residuals and normal equations in internal coordinates for a chunk of frames."""

    def __init__(self, model, x, y, sigma, lower, upper, free, jacobian):
        ok = torch.isfinite(sigma) & (sigma > 0) & torch.isfinite(y)
        self.w = torch.where(ok, 1.0 / torch.where(ok, sigma, torch.ones_like(sigma)), torch.zeros_like(y))
        self.yw = torch.nan_to_num(y) * self.w
        self.tr = BoundTransform(lower, upper)
        self.free = free.to(torch.bool)
        self.ffree = self.free.to(y.dtype)
        self.n_points = ok.sum(-1)
        self.dof = (self.n_points - self.free.sum()).clamp_min(1).to(y.dtype)
        self.eps = torch.finfo(y.dtype).eps
        self._model = model if isinstance(model, BoundModel) and jacobian == "analytic" else None
        if self._model is not None:
            # workspace [J; r] (B, P + 1, N), reused by every iteration (its first rows when
            # only the active frames are evaluated): the model writes J, normal_ext appends r
            self._jbuf = torch.empty(0, model.n_params + 1, x.shape[-1], dtype=y.dtype, device=y.device)
            self._fj = lambda p, w, jac=True: model.evaluate_and_jacobian(p, w, jac)
        else:
            f = model.evaluate if isinstance(model, BoundModel) else (lambda p: model(x, p))
            jf = torch.func.vmap(torch.func.jacfwd(lambda q: f(q[None])[0]))

            def fj(p, w, jac=True):
                return f(p) * w, (jf(p).transpose(1, 2) * w[:, None, :] if jac else None)
            self._fj = fj

    def cost(self, p):
        """chi2 (B,) at external p (B, P)."""
        r = self.yw - self._fj(p, self.w, False)[0]
        return (r * r).sum(-1)

    def normal_ext(self, p, rows=None):
        """chi2 (B,), A = J^T W J (B, P, P), g = J^T W (y - f) (B, P) at external p; `rows`
        (index tensor): p holds only those frames."""
        w, yw = (self.w, self.yw) if rows is None else (self.w[rows], self.yw[rows])
        if self._model is not None:
            B = p.shape[0]
            if self._jbuf.shape[0] < B:
                self._jbuf = self._jbuf.new_empty(B, *self._jbuf.shape[1:])
            jr = self._jbuf[:B]
            fw, _ = self._model.evaluate_and_jacobian(p, w, out=jr[:, :-1])
            torch.sub(yw, fw, out=jr[:, -1])
            m = jr @ jr.transpose(1, 2)      # [J; r] [J; r]^T holds A, g and chi2: one product
            return m[:, -1, -1], m[:, :-1, :-1], m[:, :-1, -1]
        fw, jw = self._fj(p, w)
        r = yw - fw
        return (r * r).sum(-1), jw @ jw.transpose(1, 2), (jw @ r[..., None])[..., 0]

    def normal(self, t, rows=None):
        """chi2, A and g chained to internal coordinates t (J_t = J diag(dp/dt)), and the
        external A and g (normal_ext)."""
        p, d = self.tr.to_external(t)
        cost, a_ext, g_ext = self.normal_ext(p, rows)
        d = d * self.ffree
        return cost, a_ext * d[:, :, None] * d[:, None, :], g_ext * d, a_ext, g_ext


def _bind(model, x, lower, upper):
    """Normalise the model argument: PeakModel/BoundModel or a callable f(x, p) -> (B, N)."""
    if isinstance(model, PeakModel):
        model = model.bind(x)
    if isinstance(model, BoundModel):
        lo = model.lower if lower is None else torch.as_tensor(lower, dtype=x.dtype, device=x.device)
        hi = model.upper if upper is None else torch.as_tensor(upper, dtype=x.dtype, device=x.device)
        return model, lo, hi, model.free
    if not callable(model):
        raise ValueError(f"model must be a PeakModel, BoundModel or callable, got {type(model).__name__}")
    return model, lower, upper, None


# --------------------------------------------------------------------------------------------
def spd_inverse(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of a batch (..., P, P) of symmetric positive-definite matrices (normal matrices
    J^T W J, penalised Hessians) by Cholesky, and a (...) bool "bad": NaN where a matrix is not
    finite or not positive definite (a parameter the data do not determine).

    Not ``torch.linalg.inv_ex``: with MKL and more than one thread its batched LU raised "Pivots
    given to lu_solve must all be greater or equal to 1" on well-conditioned 5 x 240 x 240
    batches (window fits; torch 2.13 CPU, MKL 2024.2, 50 of 50 calls in one process), which
    failed whole batches with workers.threads = 2; Cholesky is also the cheaper factorisation."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    finite = torch.isfinite(a).all(-1).all(-1)
    chol, info = torch.linalg.cholesky_ex(torch.where(finite[..., None, None], a, eye))
    bad = (info != 0) | ~finite
    inv = torch.cholesky_inverse(torch.where(bad[..., None, None], eye, chol))
    return torch.where(bad[..., None, None], torch.full_like(inv, math.nan), inv), bad


def determined_alone(a: torch.Tensor, free: torch.Tensor, chi2_red: torch.Tensor, lower: torch.Tensor,
                     upper: torch.Tensor) -> torch.Tensor:
    """(..., P) bool: the free parameters whose error alone, sqrt(chi2_red / A_jj), is within the
    span of their bounds (A (..., P, P) external J^T W J, chi2_red (...), bounds (P,))."""
    span = upper - lower
    return free & (torch.diagonal(a, dim1=-2, dim2=-1) * span * span > chi2_red[..., None])   # NaN: False


def covariance(a: torch.Tensor, free: torch.Tensor, chi2_red: torch.Tensor, lower: torch.Tensor,
               upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(J^T W J)^-1 * chi2_red from external A (..., P, P) and identified (..., P) bool (module
    docstring). Fixed parameters get 0 rows/columns, free parameters the data do not determine
    NaN rows/columns; free (P,), chi2_red (...), bounds (P,)."""
    span = upper - lower
    c2 = chi2_red[..., None]
    keep = determined_alone(a, free, chi2_red, lower, upper)
    kf = keep.to(a.dtype)
    mask = kf[..., :, None] * kf[..., None, :]
    cov, _ = spd_inverse(a * mask + torch.diag_embed(1.0 - kf))           # NaN where singular
    cov = cov * mask * c2[..., None]
    se = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    identified = ~free | (keep & torch.isfinite(se) & ~(se > span))
    lost = (~identified).to(a.dtype)
    nan = torch.full_like(cov, math.nan)
    cov = torch.where((lost[..., :, None] + lost[..., None, :]) > 0, nan, cov)
    return cov, identified


def _lm_chunk(prob: _Problem, t0: torch.Tensor, *, max_iter, ftol, gtol, lambda0, early_exit):
    """Batched LM on internal t0 (B, P). Returns t, chi2, external A, converged, n_iter."""
    B, P = t0.shape
    dt = t0.dtype
    t = t0.clone()
    cost, a, g, a_ext, g_ext = prob.normal(t)
    lam = torch.full((B,), lambda0, dtype=dt, device=t.device)
    nu = torch.full_like(lam, 2.0)
    dsc = torch.zeros(B, P, dtype=dt, device=t.device)
    converged = torch.zeros(B, dtype=torch.bool, device=t.device)
    failed = ~torch.isfinite(cost)
    n_iter = torch.zeros(B, dtype=torch.int64, device=t.device)
    eye = torch.eye(P, dtype=dt, device=t.device)
    tiny = torch.finfo(dt).tiny
    for _ in range(max_iter):
        diag = torch.diagonal(a, dim1=1, dim2=2)
        dsc = torch.maximum(dsc, diag)
        chi2r = (cost / prob.dof).clamp_min(tiny)
        gscale = torch.where(diag > 0, g.abs() / torch.sqrt(diag * chi2r[:, None]).clamp_min(tiny),
                             torch.zeros_like(g))
        converged = converged | (~failed & (gscale.amax(-1) <= gtol))
        dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
        aug = a + lam[:, None, None] * torch.diag_embed(dd) + eye * (dsc == 0)[:, None, :]
        chol, info = torch.linalg.cholesky_ex(aug)
        delta = torch.cholesky_solve(g[..., None], chol)[..., 0]
        pred = (delta * g).sum(-1) + lam * (dd * delta * delta).sum(-1)
        tol = ftol * chi2r + 16.0 * prob.eps * cost
        # the next (nearly undamped) step would move chi2 by < tol: done, no evaluation needed
        converged = converged | (~failed & (info == 0) & (pred <= tol) & (lam <= 1.0))
        active = ~(converged | failed)
        if early_exit and not bool(active.any()):
            break
        t_new = t + delta
        if early_exit and not bool(active.all()):
            # CPU: evaluate only the frames still iterating (frozen ones would be thrown away)
            rows = torch.nonzero(active)[:, 0]
            new = [v.clone() for v in (cost, a, g, a_ext, g_ext)]
            for v, w in zip(new, prob.normal(t_new[rows], rows)):
                v[rows] = w
            cost_new, a_new, g_new, a_ext_new, g_ext_new = new
        else:
            cost_new, a_new, g_new, a_ext_new, g_ext_new = prob.normal(t_new)
        ok = (info == 0) & torch.isfinite(cost_new) & torch.isfinite(delta).all(-1)
        accept = active & ok & (cost_new < cost)
        red = cost - cost_new
        rho = red / pred.clamp_min(tiny)
        small = accept & (red <= tol) & (pred <= tol)
        t = torch.where(accept[:, None], t_new, t)
        a = torch.where(accept[:, None, None], a_new, a)
        a_ext = torch.where(accept[:, None, None], a_ext_new, a_ext)
        g = torch.where(accept[:, None], g_new, g)
        g_ext = torch.where(accept[:, None], g_ext_new, g_ext)
        cost = torch.where(accept, cost_new, cost)
        fac = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
        lam = torch.where(accept, lam * fac, torch.where(active, lam * nu, lam))
        nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(active, nu * 2.0, nu))
        n_iter = n_iter + active.to(torch.int64)
        converged = converged | small
        failed = failed | (active & (lam > 1e16))
        if early_exit and not bool((~(converged | failed)).any()):
            break
    return t, cost, a_ext, g_ext, converged & ~failed, n_iter


def fit_batch(model, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor | None, p0: torch.Tensor, *,
              method: Method = "lm", lower=None, upper=None, max_iter: int = 50, ftol: float = 1e-5,
              gtol: float = 1e-4, lambda0: float = 1e-3, jacobian: Literal["analytic", "autodiff"] = "analytic",
              chunk_size: int | None = None, early_exit: bool | None = None, lr: float = 0.05,
              return_covariance: bool = True) -> FitResult:
    """Fit B frames independently.

    model: PeakModel (bound to x here), BoundModel, or a callable f(x, p (B, P)) -> (B, N)
      (then lower/upper (P,) give bounds, Jacobian by torch.func.jacfwd).
    x: (N,) radial grid, 1/nm. y, sigma: (B, N); sigma None means 1; non-finite or <= 0 sigma
      or non-finite y give weight 0. p0: (B, P) or (P,) start values (clamped into bounds).
    ftol: convergence when an accepted step changes chi2 by < ftol * chi2_red (and the predicted
      change too): parameters within ~sqrt(ftol) standard errors of the optimum.
    gtol: convergence when max_i |g_i| / sqrt(A_ii chi2_red) <= gtol (g = J^T W r, A = J^T W J:
      the one-parameter Gauss-Newton step in standard errors).
    chunk_size: frames per chunk (memory: chunk x N x P Jacobian); None picks ~2^23 elements.
    early_exit: stop iterating when all frames are done (one host sync per iteration);
      default True on CPU, False on CUDA (fixed max_iter, no sync).
    """
    if method not in ("lm", "adam", "lbfgs"):
        raise ValueError(f"method must be 'lm', 'adam' or 'lbfgs', got {method!r}")
    if jacobian not in ("analytic", "autodiff"):
        raise ValueError(f"jacobian must be 'analytic' or 'autodiff', got {jacobian!r}")
    for nm, v in (("max_iter", max_iter), ("ftol", ftol), ("gtol", gtol), ("lambda0", lambda0)):
        if not v > 0:
            raise ValueError(f"{nm} must be > 0, got {v!r}")
    if y.dim() != 2 or y.shape[-1] != x.shape[-1]:
        raise ValueError(f"y must be (B, N) with N = len(x) = {x.shape[-1]}, got {tuple(y.shape)}")
    bound, lo, hi, free = _bind(model, x, lower, upper)
    B = y.shape[0]
    p0 = torch.as_tensor(p0, dtype=y.dtype, device=y.device)
    p0 = p0.expand(B, -1) if p0.dim() == 1 else p0
    P = p0.shape[-1]
    if lo is None:
        lo = torch.full((P,), -math.inf, dtype=y.dtype, device=y.device)
    if hi is None:
        hi = torch.full((P,), math.inf, dtype=y.dtype, device=y.device)
    if free is None:
        free = torch.ones(P, dtype=torch.bool, device=y.device)
    if sigma is None:
        sigma = torch.ones_like(y)
    if early_exit is None:
        early_exit = y.device.type == "cpu"
    if chunk_size is None:   # CPU: stay cache resident (~64k points per chunk); GPU: ~4M Jacobian entries
        n = x.shape[-1]
        chunk_size = max(1, (1 << 16) // n if y.device.type == "cpu" else (1 << 22) // max(1, n * P))
    outs = []
    for s in range(0, B, chunk_size):
        sl = slice(s, min(B, s + chunk_size))
        prob = _Problem(bound, x, y[sl], sigma[sl], lo, hi, free, jacobian)
        span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
        p_start = torch.minimum(torch.maximum(p0[sl], lo + 1e-6 * span), hi - 1e-6 * span)
        t0 = prob.tr.to_internal(p_start)
        if method == "lm":
            t, cost, a_ext, g_ext, conv, nit = _lm_chunk(prob, t0, max_iter=max_iter, ftol=ftol, gtol=gtol,
                                                         lambda0=lambda0, early_exit=early_exit)
        else:
            t, cost, a_ext, g_ext, conv, nit = _torch_optim_chunk(prob, t0, method=method, max_iter=max_iter,
                                                                  gtol=gtol, lr=lr)
        p, _ = prob.tr.to_external(t)
        chi2r = cost / prob.dof
        cov, ident = covariance(a_ext, free, chi2r, lo, hi)
        se = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0).sqrt()
        outs.append((p, se, chi2r, conv, nit, cov if return_covariance else None, a_ext, g_ext, ident))
    cat = [torch.cat([o[i] for o in outs]) if outs[0][i] is not None else None for i in range(9)]
    return FitResult(*cat)


def _torch_optim_chunk(prob: _Problem, t0, *, method, max_iter, gtol, lr):
    """Adam or L-BFGS on the summed chi2 of independent frames.

    The internal parameters are preconditioned by sqrt(diag J^T W J) at the start, so one unit
    is about one standard error (lr for Adam is in those units).
    """
    a0 = prob.normal(t0)[1]
    sc = torch.sqrt(torch.diagonal(a0, dim1=1, dim2=2)).clamp_min(1e-12)
    u = (t0 * sc).clone().requires_grad_(True)

    def total():
        p, _ = prob.tr.to_external(u / sc)
        return prob.cost(p).sum()

    if method == "adam":
        opt = torch.optim.Adam([u], lr=lr)
        for _ in range(max_iter):
            opt.zero_grad()
            total().backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15, history_size=20)

        def closure():
            opt.zero_grad()
            c = total()
            c.backward()
            return c
        opt.step(closure)
    t = (u / sc).detach()
    cost, a, g, a_ext, g_ext = prob.normal(t)
    diag = torch.diagonal(a, dim1=1, dim2=2)
    chi2r = cost / prob.dof
    gs = torch.where(diag > 0, g.abs() / torch.sqrt(diag * chi2r[:, None]), torch.zeros_like(g))
    conv = torch.isfinite(cost) & (gs.amax(-1) <= gtol * 100)
    return t, cost, a_ext, g_ext, conv, torch.full_like(cost, max_iter, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
def fit_reference(model, x, y, sigma, p0, *, max_iter: int = 50, ftol: float = 1e-5, gtol: float = 1e-4,
                  lambda0: float = 1e-3) -> FitResult:
    """Plain per-frame loop of the same LM with host-side decisions, for testing fit_batch."""
    bound, lo, hi, free = _bind(model, x, None, None)
    B = y.shape[0]
    p0 = p0.expand(B, -1) if p0.dim() == 1 else p0
    rows = []
    for b in range(B):
        prob = _Problem(bound, x, y[b:b + 1], sigma[b:b + 1], lo, hi, free, "analytic")
        span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
        p_start = torch.minimum(torch.maximum(p0[b:b + 1], lo + 1e-6 * span), hi - 1e-6 * span)
        t = prob.tr.to_internal(p_start)
        P = t.shape[1]
        cost, a, g, a_ext, g_ext = prob.normal(t)
        cost, a, g = float(cost[0]), a[0], g[0]
        lam, nu, dsc = lambda0, 2.0, torch.zeros(P, dtype=y.dtype)
        dof, eps = float(prob.dof[0]), prob.eps
        conv, nit = False, 0
        for _ in range(max_iter):
            dg = torch.diagonal(a)
            dsc = torch.maximum(dsc, dg)
            chi2r = cost / dof
            gs = max(abs(float(g[i])) / math.sqrt(float(dg[i]) * chi2r) for i in range(P) if dg[i] > 0)
            if gs <= gtol:
                conv = True
                break
            dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
            aug = a + lam * torch.diag(dd) + torch.diag((dsc == 0).to(a.dtype))
            delta = torch.linalg.solve(aug, g)
            pred = float(delta @ g) + lam * float((dd * delta * delta).sum())
            tol = ftol * chi2r + 16.0 * eps * cost
            if pred <= tol and lam <= 1.0:
                conv = True
                break
            c_new, a_new, g_new, ae_new, ge_new = prob.normal(t + delta[None])
            c_new = float(c_new[0])
            nit += 1
            if math.isfinite(c_new) and c_new < cost:
                red = cost - c_new
                rho = red / pred
                t, cost, a, g, a_ext, g_ext = t + delta[None], c_new, a_new[0], g_new[0], ae_new, ge_new
                lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
                if red <= tol and pred <= tol:
                    conv = True
                    break
            else:
                lam *= nu
                nu *= 2.0
                if lam > 1e16:
                    break
        p, _ = prob.tr.to_external(t)
        chi2r = torch.tensor([cost / dof], dtype=y.dtype)
        cov, ident = covariance(a_ext, free, chi2r, lo, hi)
        rows.append((p[0], torch.diagonal(cov[0]).clamp_min(0).sqrt(), chi2r[0], conv, nit, cov[0], a_ext[0],
                     g_ext[0], ident[0]))
    return FitResult(*[torch.tensor([r[i] for r in rows]) if i in (3, 4)
                       else torch.stack([r[i] for r in rows]) for i in range(9)])


def initial_guess(model: PeakModel, x: torch.Tensor, y: torch.Tensor, *, search: bool = False) -> torch.Tensor:
    """Start values (B, P) from the PeakSpecs (areas None estimated from y (B, N));
    search=True: centres from a peak search (argmax in [center_min, center_max] after an
    edge-line background is removed)."""
    return model.bind(x).guess(y, search=search)
