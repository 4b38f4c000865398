"""Penalised joint fit of windows of frames: a temporal penalty on peak centres and widths,
solved by one Levenberg-Marquardt over each whole window, with the sandwich covariance.

Joint window fit (Stinton & Evans, J. Appl. Cryst. 40, 87 (2007), as a fixed-lag smoother):
    min_Theta  sum_t chi2_t(theta_t) + 2 s^2 sum_{t,k} m_t rho(u_tk),
    u_tk = (theta_{t+1,k} - theta_{t,k}) / e_tk,
k over the centre and width parameters of every peak, e_tk = sqrt((se_t^2 + se_{t+1}^2)/2) the
per-frame standard errors (so the strength s is in standard-error units and needs no tuning
per experiment; s = 1: a change of one standard error costs as much as a one-standard-error
misfit), m_t = 0 across a detected change point. rho: quadratic u^2/2; Huber (delta, quadratic
for |u| <= delta, linear beyond); smoothed total variation sqrt(u^2 + eps^2) - eps. It is solved
by one LM over all W frames of the window (block-diagonal data Hessian plus the difference
operator, dense W*P solve), with IRLS weights rho'(u)/u re-computed every iteration (a
majorise-minimise step; acceptance uses the true penalised cost). ``joint_fit_reference`` is
the plain loop of the same algorithm, one window at a time with dense matrices (STYLE rule 7).

Uncertainties of final results: the estimate is a (linearised) smoother of independent
per-frame data, Theta = H^-1 (sum_t J_t^T W_t r_t + ...), so its covariance is the sandwich
    C = H^-1 M H^-1,  H = blockdiag(J_t^T W_t J_t) + s^2 D^T diag(rho''(u)/e^2) D,
    M = blockdiag(chi2_red,t J_t^T W_t J_t),
(the Bayesian H^-1 would be too pessimistic: it counts the penalty as information about the
truth). rho'' is the true curvature (0 on Huber's linear part). Smoothing bias on curved
trajectories is not included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from workers.fit import BoundTransform, _Problem, spd_inverse
from workers.profiles import BoundModel


# --------------------------------------------------------------------------------------------
# penalties: rho, IRLS weight rho'(u)/u, curvature rho''(u)
def _penalty_terms(u, penalty: str, delta: float, eps: float):
    if penalty == "quadratic":
        one = torch.ones_like(u)
        return 0.5 * u * u, one, one
    au = u.abs()
    if penalty == "huber":
        quad = au <= delta
        rho = torch.where(quad, 0.5 * u * u, delta * (au - 0.5 * delta))
        wt = torch.where(quad, torch.ones_like(u), delta / au.clamp_min(1e-300))
        return rho, wt, quad.to(u.dtype)
    r = torch.sqrt(u * u + eps * eps)         # smoothed total variation
    return r - eps, 1.0 / r, eps * eps / r ** 3


class _Differences:
    """The difference operator D of a window of W frames with P parameters each:
    (D p)_tk = p_{t+1,R_k} - p_{t,R_k} for the K regularised parameters R, shaped (nb, W-1, K).
    Parameters flatten frame-major into W*P."""

    def __init__(self, W: int, P: int, R: torch.Tensor):
        self.W, self.P, self.R = W, P, R
        WP = W * P
        tt = torch.arange(W - 1, device=R.device)[:, None] * P + R[None, :]   # (W-1, K): (t, R_k)
        t1 = tt + P                                                           # (t+1, R_k)
        # flat positions in a (W*P, W*P) matrix of the entries (t,t), (t+1,t+1), (t,t+1), (t+1,t)
        self._pos = [(a * WP + b).reshape(-1) for a, b in ((tt, tt), (t1, t1), (tt, t1), (t1, tt))]

    def apply(self, p: torch.Tensor) -> torch.Tensor:
        """D p: p (nb, W, P) -> (nb, W-1, K)."""
        return p[:, 1:, self.R] - p[:, :-1, self.R]

    def transpose(self, v: torch.Tensor) -> torch.Tensor:
        """D^T v: v (nb, W-1, K) -> (nb, W, P)."""
        out = torch.zeros(v.shape[0], self.W, self.P, dtype=v.dtype, device=v.device)
        out[:, 1:, self.R] += v
        out[:, :-1, self.R] -= v
        return out

    def add_gram(self, H: torch.Tensor, c: torch.Tensor, d: torch.Tensor | None = None) -> None:
        """H (nb, W*P, W*P) += E^T diag(c) E in place, c (nb, W-1, K); E = D, or D diag(d) with
        d (nb, W, P) the chain factors dp/dt of internal parameters."""
        if d is None:
            vals = [c, c, -c, -c]
        else:
            d0, d1 = d[:, :-1, self.R], d[:, 1:, self.R]
            vals = [c * d0 * d0, c * d1 * d1, -c * d0 * d1, -c * d0 * d1]
        flat = H.view(H.shape[0], -1)
        for ps, v in zip(self._pos, vals):
            flat.index_add_(1, ps, v.reshape(H.shape[0], -1))


@dataclass
class JointResult:
    """Joint fits of Bw windows of W frames, P parameters (external, bounded values)."""
    params: torch.Tensor      # (Bw, W, P)
    cov: torch.Tensor         # (Bw, W, P, P) sandwich covariance per frame
    chi2_red: torch.Tensor    # (Bw, W) data chi2 / dof per frame
    converged: torch.Tensor   # (Bw,) bool


@dataclass
class _WindowState:
    """The penalised problem of nb windows of W frames at one point (internal parameters t)."""
    cost: torch.Tensor        # (nb,) data chi2 + penalty
    H: torch.Tensor           # (nb, W*P, W*P) IRLS Gauss-Newton Hessian of cost / 2
    g: torch.Tensor           # (nb, W*P) minus the gradient of cost / 2
    cost_d: torch.Tensor      # (nb*W,) data chi2 per frame
    a_ext: torch.Tensor       # (nb*W, P, P) J^T W J per frame, external parameters

    def scatter(self, sel: torch.Tensor, rows: torch.Tensor, sub: _WindowState) -> _WindowState:
        """A copy with windows `sel` (their frames `rows`) taken from `sub`."""
        out = _WindowState(self.cost.clone(), self.H.clone(), self.g.clone(), self.cost_d.clone(),
                           self.a_ext.clone())
        out.cost[sel], out.H[sel], out.g[sel] = sub.cost, sub.H, sub.g
        out.cost_d[rows], out.a_ext[rows] = sub.cost_d, sub.a_ext
        return out

    def where(self, acc: torch.Tensor, W: int, new: _WindowState) -> _WindowState:
        """`new` for the windows where acc (nb,) is True, self elsewhere."""
        accf = acc.repeat_interleave(W)
        return _WindowState(torch.where(acc, new.cost, self.cost),
                            torch.where(acc[:, None, None], new.H, self.H),
                            torch.where(acc[:, None], new.g, self.g),
                            torch.where(accf, new.cost_d, self.cost_d),
                            torch.where(accf[:, None, None], new.a_ext, self.a_ext))


class _WindowProblem:
    """The penalised cost of Bw windows (module docstring) and its IRLS normal equations in
    internal coordinates, for all windows or a subset of them.

    y, sigma (Bw, W, N); scale (Bw, W-1, K) standard-error units of the differences; links
    (Bw, W-1) bool, False cuts the penalty between frames t and t+1."""

    def __init__(self, bound: BoundModel, y, sigma, scale, links, *, strength: float, penalty: str,
                 huber_delta: float, tv_eps: float):
        Bw, W, N = y.shape
        self.bound, self.W, self.P = bound, W, bound.n_params
        self.y, self.sigma = y.reshape(Bw * W, N), sigma.reshape(Bw * W, N)
        self.data = self._data(self.y, self.sigma)
        self.tr: BoundTransform = self.data.tr
        self.D = _Differences(W, self.P, torch.tensor(bound.model.reg_index, device=y.device))
        self.scale, self.m = scale, links.to(y.dtype)[..., None]                # m (Bw, W-1, 1)
        self.s2 = strength * strength
        self.penalty, self.huber_delta, self.tv_eps = penalty, huber_delta, tv_eps
        self._subset: tuple[torch.Tensor, _Problem] | None = None               # (windows, their data)

    def _data(self, y, sigma) -> _Problem:
        b = self.bound
        return _Problem(b, b.x, y, sigma, b.lower, b.upper, b.free, "analytic")

    def start(self, p0) -> torch.Tensor:
        """Internal start values (Bw*W, P) from p0 (Bw, W, P), moved just inside the bounds."""
        lo, hi = self.bound.lower, self.bound.upper
        span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
        p = torch.minimum(torch.maximum(p0.reshape(-1, self.P), lo + 1e-6 * span), hi - 1e-6 * span)
        return self.tr.to_internal(p)

    def frames(self, sel: torch.Tensor) -> torch.Tensor:
        """Flat frame indices (len(sel) * W,) of the windows sel."""
        return (sel[:, None] * self.W + torch.arange(self.W, device=sel.device)).reshape(-1)

    def terms(self, u):
        return _penalty_terms(u, self.penalty, self.huber_delta, self.tv_eps)

    def evaluate(self, t, sel: torch.Tensor | None = None) -> _WindowState:
        """The state at internal t (nb*W, P) of the windows sel (all if None)."""
        if sel is None:
            data, m, sc = self.data, self.m, self.scale
        else:
            if self._subset is None or not torch.equal(self._subset[0], sel):   # the set only shrinks
                rows = self.frames(sel)
                self._subset = sel, self._data(self.y[rows], self.sigma[rows])
            data, m, sc = self._subset[1], self.m[sel], self.scale[sel]
        nb, W, P, s2 = m.shape[0], self.W, self.P, self.s2
        cost_d, a, g, a_ext = data.normal(t)
        p, d = self.tr.to_external(t)
        p, d = p.reshape(nb, W, P), (d * self.data.ffree).reshape(nb, W, P)
        u = self.D.apply(p) / sc
        rho, wt, _ = self.terms(u)
        cost = cost_d.reshape(nb, W).sum(1) + 2.0 * s2 * (m * rho).sum((1, 2))
        blk = torch.arange(W, device=t.device)
        H = torch.zeros(nb, W, P, W, P, dtype=t.dtype, device=t.device)
        H[:, blk, :, blk, :] = a.reshape(nb, W, P, P).transpose(0, 1)
        H = H.reshape(nb, W * P, W * P)
        self.D.add_gram(H, s2 * wt * m / (sc * sc), d)
        gp = self.D.transpose(-(s2 * wt * m * u / sc))                        # -d(penalty/2)/dp
        grad = g.reshape(nb, W, P) + gp * d
        return _WindowState(cost, H, grad.reshape(nb, W * P), cost_d, a_ext)


def _lm_windows(prob: _WindowProblem, t: torch.Tensor, *, max_iter: int, ftol: float,
                lambda0: float) -> tuple[torch.Tensor, _WindowState, torch.Tensor]:
    """LM over whole windows, all windows in lock step (Nielsen damping and gain ratio as
    ``workers.fit``), from internal t (Bw*W, P). Returns t, the state there, converged (Bw,)."""
    W = prob.W
    st = prob.evaluate(t)
    Bw, WP = st.g.shape
    dt, dev = t.dtype, t.device
    lam = torch.full((Bw,), lambda0, dtype=dt, device=dev)
    nu = torch.full_like(lam, 2.0)
    dsc = torch.zeros(Bw, WP, dtype=dt, device=dev)
    conv = torch.zeros(Bw, dtype=torch.bool, device=dev)
    eye = torch.eye(WP, dtype=dt, device=dev)
    dof = prob.data.dof.reshape(Bw, W)
    for _ in range(max_iter):
        dsc = torch.maximum(dsc, torch.diagonal(st.H, dim1=1, dim2=2))
        dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
        chol, info = torch.linalg.cholesky_ex(st.H + lam[:, None, None] * torch.diag_embed(dd)
                                              + eye * (dsc == 0)[:, None, :])
        delta = torch.cholesky_solve(st.g[..., None], chol)[..., 0]
        pred = (delta * st.g).sum(-1) + lam * (dd * delta * delta).sum(-1)
        chi2r = (st.cost_d.reshape(Bw, W) / dof).mean(1).clamp_min(1e-300)
        tol = ftol * W * chi2r + 16.0 * prob.data.eps * st.cost
        conv = conv | ((info == 0) & (pred <= tol) & (lam <= 1.0))
        active = ~conv
        t_new = t + delta.reshape(Bw * W, -1)
        if dev.type == "cpu":
            # CPU: evaluate only the windows still iterating (converged ones would be computed
            # and thrown away); on CUDA all of them, so that no host sync is needed
            sel = torch.nonzero(active)[:, 0]
            if sel.numel() == 0:
                break
            rows = prob.frames(sel)
            new = st.scatter(sel, rows, prob.evaluate(t_new[rows], sel))
        else:
            new = prob.evaluate(t_new)
        acc = active & (info == 0) & torch.isfinite(new.cost) & (new.cost < st.cost)
        rho = (st.cost - new.cost) / pred.clamp_min(1e-300)
        t = torch.where(acc.repeat_interleave(W)[:, None], t_new, t)
        st = st.where(acc, W, new)
        lam = torch.where(acc, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3),
                          torch.where(active, lam * nu, lam))
        nu = torch.where(acc, torch.full_like(nu, 2.0), torch.where(active, nu * 2, nu))
    return t, st, conv


def joint_fit(bound: BoundModel, y, sigma, p0, scale, links, *, strength: float, penalty: str,
              huber_delta: float = 1.0, tv_eps: float = 0.1, max_iter: int = 30, ftol: float = 1e-3,
              lambda0: float = 1e-3) -> JointResult:
    """Penalised joint LM over windows of W frames, Bw windows at once.

    y, sigma (Bw, W, N); p0 (Bw, W, P) start; scale (Bw, W-1, K) standard-error units of the
    differences of the K regularised parameters (bound.model.reg_index); links (Bw, W-1) bool,
    False cuts the penalty between frames t and t+1. ``ftol``: converged when the predicted
    decrease of the penalised χ² is below ftol · χ²_red per frame of the window (W · ftol · χ²_red
    in all), i.e. each frame's parameters within ~sqrt(ftol) ≈ 0.03 standard errors of the
    optimum; the start is already the per-frame or previous window's fit, so a tighter tolerance
    only spends iterations (measurements in benchmarks/RESULTS.md).
    """
    Bw, W, _ = y.shape
    prob = _WindowProblem(bound, y, sigma, scale, links, strength=strength, penalty=penalty,
                          huber_delta=huber_delta, tv_eps=tv_eps)
    t, st, conv = _lm_windows(prob, prob.start(p0), max_iter=max_iter, ftol=ftol, lambda0=lambda0)
    p = prob.tr.to_external(t)[0].reshape(Bw, W, prob.P)
    chi2_red = st.cost_d.reshape(Bw, W) / prob.data.dof.reshape(Bw, W)
    cov = _sandwich(prob, p, st.a_ext.reshape(Bw, W, prob.P, prob.P), chi2_red)
    return JointResult(p, cov, chi2_red, conv)


def _sandwich(prob: _WindowProblem, p, a_ext, chi2_red):
    """C = H^-1 M H^-1 with the true penalty curvature, blocks per frame (Bw, W, P, P)."""
    Bw, W, P, _ = a_ext.shape
    WP = W * P
    blk = torch.arange(W, device=p.device)
    ffree = prob.data.ffree
    fmask = ffree[None, :, None] * ffree[None, None, :]
    A = a_ext * fmask
    H = torch.zeros(Bw, W, P, W, P, dtype=p.dtype, device=p.device)
    M = torch.zeros_like(H)
    H[:, blk, :, blk, :] = (A + torch.diag_embed(1.0 - ffree)).transpose(0, 1)
    M[:, blk, :, blk, :] = (A * chi2_red[..., None, None]).transpose(0, 1)
    H = H.reshape(Bw, WP, WP)
    u = prob.D.apply(p) / prob.scale
    _, _, curv = prob.terms(u)
    prob.D.add_gram(H, prob.s2 * curv * prob.m / (prob.scale * prob.scale))
    Hi, _ = spd_inverse(H)                          # NaN where H is singular: C is NaN there
    C = Hi @ M.reshape(Bw, WP, WP) @ Hi
    C = C.reshape(Bw, W, P, W, P)[:, blk, :, blk, :].transpose(0, 1)
    return C * fmask


# --------------------------------------------------------------------------------------------
# plain reference of joint_fit (STYLE rule 7)
def _penalty_reference(u: list[float], penalty: str, delta: float, eps: float):
    """rho(u), rho'(u)/u and rho''(u) of each element, written out per element."""
    rho, wt, curv = [], [], []
    for x in u:
        if penalty == "quadratic":
            r, w, c = 0.5 * x * x, 1.0, 1.0
        elif penalty == "huber":
            if abs(x) <= delta:
                r, w, c = 0.5 * x * x, 1.0, 1.0
            else:
                r, w, c = delta * (abs(x) - 0.5 * delta), delta / abs(x), 0.0
        else:
            s = math.sqrt(x * x + eps * eps)
            r, w, c = s - eps, 1.0 / s, eps * eps / s ** 3
        rho.append(r)
        wt.append(w)
        curv.append(c)
    return rho, wt, curv


def joint_fit_reference(bound: BoundModel, y, sigma, p0, scale, links, *, strength: float, penalty: str,
                        huber_delta: float = 1.0, tv_eps: float = 0.1, max_iter: int = 30,
                        ftol: float = 1e-3, lambda0: float = 1e-3) -> JointResult:
    """The same penalised LM as ``joint_fit``, one window at a time with dense matrices (the
    difference operator D built entry by entry) and host-side decisions, for testing it."""
    wins = [_reference_window(bound, y[b], sigma[b], p0[b], scale[b], links[b], s2=strength * strength,
                              penalty=penalty, huber_delta=huber_delta, tv_eps=tv_eps, max_iter=max_iter,
                              ftol=ftol, lambda0=lambda0) for b in range(y.shape[0])]
    return JointResult(*(torch.stack([getattr(w, f.name) for w in wins]) for f in fields(JointResult)))


def _reference_window(bound: BoundModel, y, sigma, p0, scale, links, *, s2, penalty, huber_delta, tv_eps,
                      max_iter, ftol, lambda0) -> JointResult:
    """One window: y, sigma (W, N), p0 (W, P), scale (W-1, K), links (W-1,); unbatched result."""
    W, P, R = y.shape[0], bound.n_params, list(bound.model.reg_index)
    K, dt = len(R), y.dtype
    prob = _Problem(bound, bound.x, y, sigma, bound.lower, bound.upper, bound.free, "analytic")
    D = torch.zeros((W - 1) * K, W * P, dtype=dt)                  # u = D p, in standard-error units
    for t in range(W - 1):
        for k, i in enumerate(R):
            D[t * K + k, t * P + i] = -1.0 / float(scale[t, k])
            D[t * K + k, (t + 1) * P + i] = 1.0 / float(scale[t, k])
    m = torch.tensor([float(links[t]) for t in range(W - 1) for _ in R], dtype=dt)

    def evaluate(t):
        cost_d, a, g, a_ext = prob.normal(t)
        p, d = prob.tr.to_external(t)
        u = D @ p.reshape(-1)
        rho, wt, _ = _penalty_reference(u.tolist(), penalty, huber_delta, tv_eps)
        rho, wt = torch.tensor(rho, dtype=dt), torch.tensor(wt, dtype=dt)
        Dd = D * (d * prob.ffree).reshape(-1)                       # D in internal coordinates
        cost = float(cost_d.sum()) + 2.0 * s2 * float((m * rho).sum())
        H = torch.block_diag(*a) + s2 * Dd.T @ torch.diag(m * wt) @ Dd
        grad = g.reshape(-1) - s2 * Dd.T @ (m * wt * u)
        return cost, H, grad, cost_d, a_ext

    lo, hi = bound.lower, bound.upper
    span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
    t = prob.tr.to_internal(torch.minimum(torch.maximum(p0, lo + 1e-6 * span), hi - 1e-6 * span))
    cost, H, g, cost_d, a_ext = evaluate(t)
    lam, nu, conv = lambda0, 2.0, False
    dsc = torch.zeros(W * P, dtype=dt)
    for _ in range(max_iter):
        dsc = torch.maximum(dsc, torch.diagonal(H))
        dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
        aug = H + lam * torch.diag(dd) + torch.diag((dsc == 0).to(dt))
        chi2r = max(float((cost_d / prob.dof).mean()), 1e-300)
        tol = ftol * W * chi2r + 16.0 * prob.eps * cost
        if torch.linalg.cholesky_ex(aug).info == 0:
            delta = torch.linalg.solve(aug, g)
            pred = float(delta @ g) + lam * float((dd * delta * delta).sum())
            if pred <= tol and lam <= 1.0:
                conv = True
                break
            t_new = t + delta.reshape(W, P)
            c_new, H_new, g_new, cd_new, ae_new = evaluate(t_new)
            if math.isfinite(c_new) and c_new < cost:
                rho = (cost - c_new) / max(pred, 1e-300)
                t, cost, H, g, cost_d, a_ext = t_new, c_new, H_new, g_new, cd_new, ae_new
                lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
                continue
        lam *= nu
        nu *= 2.0
    # sandwich covariance C = H^-1 M H^-1 in external parameters, true penalty curvature
    p = prob.tr.to_external(t)[0]
    chi2_red = cost_d / prob.dof
    fmask = prob.ffree[:, None] * prob.ffree[None, :]
    _, _, curv = _penalty_reference((D @ p.reshape(-1)).tolist(), penalty, huber_delta, tv_eps)
    Hc = (torch.block_diag(*(a_ext * fmask + torch.diag(1.0 - prob.ffree)))
          + s2 * D.T @ torch.diag(m * torch.tensor(curv, dtype=dt)) @ D)
    M = torch.block_diag(*(a_ext * fmask * chi2_red[:, None, None]))
    Hi = torch.linalg.inv(Hc)
    C = Hi @ M @ Hi
    cov = torch.stack([C[s * P:(s + 1) * P, s * P:(s + 1) * P] * fmask for s in range(W)])
    return JointResult(p, cov, chi2_red, torch.tensor(conv))
