"""The penalised joint window fit (workers/window_fit.py): the batched solver against its plain
reference loop in float64, and its optimum against the penalised chi2 written out in numpy."""
import numpy as np
import pytest
import torch

from workers.fit import fit_batch
from workers.profiles import PeakModel
from workers.window_fit import joint_fit, joint_fit_reference

from test_temporal import Q, SPEC, STEP_AT, _pv, simulate   # the simulated series with a step


def _windows(starts, W=8, seed=11):
    """Windows of W frames from one simulated series (step at STEP_AT), started from per-frame
    fits, with the per-frame standard errors as difference scales."""
    y, s, *_ = simulate(600, seed)
    bound = PeakModel(SPEC).bind(torch.tensor(Q))
    yt, st = torch.tensor(y), torch.tensor(s)
    pf = fit_batch(bound, bound.x, yt, st, bound.guess(yt))
    R = list(bound.model.reg_index)
    Y = torch.stack([yt[a:a + W] for a in starts])
    S = torch.stack([st[a:a + W] for a in starts])
    p0 = torch.stack([pf.params[a:a + W] for a in starts])
    se = torch.stack([pf.stderr[a:a + W] for a in starts])
    scale = torch.sqrt(0.5 * (se[:, 1:, R] ** 2 + se[:, :-1, R] ** 2))
    return bound, Y, S, p0, se, scale


@pytest.mark.parametrize("max_iter", [2, 30])
@pytest.mark.parametrize("penalty", ["quadratic", "huber", "tv"])
def test_joint_fit_matches_reference_loop_float64(penalty, max_iter):
    """Batched joint_fit against the plain one-window-at-a-time loop: a smooth window started
    from the model's guess, the step with its link cut, and the step left linked."""
    bound, Y, S, p0, _, scale = _windows([0, STEP_AT - 4, STEP_AT - 3])
    p0[0] = bound.guess(Y[0])
    links = torch.ones(3, 7, dtype=torch.bool)
    links[1, 3] = False
    kw = {"strength": 2.0, "penalty": penalty, "max_iter": max_iter}
    jr = joint_fit(bound, Y, S, p0, scale, links, **kw)
    ref = joint_fit_reference(bound, Y, S, p0, scale, links, **kw)
    sd = torch.sqrt(torch.diagonal(ref.cov, dim1=-2, dim2=-1))
    assert torch.equal(jr.converged, ref.converged)
    assert bool(ref.converged.all()) == (max_iter == 30)
    assert ((jr.params - ref.params).abs() / sd).max() < 1e-8
    assert ((jr.cov - ref.cov).abs() / (sd[..., :, None] * sd[..., None, :])).max() < 1e-8
    assert torch.allclose(jr.chi2_red, ref.chi2_red, rtol=1e-10)
    assert ((jr.params - p0).abs() / sd).max() > 1.0           # the fits did move


def test_joint_fit_quadratic_is_stationary_point_of_penalised_chi2():
    """At the returned parameters the numerical gradient of the penalised chi2, written out here
    in numpy, vanishes; scipy's BFGS on it from the per-frame fits reaches the same point."""
    from scipy.optimize import minimize

    W, s = 8, 2.0
    bound, Y, S, p0, se, scale = _windows([STEP_AT - 4], W)
    y, sg, se, e = Y[0].numpy(), S[0].numpy(), se[0].numpy().ravel(), scale[0].numpy()
    links = np.ones(W - 1, bool)
    links[3] = False                                            # the step between frames 3 and 4

    def objective(th):
        th = th.reshape(W, -1)
        f = _pv(Q[None], th[:, :1], th[:, 1:2], th[:, 2:3], th[:, 3:4])
        f = f + th[:, 4:5] + th[:, 5:6] * (Q - 17.0) / 2.0      # background in (q - 17) / 2
        u = (th[1:, :2] - th[:-1, :2]) / e                      # centre and FWHM, standard-error units
        return (((y - f) / sg) ** 2).sum() + 2 * s * s * (links[:, None] * 0.5 * u * u).sum()

    def gradient_in_se(th):
        """|dF/dtheta| x se: the change of F for a move of one standard error."""
        h = 1e-4 * se
        return np.array([(objective(th + hi * ei) - objective(th - hi * ei)) / (2 * hi) * sei
                         for hi, ei, sei in zip(h, np.eye(th.size), se)])

    jr = joint_fit(bound, Y, S, p0, scale, torch.as_tensor(links)[None], strength=s,
                   penalty="quadratic", ftol=1e-12, max_iter=200)
    th = jr.params[0].numpy().ravel()
    assert bool(jr.converged.all())
    assert np.abs(gradient_in_se(p0[0].numpy().ravel())).max() > 1.0    # the start is not the optimum
    assert np.abs(gradient_in_se(th)).max() < 1e-4
    start = p0[0].numpy().ravel()
    z = minimize(lambda z: objective(start + z * se), np.zeros(th.size), method="BFGS", options={"gtol": 1e-8}).x
    assert np.abs((start + z * se - th) / se).max() < 1e-3
    assert objective(th) <= objective(start + z * se) + 1e-6


def test_joint_fit_converged_flag_tells_the_truth():
    """Windows started from per-frame fits, with TrajectoryFitter's defaults: the LM stop test
    holds (converged True, and the returned point is where a longer run ends up, to 0.03 se);
    stopped by max_iter=1 before the stop test can hold, converged is False for every window."""
    bound, Y, S, p0, _, scale = _windows([0, 20, STEP_AT - 4, STEP_AT + 10])
    links = torch.ones(4, 7, dtype=torch.bool)
    kw = {"strength": 2.0, "penalty": "huber"}
    jr = joint_fit(bound, Y, S, p0, scale, links, **kw)
    assert jr.converged.tolist() == [True] * 4
    long = joint_fit(bound, Y, S, p0, scale, links, **kw, ftol=1e-10, max_iter=200)
    sd = torch.sqrt(torch.diagonal(long.cov, dim1=-2, dim2=-1))
    assert ((jr.params - long.params).abs() / sd).max() < 0.1
    one = joint_fit(bound, Y, S, p0, scale, links, **kw, max_iter=1)
    assert one.converged.tolist() == [False] * 4
