"""Encoder warm start + batched bounded LM refinement in the same forward model, with errors.

Per batch of profiles (q (N,), intensity and sigma (B, N)):
  1. the encoder maps ``profile_features`` to the shape parameters (radius, pd, volfraction),
     always inside their bounds;
  2. the linear parameters (i0, background) follow by weighted linear least squares
     (``linear_amplitudes``; variable projection), clamped to >= 0;
  3. optionally, ``workers.fit.fit_batch`` (bounded Levenberg-Marquardt, lmfit's MINUIT bound
     transform, Jacobian by torch.func.jacfwd) refines all parameters of the forward model
     against the data with weights 1/sigma^2; standard errors from the covariance scaled by
     chi2_red (lmfit ``scale_covar=True``).

``SaxsInverter`` (profiles) and ``GisaxsInverter`` (maps on the checkpoint's detector grid)
bundle the three steps for a checkpoint; ``inversion_rows`` turns a result into one row per
frame for publishing (like the peaks table). Maps use the same steps with (shape..., i0,
background) = SPHERE_PARACRYSTAL_PARAMS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from workers.fit import fit_batch
from workers.inversion.encoder import ParamBounds, encoder_from_state, map_features, profile_features
from workers.inversion.gisaxs import SPHERE_PARACRYSTAL_PARAMS, DetectorGrid, spheres_paracrystal
from workers.inversion.saxs import SPHERE_HS_PARAMS, sphere_hs
from workers.profiles import BoundModel

FORWARD_MODELS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "sphere_hs": (sphere_hs, SPHERE_HS_PARAMS),
    "spheres_paracrystal": (spheres_paracrystal, SPHERE_PARACRYSTAL_PARAMS),
}


@dataclass
class InversionResult:
    """B frames, P parameters (``names``)."""
    names: tuple[str, ...]
    params: torch.Tensor          # (B, P) refined (or encoder) values, inside the bounds
    stderr: torch.Tensor          # (B, P) standard errors (NaN without refinement)
    encoder: torch.Tensor         # (B, P) encoder + linear-amplitude values (the LM start)
    chi2_red: torch.Tensor        # (B,)
    converged: torch.Tensor       # (B,) bool (True for encoder-only results)
    model: str = ""               # forward-model name (FORWARD_MODELS key)


def linear_amplitudes(shape: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares for y ~ a * shape + b with a > 0, b >= 0; all (B, N) -> a, b (B,).

    Points with non-finite y or sigma <= 0 get weight 0. Differentiable (closed-form 2x2 solve).
    """
    ok = torch.isfinite(y) & torch.isfinite(sigma) & (sigma > 0)
    w = torch.where(ok, 1.0 / torch.where(ok, sigma, torch.ones_like(sigma)) ** 2, torch.zeros_like(y))
    yy = torch.where(ok, y, torch.zeros_like(y))
    sff, sf, s1 = (w * shape * shape).sum(-1), (w * shape).sum(-1), w.sum(-1)
    sfy, sy = (w * shape * yy).sum(-1), (w * yy).sum(-1)
    det = sff * s1 - sf * sf
    tiny = torch.finfo(y.dtype).tiny
    a = (s1 * sfy - sf * sy) / det.clamp_min(tiny)
    b = (sff * sy - sf * sfy) / det.clamp_min(tiny)
    a0 = sfy / sff.clamp_min(tiny)                       # b = 0
    neg_b = b < 0
    a = torch.where(neg_b, a0, a)
    b = torch.where(neg_b, torch.zeros_like(b), b)
    a = a.clamp_min(tiny)
    return a, b


class AmplitudeModel(BoundModel):
    """A forward model I = i0 g(q; shape) + background as a ``workers.fit`` model on a fixed q.

    model(q (N,), p (B, P)) with p = (shape..., i0, background). The Jacobian is analytic in i0
    and background (g and 1) and by central differences in the shape parameters, all 2 S + 1
    evaluations in one batched call (S shape parameters; step 1e-5 of each bound interval:
    truncation and rounding errors ~1e-10 relative in float64). Forward-mode autodiff
    (torch.func.jacfwd) gives the same numbers but is ~30x slower on CPU for these models.
    Subclasses BoundModel only for its interface (lower, upper, free, evaluate,
    evaluate_and_jacobian); BoundModel.__init__ is not used.
    """

    def __init__(self, model: Callable, q: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
        self.fn, self.x = model, q
        self.lower, self.upper = lower.to(q.dtype), upper.to(q.dtype)
        self.n_params = lower.shape[0]
        self.n_shape = self.n_params - 2
        self.free = torch.ones(self.n_params, dtype=torch.bool, device=q.device)
        span = (self.upper - self.lower)[:self.n_shape]
        if not bool(torch.isfinite(span).all()):
            raise ValueError("AmplitudeModel: shape parameters need finite bounds")
        self.h = 1e-5 * span

    def evaluate(self, p: torch.Tensor) -> torch.Tensor:
        return self.fn(self.x, p)

    def evaluate_and_jacobian(self, p, scale=None, jac=True):
        B, S = p.shape[0], self.n_shape
        shape = p[:, :S]
        if jac:
            d = torch.diag_embed(self.h).to(p)                                   # (S, S)
            shape = torch.cat([shape, (shape[None] + d[:, None]).reshape(-1, S),
                               (shape[None] - d[:, None]).reshape(-1, S)], 0)      # ((2S+1) B, S)
        one = torch.ones_like(shape[:, :1])
        g = self.fn(self.x, torch.cat([shape, one, 0 * one], 1))
        i0, bkg = p[:, S:S + 1], p[:, S + 1:S + 2]
        f = i0 * g[:B] + bkg
        if scale is not None:
            f = f * scale
        if not jac:
            return f, None
        gp, gm = g[B:B + S * B].reshape(S, B, -1), g[B + S * B:].reshape(S, B, -1)
        js = (gp - gm) / (2.0 * self.h.to(p)[:, None, None]) * i0[None]         # (S, B, N)
        cols = torch.cat([js, g[:B][None], torch.ones_like(g[:B])[None]], 0).transpose(0, 1)   # (B, P, N)
        if scale is not None:
            cols = cols * scale[:, None, :]
        return f, cols


def refine(model: Callable, q: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, p0: torch.Tensor,
           lower: torch.Tensor, upper: torch.Tensor, *, max_iter: int = 40, ftol: float = 1e-6,
           chunk_size: int | None = None):
    """Bounded batched LM (``workers.fit.fit_batch``) of model = i0 g(shape) + background from p0
    (B, P); returns workers.fit.FitResult (params, stderr, chi2_red, converged, n_iter).
    chunk_size: frames per LM chunk (every frame of a chunk is evaluated until the chunk's last
    one converges; None: fit_batch's default)."""
    bound = AmplitudeModel(model, q, lower, upper)
    return fit_batch(bound, q, y, sigma, p0, max_iter=max_iter, ftol=ftol, return_covariance=False,
                     chunk_size=chunk_size)


class _Inverter:
    """Encoder + refinement for one checkpoint (``encoder_state`` dict with ``model``).

    The encoder runs in float32; the linear amplitudes and the LM in ``dtype`` (float64
    default: the LM's covariance wants it; float32 works on GPUs).
    """

    def __init__(self, state: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        if state.get("model") not in FORWARD_MODELS:
            raise ValueError(f"checkpoint model must be one of {tuple(FORWARD_MODELS)}, got {state.get('model')!r}")
        self.model_name = state["model"]
        self.model, self.names = FORWARD_MODELS[state["model"]]
        self.encoder = encoder_from_state(state).to(device)
        self.enc_bounds: ParamBounds = self.encoder.bounds
        self.device, self.dtype = torch.device(device), dtype
        n_shape = len(self.enc_bounds.names)
        if tuple(self.enc_bounds.names) != self.names[:n_shape] or len(self.names) != n_shape + 2:
            raise ValueError(f"encoder parameters {self.enc_bounds.names} must be {self.names} less (i0, background)")
        lo, hi = list(self.enc_bounds.lo) + [0.0, 0.0], list(self.enc_bounds.hi) + [math.inf, math.inf]
        self.lower = torch.tensor(lo, dtype=dtype, device=device)
        self.upper = torch.tensor(hi, dtype=dtype, device=device)
        self.lm_chunk: int | None = None

    def _features(self, x, y, s) -> torch.Tensor:
        raise NotImplementedError

    def _fn(self, x, p):
        """Forward model on the flattened data grid: (B, P) -> (B, N)."""
        return self.model(x, p)

    @torch.no_grad()
    def _encode(self, x, y, s) -> torch.Tensor:
        shape_p = self.encoder(self._features(x, y, s)).to(self.dtype)
        one = torch.ones_like(shape_p[:, :1])
        a, b = linear_amplitudes(self._fn(x, torch.cat([shape_p, one, 0 * one], 1)), y, s)
        return torch.cat([shape_p, a[:, None], b[:, None]], 1)

    def _invert(self, x, y, s, refine_fit: bool, max_iter: int) -> InversionResult:
        p_enc = self._encode(x, y, s)
        if not refine_fit:
            nan = torch.full_like(p_enc, math.nan)
            chi = ((y - self._fn(x, p_enc)) / s).pow(2).nanmean(-1)
            return InversionResult(self.names, p_enc, nan, p_enc, chi, torch.ones_like(chi, dtype=torch.bool),
                                   self.model_name)
        res = refine(self._fn, x, y, s, p_enc, self.lower, self.upper, max_iter=max_iter, chunk_size=self.lm_chunk)
        return InversionResult(self.names, res.params, res.stderr, p_enc, res.chi2_red, res.converged, self.model_name)

    def _t(self, v):
        return torch.as_tensor(v, dtype=self.dtype, device=self.device)


class SaxsInverter(_Inverter):
    """Profiles: ``profile_features`` on the checkpoint's ``q_grid``, forward model on the data's q."""

    def __init__(self, state: dict, device="cpu", dtype=torch.float64):
        super().__init__(state, device, dtype)
        self.q_grid = torch.as_tensor(state["q_grid"], dtype=torch.float64, device=device)

    def _features(self, q, y, s):
        return profile_features(self.q_grid, q, y.float(), s.float())

    def encode(self, q, intensity, sigma) -> torch.Tensor:
        """Encoder shape parameters + linear amplitudes: (B, P) in ``dtype``."""
        return self._encode(*self._prep(q, intensity, sigma))

    def __call__(self, q, intensity, sigma, *, refine_fit: bool = True, max_iter: int = 40) -> InversionResult:
        """Invert B profiles. q (N,) 1/nm increasing, intensity and sigma (B, N) (units of i0);
        points with non-finite values or sigma <= 0 are ignored."""
        return self._invert(*self._prep(q, intensity, sigma), refine_fit, max_iter)

    def _prep(self, q, intensity, sigma):
        q, y, s = self._t(q), self._t(intensity), self._t(sigma)
        if y.dim() != 2 or s.shape != y.shape or q.dim() != 1 or q.shape[0] != y.shape[1]:
            raise ValueError(f"need q (N,), intensity and sigma (B, N); got {tuple(q.shape)}, "
                             f"{tuple(y.shape)}, {tuple(s.shape)}")
        return q, y, s


class GisaxsInverter(_Inverter):
    """Maps on the checkpoint's detector grid (``state["grid"]``: DetectorGrid fields)."""

    def __init__(self, state: dict, device="cpu", dtype=torch.float64):
        super().__init__(state, device, dtype)
        g = state["grid"]
        self.grid = DetectorGrid(float(g["wavelength"]), float(g["alpha_i"]), tuple(g["u"]), tuple(g["v"]))
        self.grid_q = self.grid.q(dtype, device)
        # CPU: one map per LM chunk, so that a converged map stops costing evaluations (measured
        # 92 ms/map vs 400 (chunks of 4) and 670 (16) on the held-out BornAgain maps)
        self.lm_chunk = 1 if self.device.type == "cpu" else None

    def _fn(self, x, p):
        return self.model(self.grid_q, p).reshape(p.shape[0], -1)

    def _features(self, x, y, s):
        H, W = self.grid.shape
        ok = torch.isfinite(y) & (y > 0) & torch.isfinite(s) & (s > 0)
        li = torch.where(ok, y.clamp_min(1e-30).log10(), torch.zeros_like(y))
        return map_features(li.reshape(-1, H, W).float(), ok.reshape(-1, H, W))

    def encode(self, maps, sigma) -> torch.Tensor:
        return self._encode(*self._prep(maps, sigma))

    def __call__(self, maps, sigma, *, refine_fit: bool = True, max_iter: int = 40) -> InversionResult:
        """Invert B maps (B, H, W) on ``self.grid`` (row = v, column = u), sigma (B, H, W)."""
        return self._invert(*self._prep(maps, sigma), refine_fit, max_iter)

    def _prep(self, maps, sigma):
        y, s = self._t(maps), self._t(sigma)
        if y.dim() != 3 or tuple(y.shape[1:]) != self.grid.shape or s.shape != y.shape:
            raise ValueError(f"maps and sigma must be (B, {self.grid.shape[0]}, {self.grid.shape[1]}), "
                             f"got {tuple(y.shape)}, {tuple(s.shape)}")
        x = torch.arange(y.shape[1] * y.shape[2], dtype=self.dtype, device=self.device)
        return x, y.reshape(y.shape[0], -1), s.reshape(s.shape[0], -1)


def inversion_rows(res: InversionResult, seq_num=None, time=None) -> dict[str, np.ndarray]:
    """Columnar rows, one per frame: seq_num, time, model, then for each parameter <name>,
    <name>_err (NaN without refinement), <name>_encoder (the LM start), then chi2 (reduced),
    converged. seq_num, time: (B,) (default 1..B and NaN)."""
    B = res.params.shape[0]
    out = {"seq_num": np.asarray(seq_num if seq_num is not None else np.arange(1, B + 1), np.int64),
           "time": np.asarray(time if time is not None else np.full(B, np.nan), np.float64),
           "model": np.full(B, res.model)}
    p, e, pe = (t.detach().double().cpu().numpy() for t in (res.params, res.stderr, res.encoder))
    for j, nm in enumerate(res.names):
        out[nm], out[f"{nm}_err"], out[f"{nm}_encoder"] = p[:, j], e[:, j], pe[:, j]
    out["chi2"] = res.chi2_red.detach().double().cpu().numpy()
    out["converged"] = res.converged.detach().cpu().numpy().astype(bool)
    return out
