"""The penalised joint window fit (workers/window_fit.py): the block-tridiagonal smoother against
the plain dense LM loop in float64, its optimum against the penalised chi2 written out in numpy,
and the block solver against a dense solve."""
import numpy as np
import pytest
import torch

from workers import block_tridiag
from workers.fit import fit_batch
from workers.profiles import PeakModel
from workers.window_fit import Expansion, joint_fit, joint_fit_reference

from test_temporal import Q, SPEC, STEP_AT, _pv, simulate   # the simulated series with a step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(starts, W=8, seed=11):
    """Windows of W frames from one simulated series (step at STEP_AT), started from per-frame
    fits, with the per-frame standard errors as difference scales and the per-frame fits'
    expansions."""
    y, s, *_ = simulate(600, seed)
    bound = PeakModel(SPEC).bind(torch.tensor(Q))
    yt, st = torch.tensor(y), torch.tensor(s)
    pf = fit_batch(bound, bound.x, yt, st, bound.guess(yt))
    R = list(bound.model.reg_index)

    def take(v):
        return torch.stack([v[a:a + W] for a in starts])
    se = take(pf.stderr)
    scale = torch.sqrt(0.5 * (se[:, 1:, R] ** 2 + se[:, :-1, R] ** 2))
    ex = Expansion(take(pf.params), take(pf.chi2_red), take(pf.normal), take(pf.gradient))
    return bound, take(yt), take(st), take(pf.params), se, scale, ex


def _objective(bound, y, sg, e, links, s, th):
    """The penalised chi2 (quadratic penalty) of one window, in numpy: th (W * P,)."""
    th = th.reshape(y.shape[0], -1)
    f = _pv(Q[None], th[:, :1], th[:, 1:2], th[:, 2:3], th[:, 3:4])
    f = f + th[:, 4:5] + th[:, 5:6] * (Q - 17.0) / 2.0          # background in (q - 17) / 2
    u = (th[1:, :2] - th[:-1, :2]) / e                          # centre and FWHM, standard-error units
    return (((y - f) / sg) ** 2).sum() + 2 * s * s * (links[:, None] * 0.5 * u * u).sum()


@pytest.mark.parametrize("penalty", ["quadratic", "huber", "tv"])
def test_joint_fit_reaches_the_dense_reference_optimum_float64(penalty):
    """Three windows: a smooth one started from the model's guess (no expansion: evaluated
    there), the step with its link cut, the step left linked (from the per-frame fits'
    expansions). Against the plain dense LM run to a tight tolerance: with every moved frame
    evaluated (trust 0) the same optimum to 2e-5 standard errors (both stop at a predicted
    decrease of ~1e-11, i.e. ~3e-6 se from the optimum); with the defaults (expansions
    trusted within 0.5 se, ftol 1e-3) within the LM tolerance, 0.05 se, errors within 3 %, and
    with fewer model evaluations per frame."""
    bound, Y, S, p0, _, scale, ex = _windows([0, STEP_AT - 4, STEP_AT - 3])
    p0[0] = bound.guess(Y[0])
    ex.params[0] = torch.nan                          # window 0: no usable expansion
    links = torch.ones(3, 7, dtype=torch.bool)
    links[1, 3] = False
    kw = {"strength": 2.0, "penalty": penalty}
    ref = joint_fit_reference(bound, Y, S, p0, scale, links, **kw, ftol=1e-12, max_iter=300)
    sd = torch.sqrt(torch.diagonal(ref.cov, dim1=-2, dim2=-1))
    assert bool(ref.converged.all())
    exact = joint_fit(bound, Y, S, p0, scale, links, **kw, ftol=1e-12, max_iter=300, trust=0.0, expansion=ex)
    assert bool(exact.converged.all())
    assert ((exact.params - ref.params).abs() / sd).max() < 2e-5
    assert ((exact.cov - ref.cov).abs() / (sd[..., :, None] * sd[..., None, :])).max() < 2e-5
    assert torch.allclose(exact.chi2_red, ref.chi2_red, rtol=1e-8)
    fast = joint_fit(bound, Y, S, p0, scale, links, **kw, expansion=ex)
    assert bool(fast.converged.all()) and bool(fast.identified.all())
    assert ((fast.params - ref.params).abs() / sd).max() < 0.05
    assert ((fast.cov - ref.cov).abs() / (sd[..., :, None] * sd[..., None, :])).max() < 0.03
    assert ((fast.params - p0).abs() / sd).max() > 1.0           # the fits did move
    assert fast.n_eval.double().mean() < 0.5 * exact.n_eval.double().mean()
    assert int(fast.n_eval[0].min()) >= 1                       # window 0 was evaluated at its start


def test_joint_fit_quadratic_is_stationary_point_of_penalised_chi2():
    """At the returned parameters the numerical gradient of the penalised chi2, written out here
    in numpy, vanishes; scipy's BFGS on it from the per-frame fits reaches the same point, and
    the true penalised chi2 went down from the start (no step raised it)."""
    from scipy.optimize import minimize

    W, s = 8, 2.0
    bound, Y, S, p0, se, scale, ex = _windows([STEP_AT - 4], W)
    y, sg, se, e = Y[0].numpy(), S[0].numpy(), se[0].numpy().ravel(), scale[0].numpy()
    links = np.ones(W - 1, bool)
    links[3] = False                                            # the step between frames 3 and 4

    def objective(th):
        return _objective(bound, y, sg, e, links, s, th)

    def gradient_in_se(th):
        """|dF/dtheta| x se: the change of F for a move of one standard error."""
        h = 1e-4 * se
        return np.array([(objective(th + hi * ei) - objective(th - hi * ei)) / (2 * hi) * sei
                         for hi, ei, sei in zip(h, np.eye(th.size), se)])

    jr = joint_fit(bound, Y, S, p0, scale, torch.as_tensor(links)[None], strength=s,
                   penalty="quadratic", ftol=1e-12, max_iter=200, trust=0.0, expansion=ex)
    th = jr.params[0].numpy().ravel()
    assert bool(jr.converged.all())
    start = p0[0].numpy().ravel()
    assert np.abs(gradient_in_se(start)).max() > 1.0           # the start is not the optimum
    assert np.abs(gradient_in_se(th)).max() < 1e-4
    z = minimize(lambda z: objective(start + z * se), np.zeros(th.size), method="BFGS", options={"gtol": 1e-8}).x
    assert np.abs((start + z * se - th) / se).max() < 1e-3
    assert objective(th) <= objective(start + z * se) + 1e-6
    fast = joint_fit(bound, Y, S, p0, scale, torch.as_tensor(links)[None], strength=s, penalty="quadratic",
                     expansion=ex)
    assert objective(fast.params[0].numpy().ravel()) < objective(start) - 10.0
    assert objective(fast.params[0].numpy().ravel()) - objective(th) < 1e-2


def test_joint_fit_converged_flag_tells_the_truth():
    """Windows started from per-frame fits with TrajectoryFitter's defaults: every frame's stop
    test holds (converged True, and the returned point is where a longer, tighter run ends up,
    to 0.05 se); stopped by max_iter=1 before the stop test can hold, no frame is converged."""
    bound, Y, S, p0, _, scale, ex = _windows([0, 20, STEP_AT - 4, STEP_AT + 10])
    links = torch.ones(4, 7, dtype=torch.bool)
    kw = {"strength": 2.0, "penalty": "huber", "expansion": ex}
    jr = joint_fit(bound, Y, S, p0, scale, links, **kw)
    assert bool(jr.converged.all())
    long = joint_fit(bound, Y, S, p0, scale, links, **kw, ftol=1e-10, max_iter=200, trust=0.0)
    sd = torch.sqrt(torch.diagonal(long.cov, dim1=-2, dim2=-1))
    assert ((jr.params - long.params).abs() / sd).max() < 0.05
    one = joint_fit(bound, Y, S, p0, scale, links, **kw, max_iter=1)
    assert not bool(one.converged.any())


@pytest.mark.parametrize("W", [7, 50])
def test_block_tridiagonal_solve_matches_dense_solve(W):
    """Random symmetric positive-definite block-tridiagonal systems with diagonal couplings:
    the block sweeps (W = 7) and the partitioned solve (W = 50: 6 chunks of 8 blocks and 5
    separators, the last chunk padded) against torch.linalg.solve of the dense matrix; a matrix
    that is not positive definite is reported, whether the bad block lies in a chunk or is a
    separator."""
    g = torch.Generator().manual_seed(3)
    B, P, M = 3, 5, 2
    a = torch.randn(B, W, P, P, generator=g, dtype=torch.float64)
    off = torch.randn(B, W - 1, P, generator=g, dtype=torch.float64)
    diag = a @ a.transpose(-1, -2) + torch.diag_embed(torch.full((B, W, P), 4.0, dtype=torch.float64))
    rhs = torch.randn(B, W, P, M, generator=g, dtype=torch.float64)
    x, ok = block_tridiag.solve(diag, off, rhs)
    dense = block_tridiag.to_dense(diag, off)
    assert bool(ok.all()) and bool((torch.linalg.eigvalsh(dense) > 0).all())
    ref = torch.linalg.solve(dense, rhs.reshape(B, W * P, M))
    assert torch.allclose(x.reshape(B, W * P, M), ref, rtol=1e-10, atol=1e-12)
    for bad in {4, W // 2, min(8, W - 1)}:          # W = 50: 4 and 25 in chunks, 8 the first separator
        d = diag.clone()
        d[1, bad] -= 50.0 * torch.eye(P, dtype=torch.float64)
        assert not bool((torch.linalg.eigvalsh(block_tridiag.to_dense(d, off)[1]) > 0).all())
        _, ok = block_tridiag.solve(d, off, rhs)
        assert ok.tolist() == [True, False, True]


@pytest.mark.parametrize("penalty", ["quadratic", "huber"])
def test_span_fit_covariance_of_sub_windows_is_each_windows_sandwich(penalty):
    """A span of 24 frames across the step (link cut) fitted once (the partitioned sweeps do not
    start below 36 frames, so both paths of the sweeps are the block Thomas algorithm here),
    with the covariance asked for three sub-windows of 8 frames: each equals the dense
    reference's sandwich of that sub-window alone, written out entry by entry, at the span's
    solution (every moved frame evaluated, trust 0, so the expansions are at the solution)."""
    start = STEP_AT - 10
    bound, Y, S, p0, _, scale, ex = _windows([start], W=24)
    links = torch.ones(1, 23, dtype=torch.bool)
    links[0, STEP_AT - start - 1] = False
    kw = {"strength": 2.0, "penalty": penalty}
    sub = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, 11, 12, 13], [16, 17, 18, 19, 20, 21, 22, 23]])
    span = joint_fit(bound, Y, S, p0, scale, links, **kw, ftol=1e-12, max_iter=300, trust=0.0, expansion=ex,
                     report=slice(2, 6), windows=sub)
    assert bool(span.converged.all()) and span.cov.shape == (3, 4, 6, 6)
    for k, idx in enumerate(sub):
        ref = joint_fit_reference(bound, Y[:, idx], S[:, idx], span.params[:, idx], scale[:, idx[:-1]],
                                  links[:, idx[:-1]], **kw, max_iter=0)
        assert torch.allclose(ref.params, span.params[:, idx], rtol=0, atol=1e-12)     # max_iter 0: at the solution
        sd = torch.sqrt(torch.diagonal(ref.cov[0, 2:6], dim1=-2, dim2=-1))
        assert ((span.cov[k] - ref.cov[0, 2:6]).abs() / (sd[..., :, None] * sd[..., None, :])).max() < 1e-6
