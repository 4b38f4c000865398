"""Penalised joint fit of windows of frames: a temporal penalty on peak centres and widths,
solved by a Levenberg-Marquardt smoother on the block-tridiagonal normal equations, with the
sandwich covariance.

Joint window fit (Stinton & Evans, J. Appl. Cryst. 40, 87 (2007), as a fixed-lag smoother):
    min_Theta  F = sum_t chi2_t(theta_t) + 2 s^2 sum_{t,k} m_t rho(u_tk),
    u_tk = (theta_{t+1,k} - theta_{t,k}) / e_tk,
k over the centre and width parameters of every peak, e_tk = sqrt((se_t^2 + se_{t+1}^2)/2) the
per-frame standard errors (so the strength s is in standard-error units and needs no tuning
per experiment; s = 1: a change of one standard error costs as much as a one-standard-error
misfit), m_t = 0 across a detected change point. rho: quadratic u^2/2; Huber (delta, quadratic
for |u| <= delta, linear beyond); smoothed total variation sqrt(u^2 + eps^2) - eps.

Solver (``joint_fit``), all windows in lock step, steps in the internal (bounded) coordinates
tau of ``workers.fit``:
  * Each frame's chi2 is its Gauss-Newton expansion at a point p^ where the model was
    evaluated: chi2_t(p) ~ c - 2 g.(p - p^) + (p - p^)^T A (p - p^), A = J^T W J, g = J^T W r,
    in the external parameters p = p(tau), chained to tau at the current point. The expansions
    come in with the frames (the per-frame fit's, or the previous window's) and go out with
    the result, so a window starts without a model evaluation.
  * LM step (Nielsen damping and gain ratio as ``workers.fit``) on the expanded data terms plus
    the exact penalty, whose IRLS weights rho'(u)/u are re-computed every iteration (a
    majorise-minimise step). The penalty couples only neighbouring frames, so the Hessian
    blockdiag(A_t) + s^2 D^T diag(w) D is block tridiagonal with diagonal couplings: each step
    is a forward and a backward block sweep (``workers.block_tridiag``), O(W P^3).
  * The model is evaluated only for frames whose candidate point lies more than ``trust``
    standard errors (in the metric A / chi2_red) from their expansion point; those get a new
    expansion there. A step is accepted only if it lowers F, evaluated so: exactly for those
    frames and the penalty, by the expansion (within ``trust`` se, error third order) for the
    others. So no frame moves far on the quadratic model alone (the deleted "quadratic start"
    moved frames by it without this check and sent one into another minimum).
  * Convergence per frame: the frame's share of the predicted decrease of F,
    |delta_t . G_t + lam delta_t^T D_t delta_t| <= ftol chi2_red,t with lam <= 1 (its
    parameters within ~sqrt(ftol) standard errors of the optimum). A window stops when all its
    frames have converged.
``joint_fit_reference`` is the plain loop of the LM with dense matrices and a model evaluation
for every frame at every step (STYLE rule 7); both reach the same optimum within tolerance.

Uncertainties of final results: the estimate is a (linearised) smoother of independent
per-frame data, Theta = H^-1 (sum_t J_t^T W_t r_t + ...), so its covariance is the sandwich
    C = H^-1 M H^-1,  H = blockdiag(J_t^T W_t J_t) + s^2 D^T diag(rho''(u)/e^2) D,
    M = blockdiag(chi2_red,t J_t^T W_t J_t),
(the Bayesian H^-1 would be too pessimistic: it counts the penalty as information about the
truth). rho'' is the true curvature (0 on Huber's linear part). Smoothing bias on curved
trajectories is not included.

Held parameters keep their start values: those a frame's own data do not determine
(``workers.fit.covariance`` at the frame's expansion at the start, e.g. the centre and width of
a peak of zero area), with their penalty links cut, and those at a bound (within 1e-2 of the
flat end of their bound transform, dp/dt ~ 0: an area at 0, eta at 0 or 1). Otherwise the
penalty alone would move the first along a flat valley of F and smooth their neighbours towards
values no data support; the second blind the internal Gauss-Newton model (a near-zero column),
so a step there is huge and rejected until the damping has grown by orders of magnitude (30
iterations without convergence, measured on a peak that vanishes for 5 frames). In the
covariance, as in ``workers.fit.covariance``, parameters undetermined alone are left out of H and
M, and every unidentified parameter's error is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers import block_tridiag
from workers.fit import _Problem, covariance, determined_alone
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


@dataclass
class Expansion:
    """Gauss-Newton expansions of frames' chi2 at external points p (batch dimensions first):
    chi2(p + dp) ~ chi2 - 2 gradient . dp + dp^T normal dp."""
    params: torch.Tensor      # (..., P) where the model was evaluated
    chi2_red: torch.Tensor    # (...,) chi2 / dof
    normal: torch.Tensor      # (..., P, P) J^T W J
    gradient: torch.Tensor    # (..., P) J^T W (y - f)


@dataclass
class JointResult:
    """Joint fits of Bw windows of W frames, P parameters (external, bounded values)."""
    params: torch.Tensor      # (Bw, W, P)
    cov: torch.Tensor         # (Bw, n, P, P) sandwich covariance of the n frames `report`
    chi2_red: torch.Tensor    # (Bw, W) data chi2 / dof per frame
    converged: torch.Tensor   # (Bw, W) bool, per frame (module docstring)
    identified: torch.Tensor | None = None   # (Bw, W, P) bool (workers.fit.covariance)
    expansion: Expansion | None = None       # (Bw, W, ...) each frame's expansion at the end
    n_eval: torch.Tensor | None = None       # (Bw, W) int64, model evaluations per frame


@dataclass
class _Local:
    """The expansions of F frames (external: point p (F, P), chi2 c (F,), A (F, P, P), g (F, P))."""
    p: torch.Tensor
    c: torch.Tensor
    a: torch.Tensor
    g: torch.Tensor

    def model(self, p):
        """Expanded chi2 (F,), g - A dp (F, P) (minus half its gradient) and dp at external p."""
        dp = p - self.p
        ad = (self.a @ dp[..., None])[..., 0]
        return self.c - 2.0 * (self.g * dp).sum(-1) + (dp * ad).sum(-1), self.g - ad, dp

    def where(self, m: torch.Tensor, other: _Local) -> _Local:
        """other's expansion for the frames m (F,) bool, self's elsewhere."""
        return _Local(*(torch.where(m.reshape(-1, *([1] * (a.dim() - 1))), b, a)
                        for a, b in zip(self._values(), other._values())))

    def refreshed(self, data: _Problem, p: torch.Tensor, need: torch.Tensor) -> _Local:
        """A copy with the frames `need` (F,) bool expanded afresh at external p (F, P). On CPU
        only those are evaluated (one host sync); elsewhere all, with no sync."""
        if p.device.type != "cpu":
            return self.where(need, _Local(p, *data.normal_ext(p)))
        rows = torch.nonzero(need)[:, 0]
        out = [v.clone() for v in self._values()]
        if rows.numel():
            for v, new in zip(out, (p[rows], *data.normal_ext(p[rows], rows))):
                v[rows] = new
        return _Local(*out)

    def _values(self):
        return self.p, self.c, self.a, self.g


class _Window:
    """The penalised cost of Bw windows of W frames (module docstring) in internal coordinates:
    the data terms by their expansions, the penalty exactly; y, sigma (Bw, W, N); scale
    (Bw, W-1, K) standard-error units of the differences; links (Bw, W-1) bool, False cuts the
    penalty between frames t and t+1."""

    def __init__(self, bound: BoundModel, y, sigma, scale, links, *, strength: float, penalty: str,
                 huber_delta: float, tv_eps: float):
        Bw, W, N = y.shape
        self.bound, self.Bw, self.W, self.P = bound, Bw, W, bound.n_params
        self.data = _Problem(bound, bound.x, y.reshape(Bw * W, N), sigma.reshape(Bw * W, N),
                             bound.lower, bound.upper, bound.free, "analytic")
        self.tr = self.data.tr
        self.R = torch.tensor(bound.model.reg_index, device=y.device)
        self.scale, self.links = scale, links.to(y.dtype)[..., None]            # (Bw, W-1, 1)
        every = torch.ones(Bw * W, self.P, dtype=torch.bool, device=y.device)
        self.hold(every, every)
        self.s2 = strength * strength
        self.penalty, self.huber_delta, self.tv_eps = penalty, huber_delta, tv_eps

    def hold(self, fitted: torch.Tensor, linked: torch.Tensor) -> None:
        """Fit only the free parameters `fitted` (Bw*W, P) bool of each frame, the others keep
        their start value; penalise only differences between `linked` parameters (m, Bw x W-1 x K)."""
        self.keep = (fitted & self.bound.free).to(self.scale.dtype)
        lr = linked.reshape(self.Bw, self.W, self.P)[:, :, self.R].to(self.scale.dtype)
        self.linked = linked
        self.m = self.links * lr[:, :-1] * lr[:, 1:]

    def terms(self, u):
        return _penalty_terms(u, self.penalty, self.huber_delta, self.tv_eps)

    def internal(self, p):
        """Internal coordinates (F, P) of external p (..., P), moved just inside the bounds."""
        lo, hi = self.bound.lower, self.bound.upper
        span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
        p = torch.minimum(torch.maximum(p.reshape(-1, self.P), lo + 1e-6 * span), hi - 1e-6 * span)
        return self.tr.to_internal(p)

    def local(self, ex: Expansion) -> _Local:
        """An Expansion of Bw x W frames, flattened."""
        P = self.P
        return _Local(ex.params.reshape(-1, P), ex.chi2_red.reshape(-1) * self.data.dof,
                      ex.normal.reshape(-1, P, P), ex.gradient.reshape(-1, P))

    def blocks(self, tau, loc: _Local):
        """F and its IRLS Gauss-Newton system at internal tau (Bw*W, P): cost (Bw,), data chi2
        (Bw*W,), diagonal blocks (Bw, W, P, P), couplings (Bw, W-1, P), G (Bw, W, P) minus half
        the gradient of F, and the external p (Bw*W, P). The data terms are the expansions in
        external p, chained to tau at tau (J_tau = J diag(dp/dtau))."""
        Bw, W, P, R = self.Bw, self.W, self.P, self.R
        pf, d = self.tr.to_external(tau)
        d = d * self.keep
        cost_d, g, _ = loc.model(pf)
        a = loc.a * d[:, :, None] * d[:, None, :]
        p, d = pf.reshape(Bw, W, P), d.reshape(Bw, W, P)
        u = (p[:, 1:, R] - p[:, :-1, R]) / self.scale
        rho, wt, _ = self.terms(u)
        cost = cost_d.reshape(Bw, W).sum(1) + 2.0 * self.s2 * (self.m * rho).sum((1, 2))
        c = self.s2 * wt * self.m / (self.scale * self.scale)                  # (Bw, W-1, K)
        dr = d[:, :, R]
        dg = torch.zeros_like(p)
        dg[:, :-1, R] += c * dr[:, :-1] ** 2
        dg[:, 1:, R] += c * dr[:, 1:] ** 2
        off = torch.zeros_like(p[:, 1:])
        off[:, :, R] = -c * dr[:, :-1] * dr[:, 1:]
        v = -self.s2 * wt * self.m * u / self.scale                             # -d(penalty/2)/dp
        gp = torch.zeros_like(p)
        gp[:, 1:, R] += v
        gp[:, :-1, R] -= v
        diag = a.reshape(Bw, W, P, P) + torch.diag_embed(dg)
        return cost, cost_d, diag, off, (g.reshape(Bw, W, P) + gp) * d, pf


def _lm_windows(win: _Window, tau: torch.Tensor, loc: _Local, *, max_iter: int, ftol: float,
                lambda0: float, trust: float):
    """LM over whole windows, all windows in lock step, from internal tau (Bw*W, P) and the
    frames' expansions. Returns tau, the expansions, data chi2 (Bw*W,) there, converged
    (Bw, W) and evaluations (Bw*W,)."""
    Bw, W, P = win.Bw, win.W, win.P
    dt, dev = tau.dtype, tau.device
    dof = win.data.dof
    tiny, eps = torch.finfo(dt).tiny, win.data.eps
    lam = torch.full((Bw,), lambda0, dtype=dt, device=dev)
    nu = torch.full_like(lam, 2.0)
    dsc = torch.zeros(Bw, W, P, dtype=dt, device=dev)
    conv = torch.zeros(Bw, W, dtype=torch.bool, device=dev)
    done = torch.zeros(Bw, dtype=torch.bool, device=dev)
    n_eval = torch.zeros(Bw * W, dtype=torch.int64, device=dev)
    st = win.blocks(tau, loc)
    for _ in range(max_iter):
        cost, cost_d, diag, off, G, _ = st
        dsc = torch.maximum(dsc, torch.diagonal(diag, dim1=-2, dim2=-1))
        dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
        aug = diag + torch.diag_embed(lam[:, None, None] * dd + (dsc == 0).to(dt))
        delta, ok = block_tridiag.solve(aug, off, G[..., None])
        delta = delta[..., 0]
        pred_t = (delta * G).sum(-1) + lam[:, None] * (dd * delta * delta).sum(-1)     # (Bw, W)
        chi2r = (cost_d / dof).reshape(Bw, W)
        tol = ftol * chi2r + 16.0 * eps * cost[:, None] / W
        conv = torch.where(done[:, None], conv, ok[:, None] & (lam <= 1.0)[:, None] & (pred_t.abs() <= tol))
        done = done | conv.all(1)
        active = ~done & ok
        if dev.type == "cpu" and not bool(active.any()):
            break
        t_new = tau + delta.reshape(Bw * W, P)
        # frames whose candidate lies beyond `trust` standard errors of their expansion point
        # (external metric A / chi2_red: a bound transform's flat end hides nothing from it)
        p_new = win.tr.to_external(t_new)[0]
        dp = p_new - loc.p
        r2 = (dp * (loc.a @ dp[..., None])[..., 0]).sum(-1) / (loc.c / dof).clamp_min(tiny)
        need = active.repeat_interleave(W) & ~(r2 <= trust * trust)
        new_loc = loc.refreshed(win.data, p_new, need)
        n_eval = n_eval + need.to(torch.int64)
        new = win.blocks(t_new, new_loc)
        acc = active & torch.isfinite(new[0]) & (new[0] < cost)
        rho = (cost - new[0]) / pred_t.sum(1).clamp_min(tiny)
        accf = acc.repeat_interleave(W)
        tau = torch.where(accf[:, None], t_new, tau)
        loc = loc.where(accf, new_loc)
        st = tuple(torch.where(m.reshape(-1, *([1] * (a.dim() - 1))), b, a)
                   for a, b, m in zip(st, new, (acc, accf, acc, acc, acc, accf)))
        lam = torch.where(acc, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3),
                          torch.where(~done, lam * nu, lam))
        nu = torch.where(acc, torch.full_like(nu, 2.0), torch.where(~done, nu * 2, nu))
    return tau, loc, st[1], conv, n_eval


def joint_fit(bound: BoundModel, y, sigma, p0, scale, links, *, strength: float, penalty: str,
              huber_delta: float = 1.0, tv_eps: float = 0.1, max_iter: int = 30, ftol: float = 1e-3,
              lambda0: float = 1e-3, trust: float = 0.5, expansion: Expansion | None = None,
              report: slice = slice(None), windows: torch.Tensor | None = None) -> JointResult:
    """Penalised joint fit of windows of W frames, Bw windows at once (module docstring).

    y, sigma (Bw, W, N); p0 (Bw, W, P) start; scale (Bw, W-1, K) standard-error units of the
    differences of the K regularised parameters (bound.model.reg_index); links (Bw, W-1) bool,
    False cuts the penalty between frames t and t+1. expansion: each frame's chi2 expanded at
    some point (the per-frame fit, or a previous window's result); None, or not finite for a
    frame: evaluated at p0. ``ftol``: a frame has converged when its share of the predicted
    decrease of F is below ftol · χ²_red (parameters within ~sqrt(ftol) ≈ 0.03 standard errors
    of the optimum); the start is already the per-frame or previous window's fit, so a tighter
    tolerance only spends iterations. ``trust``: the radius, in standard errors, within which a
    frame's expansion stands in for its chi2 (module docstring); 0 evaluates every frame that
    moves. ``report``: the frames of each window whose covariance is computed (default all).
    ``windows`` (Bc, Wc) int, with Bw = 1: the covariance is that of these sub-windows of
    consecutive frames (the ``report`` frames of each) at the solution, each by its own terms
    only (module docstring, "Uncertainties"); ``cov`` is then (Bc, n, P, P), ``identified``
    (Bc, Wc, P).
    """
    if not trust >= 0:
        raise ValueError(f"trust must be >= 0, got {trust!r}")
    Bw, W, _ = y.shape
    win = _Window(bound, y, sigma, scale, links, strength=strength, penalty=penalty,
                  huber_delta=huber_delta, tv_eps=tv_eps)
    report = slice(*report.indices(W if windows is None else windows.shape[1])[:2])
    tau = win.internal(p0)
    start = win.tr.to_external(tau)[0]
    if expansion is None:
        loc, fresh = _Local(start, *win.data.normal_ext(start)), torch.ones_like(tau[:, 0], dtype=torch.bool)
    else:
        loc = win.local(expansion)
        fresh = ~(torch.isfinite(loc.p).all(-1) & torch.isfinite(loc.c) & torch.isfinite(loc.a).all(-1).all(-1)
                  & torch.isfinite(loc.g).all(-1))
        loc = loc.refreshed(win.data, start, fresh)
    ident = covariance(loc.a, bound.free, loc.c / win.data.dof, bound.lower, bound.upper)[1]
    at_bound = win.tr.to_external(tau)[1].abs() < 1e-2 * win.tr.half      # the transform's flat end
    win.hold(ident & ~at_bound, ident)
    tau, loc, cost_d, conv, n_eval = _lm_windows(win, tau, loc, max_iter=max_iter, ftol=ftol,
                                                 lambda0=lambda0, trust=trust)
    P = win.P
    n_eval = n_eval + fresh.to(torch.int64)
    p = win.tr.to_external(tau)[0].reshape(Bw, W, P)
    chi2_red = (cost_d / win.data.dof).reshape(Bw, W)
    a_ext = loc.a.reshape(Bw, W, P, P)
    if report.stop > report.start:
        cov, ident = _sandwich(win, p, a_ext, chi2_red, report, windows)
    else:
        cov, ident = p.new_zeros(Bw, 0, P, P), None
    ex = Expansion(loc.p.reshape(Bw, W, P), (loc.c / win.data.dof).reshape(Bw, W), a_ext, loc.g.reshape(Bw, W, P))
    return JointResult(p, cov, chi2_red, conv, ident, ex, n_eval.reshape(Bw, W))


def _sandwich(win: _Window, p, a_ext, chi2_red, report: slice, windows: torch.Tensor | None = None):
    """C = H^-1 M H^-1 with the true penalty curvature (module docstring), blocks per frame
    (Bw, n, P, P) for the n frames `report` of each window (or of each sub-window `windows`
    (Bc, Wc) of the one window: ``joint_fit``), by block-tridiagonal solves for those frames'
    columns of H^-1. Parameters not identified at the start or at the end have NaN rows and
    columns. Returns C and identified (Bw, W, P)."""
    bd, R = win.bound, win.R
    _, ident = covariance(a_ext, bd.free, chi2_red, bd.lower, bd.upper)
    ident = ident & win.linked.reshape(win.Bw, win.W, win.P)
    # as workers.fit.covariance: only parameters undetermined alone are left out, so the errors
    # of the others include their correlation with the jointly weak ones; and frames whose
    # normal matrix could not be inverted at all (every free parameter unidentified), so that
    # one frame does not take its window's covariance with it
    failed = (ident | ~bd.free).logical_not().sum(-1) == int(bd.free.sum())
    keep = (determined_alone(a_ext, bd.free, chi2_red, bd.lower, bd.upper) & ~failed[..., None]).to(p.dtype)
    scale, m = win.scale, win.m
    if windows is not None:
        links = windows[:, :-1]
        p, a_ext, chi2_red, ident, keep = (v[0, windows] for v in (p, a_ext, chi2_red, ident, keep))
        scale, m = scale[0, links], m[0, links]
    Bw, W, P = p.shape
    mask = keep[..., :, None] * keep[..., None, :]
    A = a_ext * mask
    u = (p[:, 1:, R] - p[:, :-1, R]) / scale
    _, _, curv = win.terms(u)
    kr = keep[:, :, R]
    c = win.s2 * curv * m / (scale * scale)
    dg = torch.zeros_like(p)
    dg[:, :-1, R] += c * kr[:, :-1]
    dg[:, 1:, R] += c * kr[:, 1:]
    off = torch.zeros_like(p[:, 1:])
    off[:, :, R] = -c * kr[:, :-1] * kr[:, 1:]
    eye = torch.eye(W * P, dtype=p.dtype, device=p.device).reshape(W, P, W * P)[..., report.start * P:report.stop * P]
    X, ok = block_tridiag.solve(A + torch.diag_embed(dg + 1.0 - keep), off, eye.expand(Bw, -1, -1, -1))
    # C_t = X_t^T M X_t per reported frame t, X_t (W P, P) its columns of H^-1
    n = report.stop - report.start
    MX = (A * chi2_red[..., None, None]) @ X
    X, MX = (v.reshape(Bw, W * P, n, P).permute(0, 2, 1, 3) for v in (X, MX))
    C = X.transpose(-1, -2) @ MX                      # (Bw, n, P, P)
    C = torch.where(ok[:, None, None, None], C * mask[:, report], torch.full_like(C, math.nan))
    lost = 1.0 - ident[:, report].to(p.dtype)
    C = torch.where((lost[..., :, None] + lost[..., None, :]) > 0, torch.full_like(C, math.nan), C)
    return C, ident


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
    """The penalised LM of the module docstring in its plain form, for testing ``joint_fit``:
    one window at a time, dense matrices (the difference operator D built entry by entry), every
    frame evaluated at every step, host-side decisions; converged when the predicted decrease of
    the window's F is below ftol · W · mean χ²_red (for the whole window)."""
    wins = [_reference_window(bound, y[b], sigma[b], p0[b], scale[b], links[b], s2=strength * strength,
                              penalty=penalty, huber_delta=huber_delta, tv_eps=tv_eps, max_iter=max_iter,
                              ftol=ftol, lambda0=lambda0) for b in range(y.shape[0])]
    return JointResult(*(torch.stack([w[i] for w in wins]) for i in range(4)))


def _reference_window(bound: BoundModel, y, sigma, p0, scale, links, *, s2, penalty, huber_delta, tv_eps,
                      max_iter, ftol, lambda0):
    """One window: y, sigma (W, N), p0 (W, P), scale (W-1, K), links (W-1,); returns params,
    cov, chi2_red and converged (W,)."""
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
        cost_d, a, g, a_ext, _ = prob.normal(t)
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
    return p, cov, chi2_red, torch.full((W,), conv)
