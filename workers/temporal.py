"""Sequential fitting of frame series: warm start, divergence re-seeding, and a sliding-window
joint fit with a temporal penalty on peak centres and widths.

Per-frame fits (``workers.fit.fit_batch``) start from the previous good result (warm start,
as sequential refinement in GSAS-II/TOPAS). A frame is re-seeded (``reseeds`` counts them) when
its fit diverged: non-finite result, not converged, a centre or width at a bound, or a reduced
chi2 above ``chi2_jump`` x the median of recent frames. Re-seeding tries the configured guess and
a peak search (argmax within [center_min, center_max] after removing an edge-line background)
and keeps the best chi2.

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
majorise-minimise step; acceptance uses the true penalised cost).

Change points: link (t, t+1) is cut when, for any centre or width,
|theta_{t+1} - theta_t| > ``change_threshold`` x sqrt(se_t^2 + se_{t+1}^2) in the per-frame
fits (a two-sided z test, threshold 5: 6e-7 false alarms per link and parameter for Gaussian
errors). Cut links keep a step sharp: the two sides are smoothed separately. Frame t+1 is
flagged as a change point when the change is also sudden: more than ``sudden_ratio`` x the
change of the same parameter over the link before (a step, or the onset of a transition),
so a fast smooth drift is left unsmoothed but not flagged at every frame.

``quadratic_start`` (not used by the fitter yet): the same penalised problem with each frame's
chi2 replaced by its Gauss-Newton expansion at the per-frame fit, solved by IRLS without model
evaluations. As the windows' start it cut model evaluations 27 -> 19 per frame, but sent one
frame of the GIWAXS test run (tests/test_modalities.py) into another minimum; off until a
safeguard is found.

Window schedule: window W = context + stride + lag. Every ``stride`` frames, the last W frames
are fitted jointly; frames with at least ``lag`` newer frames become final (returned again with
final=True), the ``context`` frames before them (already final) are re-fitted but not re-emitted.
``finish`` flushes the rest with the lookahead available.

Uncertainties of final results: the estimate is a (linearised) smoother of independent
per-frame data, Theta = H^-1 (sum_t J_t^T W_t r_t + ...), so its covariance is the sandwich
    C = H^-1 M H^-1,  H = blockdiag(J_t^T W_t J_t) + s^2 D^T diag(rho''(u)/e^2) D,
    M = blockdiag(chi2_red,t J_t^T W_t J_t),
(the Bayesian H^-1 would be too pessimistic: it counts the penalty as information about the
truth). rho'' is the true curvature (0 on Huber's linear part). Smoothing bias on curved
trajectories is not included.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

import numpy as np
import torch

from workers.fit import BoundTransform, FitResult, _Problem, fit_batch, spd_inverse
from workers.profiles import (SHAPE_PARAMS, BackgroundSpec, BoundModel, ModelSpec, PeakModel,  # noqa: F401
                              PeakSpec, validate_model_spec)

Penalty = Literal["none", "quadratic", "huber", "tv"]

PEAK_COLUMNS = ("seq_num", "time", "peak", "center", "center_err", "fwhm", "fwhm_err",
                "amplitude", "amplitude_err", "eta", "chi2", "converged", "change_point", "final")
_DTYPES = {"seq_num": np.int64, "time": np.float64, "peak": np.str_, "converged": np.bool_,
           "change_point": np.bool_, "final": np.bool_}


@dataclass(frozen=True)
class RegularizerSpec:
    window: int = 16
    penalty: Penalty = "huber"
    strength: float = 2.0     # in units of the parameters' standard errors


def validate_regularizer(reg: RegularizerSpec) -> None:
    if reg.penalty not in ("none", "quadratic", "huber", "tv"):
        raise ValueError(f"penalty must be one of none, quadratic, huber, tv; got {reg.penalty!r}")
    if not isinstance(reg.window, int) or reg.window < (1 if reg.penalty == "none" else 2):
        raise ValueError(f"window must be an int >= 2, got {reg.window!r}")
    if not (reg.strength > 0 and math.isfinite(reg.strength)):
        raise ValueError(f"strength must be a positive number, got {reg.strength!r}")


# --------------------------------------------------------------------------------------------
# PeakRows helpers
def empty_rows() -> dict[str, np.ndarray]:
    return {c: np.zeros(0, dtype=_DTYPES.get(c, np.float64)) for c in PEAK_COLUMNS}


def concat_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    rows = [r for r in rows if len(r["seq_num"])]
    if not rows:
        return empty_rows()
    return {c: np.concatenate([r[c] for r in rows]) for c in PEAK_COLUMNS}


def model_spec_from_dict(d: Mapping[str, Any]) -> tuple[ModelSpec, RegularizerSpec]:
    """Build (ModelSpec, RegularizerSpec) from the ``fit:`` configuration mapping.

    Keys: ``peaks`` (list of PeakSpec fields), ``background`` ({kind, degree}),
    ``regularizer`` ({window, penalty, strength}), ``q_range`` ([min, max]). Unknown keys raise
    ValueError naming them.
    """
    if hasattr(d, "model_dump"):
        d = d.model_dump()
    if not isinstance(d, Mapping):
        raise ValueError(f"fit configuration must be a mapping, got {type(d).__name__}")

    def build(cls, m, what):
        if m is None:
            return cls()
        if hasattr(m, "model_dump"):
            m = m.model_dump()
        if not isinstance(m, Mapping):
            raise ValueError(f"{what} must be a mapping, got {m!r}")
        names = {f.name for f in fields(cls)}
        extra = set(m) - names
        if extra:
            raise ValueError(f"unknown {what} keys {sorted(extra)}; allowed {sorted(names)}")
        try:
            return cls(**dict(m))
        except TypeError as e:
            raise ValueError(f"bad {what} {dict(m)!r}: {e}") from None

    extra = set(d) - {"peaks", "background", "regularizer", "q_range"}
    if extra:
        raise ValueError(f"unknown fit keys {sorted(extra)}")
    peaks = d.get("peaks") or []
    if not isinstance(peaks, (list, tuple)) or not peaks:
        raise ValueError(f"fit.peaks must be a non-empty list, got {peaks!r}")
    specs = tuple(build(PeakSpec, p, "peak") for p in peaks)
    qr = d.get("q_range")
    spec = ModelSpec(specs, build(BackgroundSpec, d.get("background"), "background"),
                     None if qr is None else (float(qr[0]), float(qr[1])))
    validate_model_spec(spec)
    reg = build(RegularizerSpec, d.get("regularizer"), "regularizer")
    validate_regularizer(reg)
    return spec, reg


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
class JointResult:
    params: torch.Tensor      # (Bw, W, P)
    cov: torch.Tensor         # (Bw, W, P, P) sandwich covariance per frame
    chi2_red: torch.Tensor    # (Bw, W) data chi2 / dof per frame
    converged: torch.Tensor   # (Bw,) bool


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
    only spends iterations (1e-5 took 1.7x the evaluations; the whole-window tolerance, W times
    tighter, took 2x as many iterations on the Eiger 1M benchmark run, in the slow tail of the
    IRLS weights).
    """
    Bw, W, N = y.shape
    P = bound.n_params
    R = torch.tensor(bound.model.reg_index, device=y.device)
    K = R.numel()
    dt = y.dtype
    y_flat, sigma_flat = y.reshape(Bw * W, N), sigma.reshape(Bw * W, N)
    prob = _Problem(bound, bound.x, y_flat, sigma_flat, bound.lower, bound.upper, bound.free, "analytic")
    tr: BoundTransform = prob.tr
    span = torch.where(torch.isfinite(bound.upper - bound.lower), bound.upper - bound.lower,
                       torch.ones_like(bound.lower))
    p_start = torch.minimum(torch.maximum(p0.reshape(Bw * W, P), bound.lower + 1e-6 * span),
                            bound.upper - 1e-6 * span)
    t = tr.to_internal(p_start)
    m = links.to(dt)[..., None]                                  # (Bw, W-1, 1)
    s2 = strength * strength
    WP = W * P
    # flat positions of the penalty entries in H (Bw, WP*WP)
    pos = _penalty_positions(W, P, R)
    blk = torch.arange(W, device=y.device)
    subset: list = [None, None]                                  # (windows still iterating, their _Problem)

    def evaluate(t, sel=None, rows=None):
        """Penalised cost, H, gradient, data cost and external A of the windows `sel` (all if
        None; `rows`: their frames) at internal t of those frames."""
        if sel is None:
            pr, mm, sc = prob, m, scale
        else:
            if subset[0] is None or not torch.equal(subset[0], sel):   # the set only shrinks: few rebuilds
                subset[:] = sel, _Problem(bound, bound.x, y_flat[rows], sigma_flat[rows], bound.lower,
                                          bound.upper, bound.free, "analytic")
            pr, mm, sc = subset[1], m[sel], scale[sel]
        nb = mm.shape[0]
        cost_d, a, g, a_ext = pr.normal(t)
        p, d = tr.to_external(t)
        p, d = p.reshape(nb, W, P), (d * prob.ffree).reshape(nb, W, P)
        u = (p[:, 1:, R] - p[:, :-1, R]) / sc
        rho, wt, _ = _penalty_terms(u, penalty, huber_delta, tv_eps)
        cost = cost_d.reshape(nb, W).sum(1) + 2.0 * s2 * (mm * rho).sum((1, 2))
        H = torch.zeros(nb, W, P, W, P, dtype=dt, device=y.device)
        H[:, blk, :, blk, :] = a.reshape(nb, W, P, P).transpose(0, 1)
        H = H.reshape(nb, WP * WP)
        c = s2 * wt * mm / (sc * sc)                             # (nb, W-1, K)
        dR0, dR1 = d[:, :-1, R], d[:, 1:, R]
        vals = [c * dR0 * dR0, c * dR1 * dR1, -c * dR0 * dR1, -c * dR0 * dR1]
        for ps, v in zip(pos, vals):
            H.index_add_(1, ps.reshape(-1), v.reshape(nb, -1))
        G = s2 * wt * mm * u / sc                                # d(penalty/2)/d p_{t+1}
        gp = torch.zeros(nb, W, P, dtype=dt, device=y.device)
        gp[:, 1:, R] -= G
        gp[:, :-1, R] += G
        grad = g.reshape(nb, W, P) + gp * d
        return cost, H.reshape(nb, WP, WP), grad.reshape(nb, WP), cost_d, a_ext

    cost, H, g, cost_d, a_ext = evaluate(t)
    lam = torch.full((Bw,), lambda0, dtype=dt, device=y.device)
    nu = torch.full_like(lam, 2.0)
    dsc = torch.zeros(Bw, WP, dtype=dt, device=y.device)
    conv = torch.zeros(Bw, dtype=torch.bool, device=y.device)
    eye = torch.eye(WP, dtype=dt, device=y.device)
    dof = prob.dof.reshape(Bw, W)
    for _ in range(max_iter):
        diag = torch.diagonal(H, dim1=1, dim2=2)
        dsc = torch.maximum(dsc, diag)
        dd = torch.where(dsc > 0, dsc, torch.ones_like(dsc))
        chol, info = torch.linalg.cholesky_ex(H + lam[:, None, None] * torch.diag_embed(dd)
                                              + eye * (dsc == 0)[:, None, :])
        delta = torch.cholesky_solve(g[..., None], chol)[..., 0]
        pred = (delta * g).sum(-1) + lam * (dd * delta * delta).sum(-1)
        chi2r = (cost_d.reshape(Bw, W) / dof).mean(1).clamp_min(1e-300)
        tol = ftol * W * chi2r + 16.0 * prob.eps * cost
        conv = conv | ((info == 0) & (pred <= tol) & (lam <= 1.0))
        active = ~conv
        t_new = t + delta.reshape(Bw * W, P)
        if y.device.type == "cpu":
            # CPU: evaluate only the windows still iterating (converged ones would be computed
            # and thrown away); on CUDA all of them, so that no host sync is needed
            sel = torch.nonzero(active)[:, 0]
            if sel.numel() == 0:
                break
            rows = (sel[:, None] * W + blk).reshape(-1)
            c_s, H_s, g_s, cd_s, ae_s = evaluate(t_new[rows], sel, rows)
            c_new, H_new, g_new = cost.clone(), H.clone(), g.clone()
            cd_new, ae_new = cost_d.clone(), a_ext.clone()
            c_new[sel], H_new[sel], g_new[sel], cd_new[rows], ae_new[rows] = c_s, H_s, g_s, cd_s, ae_s
        else:
            c_new, H_new, g_new, cd_new, ae_new = evaluate(t_new)
        ok = (info == 0) & torch.isfinite(c_new)
        acc = active & ok & (c_new < cost)
        rho = (cost - c_new) / pred.clamp_min(1e-300)
        accf = acc.repeat_interleave(W)
        t = torch.where(accf[:, None], t_new, t)
        a_ext = torch.where(accf[:, None, None], ae_new, a_ext)
        cost_d = torch.where(accf, cd_new, cost_d)
        H = torch.where(acc[:, None, None], H_new, H)
        g = torch.where(acc[:, None], g_new, g)
        cost = torch.where(acc, c_new, cost)
        lam = torch.where(acc, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3),
                          torch.where(active, lam * nu, lam))
        nu = torch.where(acc, torch.full_like(nu, 2.0), torch.where(active, nu * 2, nu))
    p = tr.to_external(t)[0].reshape(Bw, W, P)
    chi2_red = cost_d.reshape(Bw, W) / dof
    cov = _sandwich(p, a_ext.reshape(Bw, W, P, P), chi2_red, scale, m, R, prob.ffree, s2,
                    penalty, huber_delta, tv_eps)
    return JointResult(p, cov, chi2_red, conv)


def _penalty_positions(W: int, P: int, R: torch.Tensor) -> list[torch.Tensor]:
    """Flat positions in a (W*P, W*P) matrix of the penalty's entries between frames t and t+1
    for the K regularised parameters R: [(t,t), (t+1,t+1), (t,t+1), (t+1,t)], each (W-1, K)."""
    WP = W * P
    tt = torch.arange(W - 1, device=R.device)[:, None] * P + R[None, :]
    t1 = tt + P
    return [tt * WP + tt, t1 * WP + t1, tt * WP + t1, t1 * WP + tt]


def quadratic_start(p_hat, info, scale, links, R, free, *, strength: float, penalty: str,
                    huber_delta: float = 1.0, tv_eps: float = 0.1, n_iter: int = 4):
    """Start values for ``joint_fit``: the same penalised problem with each frame's chi2
    replaced by its Gauss-Newton expansion at the per-frame optimum,
        chi2_t(theta) ~ chi2_t(p_hat_t) + (theta - p_hat_t)^T A_t (theta - p_hat_t),
    A_t = J^T W J there (external parameters), solved by ``n_iter`` IRLS steps
    [blockdiag(A_t) + s^2 D^T diag(m w / e^2) D] theta = blockdiag(A_t) p_hat (w = rho'(u)/u):
    a few dense solves, no model evaluations. The joint LM then starts next to its optimum.

    p_hat (Bw, W, P), info (Bw, W, P, P), scale (Bw, W-1, K), links (Bw, W-1) bool, free (P,).
    Returns (theta (Bw, W, P), ok (Bw,) bool: the solves were positive definite and finite)."""
    Bw, W, P = p_hat.shape
    WP, dt = W * P, p_hat.dtype
    fixed = 1.0 - free.to(dt)
    A = info + torch.diag_embed(fixed).expand_as(info)               # fixed parameters stay put
    blk = torch.arange(W, device=p_hat.device)
    H0 = torch.zeros(Bw, W, P, W, P, dtype=dt, device=p_hat.device)
    H0[:, blk, :, blk, :] = A.transpose(0, 1)
    H0 = H0.reshape(Bw, WP * WP)
    rhs = (A @ p_hat[..., None]).reshape(Bw, WP, 1)
    m = links.to(dt)[..., None]
    pos = _penalty_positions(W, P, R)
    s2 = strength * strength
    theta, ok = p_hat, torch.isfinite(H0).all(1) & torch.isfinite(rhs).all((1, 2))
    for _ in range(n_iter):
        u = (theta[:, 1:, R] - theta[:, :-1, R]) / scale
        _, wt, _ = _penalty_terms(u, penalty, huber_delta, tv_eps)
        c = s2 * wt * m / (scale * scale)
        H = H0.clone()
        for ps, v in zip(pos, [c, c, -c, -c]):
            H.index_add_(1, ps.reshape(-1), v.reshape(Bw, -1))
        chol, bad = torch.linalg.cholesky_ex(torch.nan_to_num(H).reshape(Bw, WP, WP))
        ok = ok & (bad == 0)
        theta = torch.cholesky_solve(torch.nan_to_num(rhs), chol).reshape(Bw, W, P)
    ok = ok & torch.isfinite(theta).all(-1).all(-1)
    return theta, ok


def _sandwich(p, a_ext, chi2_red, scale, m, R, ffree, s2, penalty, delta, eps):
    """C = H^-1 M H^-1 with the true penalty curvature, blocks per frame (Bw, W, P, P)."""
    Bw, W, P, _ = a_ext.shape
    WP = W * P
    blk = torch.arange(W, device=p.device)
    fmask = ffree[None, :, None] * ffree[None, None, :]
    A = a_ext * fmask
    H = torch.zeros(Bw, W, P, W, P, dtype=p.dtype, device=p.device)
    M = torch.zeros_like(H)
    H[:, blk, :, blk, :] = (A + torch.diag_embed(1.0 - ffree)).transpose(0, 1)
    M[:, blk, :, blk, :] = (A * chi2_red[..., None, None]).transpose(0, 1)
    u = (p[:, 1:, R] - p[:, :-1, R]) / scale
    _, _, curv = _penalty_terms(u, penalty, delta, eps)
    c = s2 * curv * m / (scale * scale)
    Hf = H.reshape(Bw, WP * WP)
    for ps, v in zip(_penalty_positions(W, P, R), [c, c, -c, -c]):
        Hf.index_add_(1, ps.reshape(-1), v.reshape(Bw, -1))
    Hi, _ = spd_inverse(Hf.reshape(Bw, WP, WP))      # NaN where H is singular: C is NaN there
    C = Hi @ M.reshape(Bw, WP, WP) @ Hi
    C = C.reshape(Bw, W, P, W, P)[:, blk, :, blk, :].transpose(0, 1)
    return C * fmask


# --------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    y: torch.Tensor          # (N,)
    sigma: torch.Tensor      # (N,)
    p_pf: torch.Tensor       # (P,) per-frame fit
    se_pf: torch.Tensor      # (P,)
    p_cur: torch.Tensor      # (P,) latest estimate (warm start of joint fits)
    seq: int
    time: float
    change_point: bool       # flagged: a sudden significant change at this frame
    converged: bool
    cut: bool = False        # the penalty link to the previous frame is cut (significant change)
    final: bool = False


class TrajectoryFitter:
    """Stateful fitter for one run (one per run): warm-started per-frame fits, provisional
    rows at once, final rows from the sliding-window joint fit (see module docstring).

    lag (frames of lookahead before a frame is final, default window // 2), stride (frames
    finalised per joint fit, default max(1, window // 4)); the rest of the window is context.
    """

    def __init__(self, model: ModelSpec, regularizer: RegularizerSpec = RegularizerSpec(), *,
                 device="cpu", dtype=torch.float64, lag: int | None = None, stride: int | None = None,
                 change_threshold: float = 5.0, chi2_jump: float = 1.5, huber_delta: float = 1.0,
                 tv_eps: float = 0.1, fix_eta: bool = False, max_iter: int = 50, sudden_ratio: float = 3.0):
        validate_model_spec(model)
        validate_regularizer(regularizer)
        W = regularizer.window
        self.lag = W // 2 if lag is None else lag
        self.stride = max(1, W // 4) if stride is None else stride
        if regularizer.penalty != "none" and not (1 <= self.stride and 0 <= self.lag and self.lag + self.stride <= W):
            raise ValueError(f"need 1 <= stride and lag + stride <= window; got lag={self.lag}, "
                             f"stride={self.stride}, window={W}")
        for nm, v in (("change_threshold", change_threshold), ("chi2_jump", chi2_jump),
                      ("huber_delta", huber_delta), ("tv_eps", tv_eps)):
            if not v > 0:
                raise ValueError(f"{nm} must be > 0, got {v!r}")
        self.context = W - self.lag - self.stride
        self.spec, self.reg = model, regularizer
        self.model = PeakModel(model, fix_eta=fix_eta)
        self.device, self.dtype = torch.device(device), dtype
        self.change_threshold, self.chi2_jump = change_threshold, chi2_jump
        self.sudden_ratio = sudden_ratio
        self.huber_delta, self.tv_eps, self.max_iter = huber_delta, tv_eps, max_iter
        self.reseeds = 0
        self._radial = None
        self._bound: BoundModel | None = None
        self._cols = None
        self._last_good: torch.Tensor | None = None
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None      # (p, se) of the last frame
        self._prev_delta: torch.Tensor | None = None                      # its change from the frame before
        self._chi2_hist: collections.deque = collections.deque(maxlen=32)
        self._buf: list[_Frame] = []
        self._reg_idx = torch.tensor(self.model.reg_index, device=self.device)

    # ---- public API
    def update(self, radial, intensity, sigma, seq_num, time) -> dict[str, np.ndarray]:
        """radial (N,) 1/nm; intensity, sigma (B, N); seq_num (B,) int; time (B,) s.
        Returns PeakRows: provisional rows for the B frames plus final rows that left the window."""
        y, sg = self._prepare(radial, intensity, sigma)
        B = y.shape[0]
        seq = np.asarray(seq_num, dtype=np.int64).reshape(-1)
        tm = np.asarray(time, dtype=np.float64).reshape(-1) if time is not None else np.full(B, np.nan)
        if len(seq) != B or len(tm) != B:
            raise ValueError(f"seq_num and time must have length B={B}, got {len(seq)} and {len(tm)}")
        res = self._fit_frames(y, sg)
        cov = res.covariance
        cut, cp = self._change_points(res.params, res.stderr)
        out = [self._rows(res.params, cov, res.chi2_red, res.converged, cp, seq, tm, final=False)]
        if self.reg.penalty == "none":
            out.append(self._rows(res.params, cov, res.chi2_red, res.converged, cp, seq, tm, final=True))
            return concat_rows(out)
        for b in range(B):
            self._buf.append(_Frame(y[b], sg[b], res.params[b], res.stderr[b], res.params[b].clone(),
                                    int(seq[b]), float(tm[b]), bool(cp[b]), bool(res.converged[b]),
                                    cut=bool(cut[b])))
        out.append(self._finalize(flush=False))
        return concat_rows(out)

    def finish(self) -> dict[str, np.ndarray]:
        """Final rows for the frames still in the window; the fitter can then be dropped."""
        if self.reg.penalty == "none":
            return empty_rows()
        rows = self._finalize(flush=True)
        self._buf = []
        return rows

    # ---- per-frame fits
    def _prepare(self, radial, intensity, sigma):
        kw = dict(dtype=self.dtype, device=self.device)
        x = torch.as_tensor(np.asarray(radial, dtype=np.float64) if not torch.is_tensor(radial) else radial).to(**kw)
        y = torch.as_tensor(intensity if torch.is_tensor(intensity) else np.asarray(intensity)).to(**kw)
        y = y[None] if y.dim() == 1 else y
        sg = (torch.as_tensor(sigma if torch.is_tensor(sigma) else np.asarray(sigma)).to(**kw)
              if sigma is not None else torch.sqrt(y.clamp_min(1.0)))
        sg = sg[None] if sg.dim() == 1 else sg
        if y.shape != sg.shape or y.shape[-1] != x.shape[-1]:
            raise ValueError(f"intensity {tuple(y.shape)} and sigma {tuple(sg.shape)} must be (B, N) "
                             f"with N = len(radial) = {x.shape[-1]}")
        xr = x.detach().cpu().numpy()
        if self._radial is None or self._radial.shape != xr.shape or not np.array_equal(self._radial, xr):
            if self._buf:
                raise ValueError("the radial grid changed within a run; start a new TrajectoryFitter")
            self._radial = xr
            keep = np.ones(xr.shape, bool) if self.spec.q_range is None else \
                (xr >= self.spec.q_range[0]) & (xr <= self.spec.q_range[1])
            if keep.sum() <= self.model.n_params:
                raise ValueError(f"q_range {self.spec.q_range} leaves {int(keep.sum())} points for "
                                 f"{self.model.n_params} parameters")
            self._cols = torch.as_tensor(np.nonzero(keep)[0], device=self.device)
            self._bound = self.model.bind(x[self._cols])
        return y[:, self._cols], sg[:, self._cols]

    def _fit_frames(self, y, sg):
        bm = self._bound
        p0 = bm.guess(y) if self._last_good is None else self._last_good.expand(y.shape[0], -1)
        res = fit_batch(bm, bm.x, y, sg, p0, max_iter=self.max_iter)
        bad = self._diverged(res)
        if bool(bad.any()):
            idx = torch.nonzero(bad)[:, 0]
            self.reseeds += int(idx.numel())
            best = _take(res, idx)
            for search in (False, True):
                alt = fit_batch(bm, bm.x, y[idx], sg[idx], bm.guess(y[idx], search=search),
                                max_iter=self.max_iter)
                better = (alt.chi2_red < best.chi2_red) | ~torch.isfinite(best.chi2_red)
                better = better & torch.isfinite(alt.chi2_red)
                best = _merge(best, alt, better)
            res = _scatter(res, idx, best)
        good = res.converged & torch.isfinite(res.chi2_red) & ~self._diverged(res)
        if bool(good.any()):
            last = int(torch.nonzero(good)[-1, 0])
            self._last_good = res.params[last].clone()
        # all finite chi2 enter the history, so a lasting change of fit quality (a new phase the
        # model fits less well) stops counting as divergence after a few frames
        fin = torch.isfinite(res.chi2_red) & res.converged
        self._chi2_hist.extend(res.chi2_red[fin].tolist())
        return res

    def _diverged(self, res) -> torch.Tensor:
        bad = ~torch.isfinite(res.params).all(1) | ~torch.isfinite(res.chi2_red) | ~res.converged
        lo, hi = self._bound.lower, self._bound.upper
        span = (hi - lo)
        names = self.model.names
        chk = [i for i in self.model.reg_index if not names[i].endswith("fwhm_l")]
        for i in chk:
            if math.isfinite(float(span[i])):
                near = 1e-4 * span[i]
                bad = bad | (res.params[:, i] - lo[i] < near) | (hi[i] - res.params[:, i] < near)
        if len(self._chi2_hist) >= 3:
            med = float(np.median(self._chi2_hist))
            bad = bad | (res.chi2_red > self.chi2_jump * med)
        return bad

    def _change_points(self, p, se) -> tuple[np.ndarray, np.ndarray]:
        """(cut, flag) per frame. cut: the link to the previous frame is significant (z test);
        flag: a change point, i.e. significant AND sudden: larger than `sudden_ratio` x the
        previous link's change of the same parameter. A fast but smooth drift cuts links (no
        smoothing where the data say the parameter moves) without flagging every frame."""
        R = self._reg_idx
        pr, sr = p[:, R], se[:, R]
        if self._prev is not None:
            pr = torch.cat([self._prev[0][None, R], pr])
            sr = torch.cat([self._prev[1][None, R], sr])
            first = False
        else:
            first = True
        d = pr[1:] - pr[:-1]
        z = d.abs() / torch.sqrt(sr[1:] ** 2 + sr[:-1] ** 2)
        sig = z > self.change_threshold
        prev_d = torch.cat([self._prev_delta[None] if self._prev_delta is not None
                            else torch.zeros_like(d[:1]), d[:-1]])
        sudden = sig & (d.abs() > self.sudden_ratio * prev_d.abs())
        cut, flag = sig.any(1), sudden.any(1)
        if first:
            zero = torch.zeros(1, dtype=torch.bool, device=p.device)
            cut, flag = torch.cat([zero, cut]), torch.cat([zero, flag])
        if len(d):
            self._prev_delta = d[-1].clone()
        self._prev = (p[-1].clone(), se[-1].clone())
        return cut.cpu().numpy(), flag.cpu().numpy()

    # ---- joint window fits
    def _windows(self, flush: bool):
        buf, W = self._buf, self.reg.window
        f = next((i for i, fr in enumerate(buf) if not fr.final), len(buf))
        wins = []
        while f < len(buf):
            start = max(0, f - self.context)
            end = start + W
            if end > len(buf):
                break
            hi = end - self.lag
            if hi <= f:
                break
            wins.append((start, end, f, hi))
            f = hi
        tail = None
        if flush and f < len(buf):
            start = max(0, len(buf) - W)
            tail = (min(start, f), len(buf), f, len(buf))
        return wins, tail

    def _finalize(self, flush: bool) -> dict[str, np.ndarray]:
        wins, tail = self._windows(flush)
        out = []
        if wins:
            out.append(self._joint(wins))
        if tail is not None:
            out.append(self._joint([tail]))
        # keep `context` final frames before the first pending one
        f = next((i for i, fr in enumerate(self._buf) if not fr.final), len(self._buf))
        self._buf = self._buf[max(0, f - self.context):]
        return concat_rows(out)

    def _joint(self, wins) -> dict[str, np.ndarray]:
        buf, R = self._buf, self._reg_idx
        frames = [[buf[i] for i in range(s, e)] for s, e, _, _ in wins]
        y = torch.stack([torch.stack([fr.y for fr in w]) for w in frames])
        sg = torch.stack([torch.stack([fr.sigma for fr in w]) for w in frames])
        p0 = torch.stack([torch.stack([fr.p_cur for fr in w]) for w in frames])
        se = torch.stack([torch.stack([fr.se_pf for fr in w]) for w in frames])[..., R]
        fill = self._last_good if self._last_good is not None else self._bound.guess(y[0, :1])[0]
        p0 = torch.where(torch.isfinite(p0), p0, fill)
        se = torch.where(torch.isfinite(se) & (se > 0), se, torch.full_like(se, math.nan))
        med = torch.nanmedian(se.reshape(-1, se.shape[-1]), dim=0).values
        med = torch.where(torch.isfinite(med), med, torch.ones_like(med))
        se = torch.where(torch.isfinite(se), se, med)
        scale = torch.sqrt(0.5 * (se[:, 1:] ** 2 + se[:, :-1] ** 2))
        links = torch.tensor([[not fr.cut for fr in w[1:]] for w in frames], device=self.device)
        jr = joint_fit(self._bound, y, sg, p0, scale, links, strength=self.reg.strength,
                       penalty=self.reg.penalty, huber_delta=self.huber_delta, tv_eps=self.tv_eps)
        rows = []
        for k, (s, e, lo, hi) in enumerate(wins):
            for j in range(e - s):
                fr = buf[s + j]
                if not fr.final:
                    fr.p_cur = jr.params[k, j].clone()
            sel = slice(lo - s, hi - s)
            fin = [buf[i] for i in range(lo, hi)]
            for fr in fin:
                fr.final = True
            conv = jr.converged[k].expand(hi - lo) & torch.tensor([fr.converged for fr in fin], device=self.device)
            rows.append(self._rows(jr.params[k, sel], jr.cov[k, sel], jr.chi2_red[k, sel], conv,
                                   np.array([fr.change_point for fr in fin]),
                                   np.array([fr.seq for fr in fin]), np.array([fr.time for fr in fin]),
                                   final=True))
        return concat_rows(rows)

    # ---- rows
    def _rows(self, p, cov, chi2, conv, cp, seq, tm, *, final: bool) -> dict[str, np.ndarray]:
        B = p.shape[0]
        summ = self._bound.summarize(p, cov)
        npk = len(summ)
        cols = {"center": "center", "center_err": "center_err", "fwhm": "fwhm", "fwhm_err": "fwhm_err",
                "amplitude": "area", "amplitude_err": "area_err", "eta": "eta"}
        rows = {c: torch.stack([s[k] for s in summ], 1).reshape(-1).detach().cpu().double().numpy()
                for c, k in cols.items()}
        rows["seq_num"] = np.repeat(np.asarray(seq, np.int64), npk)
        rows["time"] = np.repeat(np.asarray(tm, np.float64), npk)
        rows["peak"] = np.tile(np.array([pk.name for pk in self.spec.peaks], dtype=np.str_), B)
        rows["chi2"] = np.repeat(chi2.detach().cpu().double().numpy(), npk)
        rows["converged"] = np.repeat(conv.detach().cpu().numpy().astype(bool), npk)
        rows["change_point"] = np.repeat(np.asarray(cp, bool), npk)
        rows["final"] = np.full(B * npk, final)
        return {c: rows[c] for c in PEAK_COLUMNS}


def _fields(res):
    return [getattr(res, f.name) for f in fields(FitResult)]


def _take(res, idx):
    return FitResult(*(None if v is None else v[idx] for v in _fields(res)))


def _merge(a, b, use_b):
    out = []
    for va, vb in zip(_fields(a), _fields(b)):
        m = use_b.reshape(-1, *([1] * (va.dim() - 1)))
        out.append(torch.where(m, vb, va))
    return FitResult(*out)


def _scatter(res, idx, sub):
    out = []
    for v, s in zip(_fields(res), _fields(sub)):
        v = v.clone()
        v[idx] = s
        out.append(v)
    return FitResult(*out)
