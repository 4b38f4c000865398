"""Sequential fitting of frame series: warm start, divergence re-seeding, change points and the
fixed-lag schedule whose penalised joint fits (``workers.window_fit.joint_fit``: the objective,
its solver and the sandwich covariance) give the final rows.

Per-frame fits (``workers.fit.fit_batch``) start from the previous good result (warm start,
as sequential refinement in GSAS-II/TOPAS). A frame is re-seeded (``reseeds`` counts them) when
its fit diverged: non-finite result, not converged, a centre or width at a bound, or a reduced
chi2 above ``chi2_jump`` x the median of recent frames (of the batch itself while a run has fewer than
three). Re-seeding tries the configured guess and a peak search (argmax within
[center_min, center_max] after removing an edge-line background), then, for a frame still
diverged, the fit of the nearest good frame of its batch; it keeps the best chi2.

Change points: link (t, t+1) is cut when, for any centre or width,
|theta_{t+1} - theta_t| > ``change_threshold`` x sqrt(se_t^2 + se_{t+1}^2) in the per-frame
fits (a two-sided z test, threshold 5: 6e-7 false alarms per link and parameter for Gaussian
errors). Cut links keep a step sharp: the two sides are smoothed separately. Frame t+1 is
flagged as a change point when the change is also sudden: more than ``sudden_ratio`` x the
change of the same parameter over the link before (a step, or the onset of a transition),
so a fast smooth drift is left unsmoothed but not flagged at every frame.

Correlated bins: with pixel splitting neighbouring bins share pixels, and a fit that weighs them
as independent understates the variance of a peak's centre, width and area, smooth over many
bins, by F (``workers.integrate.bin_correlation``: the sandwich (J^T W J)^-1 J^T W Sigma W J
(J^T W J)^-1, Sigma the bins' covariance, is (J^T W J)^-1 F for F constant over the peak). Given
F per bin (``update(..., inflation=F)``), every covariance the fitter reports or tests is
D C D, D = diag(sqrt F) at each peak's centre: the provisional and final rows' errors and the
per-frame errors of the change-point test. The objectives keep the weights 1/sigma^2 and the
penalty its per-frame standard-error scale: for F constant both would scale by 1/F, which leaves
every optimum where it is, so only the covariances change (and with them the z test).

Final rows: a fixed-lag smoother. Window W = context + stride + lag. Once ``stride`` frames (or
more) have ``lag`` newer frames, they become final (returned again with final=True) from one
penalised joint fit (``workers.window_fit.joint_fit``) over the span from ``context`` already-final
frames before them to the newest frame: the span's normal equations are block tridiagonal, so
each LM step is a forward and a backward block sweep over the span. Every final frame has thus
at least ``lag`` frames of lookahead, more when a batch brings many frames at once (the span of a
64-frame batch: up to 64 + lag), and its covariance is the sandwich of the window of W frames
around it (context before, lag after its stride group) at the span's solution, so errors do not
depend on the batch size. Final values move with the lookahead by a fraction of a standard
error (benchmark series: 0.36 se at most, median 0.03, between 1-frame batches, where every span
is one window of W frames, and 64-frame batches; benchmarks/RESULTS.md). ``finish`` flushes the
rest with the lookahead available. Each frame carries its latest estimate and its chi2's
expansion (per-frame fit, then the last span), so a span starts where the frames are and
evaluates the model only for frames that move far.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from workers.columns import PEAK_COLUMNS, PEAK_DTYPES, empty_columns
from workers.fit import FitResult, fit_batch
from workers.profiles import BoundModel, PeakModel
from workers.specs import ModelSpec, RegularizerSpec, validate_model_spec, validate_regularizer
from workers.window_fit import Expansion, joint_fit



# --------------------------------------------------------------------------------------------
# PeakRows helpers
def empty_rows() -> dict[str, np.ndarray]:
    return empty_columns(PEAK_DTYPES)


def concat_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    rows = [r for r in rows if len(r["seq_num"])]
    if not rows:
        return empty_rows()
    return {c: np.concatenate([r[c] for r in rows]) for c in PEAK_COLUMNS}


# --------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    y: torch.Tensor          # (N,)
    sigma: torch.Tensor      # (N,)
    se_pf: torch.Tensor      # (P,) per-frame fit's standard errors
    p_cur: torch.Tensor      # (P,) latest estimate (warm start of joint fits)
    ex: Expansion            # its chi2 expanded near p_cur (per-frame fit, then the last window)
    seq: int
    time: float
    change_point: bool       # flagged: a sudden significant change at this frame
    cut: bool = False        # the penalty link to the previous frame is cut (significant change)
    final: bool = False


class TrajectoryFitter:
    """Stateful fitter for one run (one per run): warm-started per-frame fits, provisional
    rows at once, final rows from the sliding-window joint fit (see module docstring).

    lag (frames of lookahead before a frame is final, default window // 2), stride (frames
    finalised per joint fit, default max(1, window // 4)); the rest of the window is context.
    ftol: the per-frame LM's tolerance (workers.fit.fit_batch). 1e-5: with 1e-4 a fit far from
    its peak (a fitter that starts cold mid-run, its guess off the drifted peak) stops on the
    plateau as converged and is never re-seeded (benchmarks/RESULTS.md, 2026-12-08).
    """

    def __init__(self, model: ModelSpec, regularizer: RegularizerSpec = RegularizerSpec(), *,
                 device="cpu", dtype=torch.float64, lag: int | None = None, stride: int | None = None,
                 change_threshold: float = 5.0, chi2_jump: float = 1.5, huber_delta: float = 1.0,
                 tv_eps: float = 0.1, fix_eta: bool = False, max_iter: int = 50, sudden_ratio: float = 3.0,
                 ftol: float = 1e-5):
        validate_model_spec(model)
        validate_regularizer(regularizer)
        W = regularizer.window
        self.lag = W // 2 if lag is None else lag
        self.stride = max(1, W // 4) if stride is None else stride
        if regularizer.penalty != "none" and not (1 <= self.stride and 0 <= self.lag and self.lag + self.stride <= W):
            raise ValueError(f"need 1 <= stride and lag + stride <= window; got lag={self.lag}, "
                             f"stride={self.stride}, window={W}")
        for nm, v in (("change_threshold", change_threshold), ("chi2_jump", chi2_jump),
                      ("huber_delta", huber_delta), ("tv_eps", tv_eps), ("ftol", ftol)):
            if not v > 0:
                raise ValueError(f"{nm} must be > 0, got {v!r}")
        self.context = W - self.lag - self.stride
        self.spec, self.reg = model, regularizer
        self.model = PeakModel(model, fix_eta=fix_eta)
        self.device, self.dtype = torch.device(device), dtype
        self.change_threshold, self.chi2_jump = change_threshold, chi2_jump
        self.sudden_ratio = sudden_ratio
        self.huber_delta, self.tv_eps, self.max_iter, self.ftol = huber_delta, tv_eps, max_iter, ftol
        self.reseeds = 0
        self.window_evaluations = 0       # model evaluations of the joint fits, summed over frames
        self._radial = None
        self._bound: BoundModel | None = None
        self._cols = None
        self._inflation: tuple[torch.Tensor, torch.Tensor, float] | None = None   # (q, F, background's F)
        self._last_good: torch.Tensor | None = None
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None      # (p, se) of the last frame
        self._prev_delta: torch.Tensor | None = None                      # its change from the frame before
        self._chi2_hist: collections.deque = collections.deque(maxlen=32)
        self._buf: list[_Frame] = []
        self._reg_idx = torch.tensor(self.model.reg_index, device=self.device)

    # ---- public API
    def update(self, radial, intensity, sigma, seq_num, time, inflation=None) -> dict[str, np.ndarray]:
        """radial (N,) 1/nm; intensity, sigma (B, N); seq_num (B,) int; time (B,) s; inflation
        (N,) the bins' variance inflation F from shared pixels (``workers.integrate.
        bin_correlation``; NaN: empty bin), None: independent bins (module docstring); the first
        batch's F holds for the run, as its grid does.
        Returns PeakRows: provisional rows for the B frames plus final rows that left the window."""
        y, sg = self._prepare(radial, intensity, sigma)
        if inflation is not None and self._inflation is None:      # one grid per run: one F
            self._set_inflation(inflation)
        B = y.shape[0]
        seq = np.asarray(seq_num, dtype=np.int64).reshape(-1)
        tm = np.asarray(time, dtype=np.float64).reshape(-1) if time is not None else np.full(B, np.nan)
        if len(seq) != B or len(tm) != B:
            raise ValueError(f"seq_num and time must have length B={B}, got {len(seq)} and {len(tm)}")
        res = self._fit_frames(y, sg)
        cov = self._inflate(res.params, res.covariance)
        cut, cp = self._change_points(res.params, torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt())
        out = [self._rows(res.params, cov, res.chi2_red, res.converged, res.identified, cp, seq, tm, final=False)]
        if self.reg.penalty == "none":
            out.append(self._rows(res.params, cov, res.chi2_red, res.converged, res.identified, cp, seq, tm,
                                  final=True))
            return concat_rows(out)
        for b in range(B):
            ex = Expansion(res.params[b], res.chi2_red[b], res.normal[b], res.gradient[b])
            self._buf.append(_Frame(y[b], sg[b], res.stderr[b], res.params[b].clone(), ex, int(seq[b]),
                                    float(tm[b]), bool(cp[b]), cut=bool(cut[b])))
        out.append(self._finalize(flush=False))
        return concat_rows(out)

    def finish(self) -> dict[str, np.ndarray]:
        """Final rows for the frames still in the window; the fitter can then be dropped."""
        if self.reg.penalty == "none":
            return empty_rows()
        rows = self._finalize(flush=True)
        self._buf = []
        return rows

    # ---- correlated bins
    def _set_inflation(self, inflation) -> None:
        f = np.asarray(inflation, np.float64).reshape(-1)
        if f.shape != self._radial.shape:
            raise ValueError(f"inflation must have one value per bin ({self._radial.shape[0]}), got {f.shape[0]}")
        fitted, ok = f[self._cols.cpu().numpy()], np.isfinite(f)
        if not np.isfinite(fitted).any():
            self._inflation = None
            return
        kw = dict(dtype=self.dtype, device=self.device)
        self._inflation = (torch.as_tensor(self._radial[ok], **kw), torch.as_tensor(np.maximum(f[ok], 1.0), **kw),
                           max(float(np.nanmedian(fitted)), 1.0))

    def _inflate(self, p: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """The covariance (B, P, P) of parameters p (B, P) with the bins' correlation counted:
        D C D, D = diag(sqrt F) with F interpolated at each peak's centre for that peak's
        parameters, and F's median over the fitted range for the background's (module
        docstring)."""
        if self._inflation is None:
            return cov
        q, f, f_bg = self._inflation
        k = torch.full_like(p, math.sqrt(f_bg))
        for sl in self.model.peak_slices:
            c = p[:, sl.start].clamp(q[0], q[-1])
            i = torch.searchsorted(q, c.contiguous()).clamp(1, len(q) - 1)
            w = ((c - q[i - 1]) / (q[i] - q[i - 1])).nan_to_num(0.0)
            k[:, sl] = torch.sqrt(f[i - 1] + w * (f[i] - f[i - 1]))[:, None]
        return cov * k[:, :, None] * k[:, None, :]

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
        res = fit_batch(bm, bm.x, y, sg, p0, max_iter=self.max_iter, ftol=self.ftol)
        bad = self._diverged(res)
        if bool(bad.any()):
            idx = torch.nonzero(bad)[:, 0]
            self.reseeds += int(idx.numel())
            best = _take(res, idx)
            for search in (False, True):
                alt = fit_batch(bm, bm.x, y[idx], sg[idx], bm.guess(y[idx], search=search),
                                max_iter=self.max_iter, ftol=self.ftol)
                better = (alt.chi2_red < best.chi2_red) | ~torch.isfinite(best.chi2_red)
                better = better & torch.isfinite(alt.chi2_red)
                best = _merge(best, alt, better)
            res = _scatter(res, idx, best)
            res = self._from_neighbours(y, sg, res)
        good = res.converged & torch.isfinite(res.chi2_red) & ~self._diverged(res)
        if bool(good.any()):
            last = int(torch.nonzero(good)[-1, 0])
            self._last_good = res.params[last].clone()
        # all finite chi2 enter the history, so a lasting change of fit quality (a new phase the
        # model fits less well) stops counting as divergence after a few frames
        fin = torch.isfinite(res.chi2_red) & res.converged
        self._chi2_hist.extend(res.chi2_red[fin].tolist())
        return res

    def _from_neighbours(self, y, sg, res):
        """Frames of the batch still diverged after re-seeding start again from the fit of the
        nearest good frame of the same batch (frames change little from one to the next: the
        warm start, within a batch fitted cold, such as a run's first batch or one replayed on
        another worker); the better chi2 is kept."""
        still = self._diverged(res)
        good = torch.nonzero(~still)[:, 0]
        if not bool(still.any()) or good.numel() == 0:
            return res
        idx = torch.nonzero(still)[:, 0]
        near = good[(idx[:, None] - good[None, :]).abs().argmin(1)]
        cur = _take(res, idx)
        alt = fit_batch(self._bound, self._bound.x, y[idx], sg[idx], res.params[near].clone(), max_iter=self.max_iter,
                        ftol=self.ftol)
        better = ((alt.chi2_red < cur.chi2_red) | ~torch.isfinite(cur.chi2_red)) & torch.isfinite(alt.chi2_red)
        return _scatter(res, idx, _merge(cur, alt, better))

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
        history = list(self._chi2_hist)
        if len(history) < 3:
            # the run's first frames (or a run replayed on another worker, cold, in one batch):
            # no history yet, so the batch's own fits stand in for it
            history += res.chi2_red[torch.isfinite(res.chi2_red) & res.converged].tolist()
        if len(history) >= 3:
            med = float(np.median(history))
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
        out = [self._joint(wins, tail)] if wins or tail is not None else []
        # keep `context` final frames before the first pending one
        f = next((i for i, fr in enumerate(self._buf) if not fr.final), len(self._buf))
        self._buf = self._buf[max(0, f - self.context):]
        return concat_rows(out)

    def _joint(self, wins, tail) -> dict[str, np.ndarray]:
        """One penalised fit over the span from the first window to the newest frame; final rows
        for the frames the windows (and the tail) finalise, with each window's sandwich
        covariance at the span's solution (module docstring)."""
        buf = self._buf
        groups = wins + ([tail] if tail is not None else [])      # equal lengths (``_windows``)
        s0 = groups[0][0]
        r0, r1 = min(lo - s for s, _, lo, _ in groups), max(hi - s for s, _, _, hi in groups)
        windows = torch.tensor([list(range(s - s0, e - s0)) for s, e, _, _ in groups], device=self.device)
        jr = self._fit(s0, len(buf), report=slice(r0, r1), windows=windows)
        self._store(s0, jr)
        # the frames each window finalises, (window, frame in window) pairs, in buffer order
        k = torch.tensor([i for i, (s, e, lo, hi) in enumerate(groups) for _ in range(lo, hi)], device=self.device)
        j = torch.tensor([f - s for s, e, lo, hi in groups for f in range(lo, hi)], device=self.device)
        fin = [buf[f] for _, _, lo, hi in groups for f in range(lo, hi)]
        for fr in fin:
            fr.final = True
        at = windows[k, j]
        p = jr.params[0, at]
        return self._rows(p, self._inflate(p, jr.cov[k, j - r0]), jr.chi2_red[0, at], jr.converged[0, at],
                          jr.identified[k, j], np.array([fr.change_point for fr in fin]),
                          np.array([fr.seq for fr in fin]), np.array([fr.time for fr in fin]), final=True)

    def _stack(self, start: int, end: int):
        """Frames start..end of the buffer as one window: y, sigma, estimates p (1, W, ...),
        scale (1, W-1, K) of the differences, links (1, W-1) and the expansions."""
        R = self._reg_idx
        frames = self._buf[start:end]

        def stacked(get):
            return torch.stack([get(fr) for fr in frames])[None]
        y, sg, p0 = stacked(lambda fr: fr.y), stacked(lambda fr: fr.sigma), stacked(lambda fr: fr.p_cur)
        se = stacked(lambda fr: fr.se_pf)[..., R]
        fill = self._last_good if self._last_good is not None else self._bound.guess(y[0, :1])[0]
        p0 = torch.where(torch.isfinite(p0), p0, fill)
        se = torch.where(torch.isfinite(se) & (se > 0), se, torch.full_like(se, math.nan))
        med = torch.nanmedian(se.reshape(-1, se.shape[-1]), dim=0).values
        med = torch.where(torch.isfinite(med), med, torch.ones_like(med))
        se = torch.where(torch.isfinite(se), se, med)
        scale = torch.sqrt(0.5 * (se[:, 1:] ** 2 + se[:, :-1] ** 2))
        links = torch.tensor([[not fr.cut for fr in frames[1:]]], device=self.device)
        ex = Expansion(*(stacked(lambda fr: getattr(fr.ex, f.name)) for f in fields(Expansion)))
        return y, sg, p0, scale, links, ex

    def _fit(self, start: int, end: int, **kw):
        """joint_fit of frames start..end of the buffer."""
        y, sg, p0, scale, links, ex = self._stack(start, end)
        jr = joint_fit(self._bound, y, sg, p0, scale, links, strength=self.reg.strength, expansion=ex,
                       penalty=self.reg.penalty, huber_delta=self.huber_delta, tv_eps=self.tv_eps, **kw)
        self.window_evaluations += int(jr.n_eval.sum())
        return jr

    def _store(self, start: int, jr) -> None:
        """Each fitted frame's latest estimate and expansion: where the next joint fit starts."""
        p = jr.params[0].unbind(0)
        values = [getattr(jr.expansion, f.name)[0].unbind(0) for f in fields(Expansion)]
        for i, fr in enumerate(self._buf[start:start + len(p)]):
            fr.p_cur = p[i]
            fr.ex = Expansion(*(v[i] for v in values))

    # ---- rows
    def _rows(self, p, cov, chi2, conv, ident, cp, seq, tm, *, final: bool) -> dict[str, np.ndarray]:
        """PeakRows of B frames: p (B, P), cov (B, P, P), chi2 (B,) reduced, conv (B,) bool: the
        solver's criteria held for the frame, ident (B, P) bool (workers.fit.covariance)."""
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
        lost = ~ident
        bg = lost[:, self.model.bg_slice].sum(1)
        unid = torch.stack([lost[:, sl].sum(1) + bg for sl in self.model.peak_slices], 1).reshape(-1)
        rows["unidentified"] = unid.cpu().numpy().astype(np.int64)
        rows["converged"] = np.repeat(conv.detach().cpu().numpy().astype(bool), npk) & (rows["unidentified"] == 0)
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
