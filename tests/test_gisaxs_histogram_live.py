"""GISAXS inversion for a radius histogram (``spheres_histogram_paracrystal_dwba``,
workers/inversion/histogram_map.py).

Fast: the LM's model (cached amplitudes, one GEMM) against ``dwba.spheres_histogram_paracrystal_dwba``
in float64; its Jacobian (forward differences for the map, exact for the prior's rows) against
central differences; the torch moments against ``distribution.moments``; the run spec of a start
document that asks for the model.

Slow: a live run through the real service (0MQ ingest, worker, REST, results stream, Tiled) of
BornAgain DWBA frames (Si) of a BIMODAL population (service/sim/gisaxs_particles.py ``second``:
a growing mode 3.0 -> 3.5 nm and a fixed one at 6 nm holding half the volume, pd 0.06 each, on a
radial paracrystal, D 20 nm), 2-20 counts a pixel: per frame two modes at the truth's radii and
volume shares, the distance, the new columns in REST, the stream and Tiled."""
import math
import time

import numpy as np
import pytest
import torch

from service.config import load_settings
from service.run_spec import RunSpecBuilder
from service.sim.frames import poni_dict
from service.sim.gisaxs_particles import SI_12KEV, GisaxsParticleSimulator, particle_geometry
from workers.grazing import horizon_mask
from workers.inversion.distribution import (RadiusBins, bin_masses, find_modes, gaussian_cdf, moments,
                                            radius_moments)
from workers.inversion.dwba import dwba_points, spheres_histogram_paracrystal_dwba
from workers.inversion.histogram_map import HistogramMapModel
from workers.inversion.maps import InversionMap
from workers.inversion.spec import GisaxsInversionSpec, Substrate

from helpers import analysis_table, stream_events
from test_gisaxs_live import N, TIMES, gisaxs_service, send_run  # noqa: F401  (its service fixture)

D = torch.float64
SI = Substrate(*SI_12KEV)
BINS = RadiusBins(2.0, 8.0, 16)
MODEL = "spheres_histogram_paracrystal_dwba"


def _map_points():
    ggeo = particle_geometry(shape=(24, 24), pixel=1.4e-3)
    return InversionMap(ggeo, npt=(24, 24), mask=horizon_mask(ggeo)).points


def _model(points, dtype=D):
    t = lambda a: torch.as_tensor(np.asarray(a, np.float64))[None]          # noqa: E731
    dq = dwba_points(t(points.q_xy).abs(), t(points.alpha_f()), points.wavelength, points.alpha_i, SI,
                     torch.ones(1, points.q_xy.size, dtype=D), D, None)
    K = BINS.n_bins
    lo = torch.tensor([5.0, 0.05, *[-20.0] * K, 0.0, 0.0], dtype=dtype)
    hi = torch.tensor([100.0, 0.3, *[20.0] * K, math.inf, math.inf], dtype=dtype)
    return dq, HistogramMapModel(dq, BINS, points.q_xy.size, lo, hi)


def _bimodal_volume():
    w = 0.6 * bin_masses(BINS, gaussian_cdf(3.5, 0.28))[0] + 0.4 * bin_masses(BINS, gaussian_cdf(6.0, 0.36))[0]
    v = w * BINS.mean_r3(torch.zeros(1, dtype=D)).numpy()
    return v / v.sum(), w


def test_map_model_matches_the_dwba_histogram_model_float64():
    points = _map_points()
    dq, model = _model(points)
    v, w = _bimodal_volume()
    z = torch.log(torch.as_tensor(v).clamp_min(1e-12))
    p = torch.cat([torch.tensor([20.0, 0.15], dtype=D), z - z.mean(), torch.tensor([3.0, 0.01], dtype=D)])[None]
    number = model.number(p[:, 2:18])
    np.testing.assert_allclose(number.numpy(), w[None], rtol=1e-6, atol=1e-12)      # z clamped at 1e-12
    ref = spheres_histogram_paracrystal_dwba(dq, torch.tensor([[20.0, 0.15, 3.0, 0.01]], dtype=D), number,
                                             BINS).reshape(1, -1)
    ours = model.evaluate(p)
    N = points.q_xy.size
    assert ours.shape == (1, N + BINS.n_bins - 1)
    np.testing.assert_allclose(ours[:, :N].numpy(), ref.numpy(), rtol=1e-12)

    # the Jacobian: forward differences (map rows) against central ones; the prior rows exact
    _, jac = model.evaluate_and_jacobian(p)
    cols = []
    for j in range(p.shape[1]):
        h = 1e-6 * max(abs(float(p[0, j])), 1.0)
        e = torch.zeros_like(p)
        e[0, j] = h
        cols.append((model.evaluate(p + e) - model.evaluate(p - e)) / (2 * h))
    num = torch.stack(cols, 1)
    scale = num.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    assert float(((jac - num).abs() / scale).max()) < 1e-3
    np.testing.assert_allclose(jac[0, :, N:].numpy(), num[0, :, N:].numpy(), atol=1e-7)
    np.testing.assert_allclose(jac[0, 2:].numpy(), num[0, 2:].numpy(), rtol=1e-6, atol=1e-9 * float(scale.max()))
    # the plain reference: BasisModel's forward differences in every shape parameter
    _, ref_model = _model(points)
    ref_model.analytic = False
    f_ref, jac_ref = ref_model.evaluate_and_jacobian(p)
    np.testing.assert_allclose(model.evaluate_and_jacobian(p)[0].numpy(), f_ref.numpy(), rtol=1e-13)
    assert float(((jac - jac_ref).abs() / scale).max()) < 1e-3


def test_torch_moments_match_distribution_moments():
    v, w = _bimodal_volume()
    mean, width = moments(BINS, w[None])
    ours = radius_moments(BINS, torch.as_tensor(w, dtype=D)[None])[0].numpy()
    np.testing.assert_allclose(ours, [mean[0], width[0]], rtol=1e-12)


def test_run_spec_of_the_histogram_model():
    ggeo = particle_geometry(shape=(16, 16), pixel=2e-3)
    builder = RunSpecBuilder(load_settings(None, fit={"peaks": []}, phases={"enabled": False},
                                           tiled={"enabled": False}, results={"address": None}))
    hints = {"modality": "gisaxs", "incident_angle": ggeo.incident_angle, "critical_angle": 2.5e-3,
             "reduction": {"rod_q_xy_band": [0.2, 0.4]}, "inversion": {"enabled": True, "gisaxs": {"model": MODEL}}}
    spec = builder.build({"uid": "u", "geometry": poni_dict(ggeo.geometry.to_pyfai()),
                          "scatterflow": hints}).inversion
    assert isinstance(spec, GisaxsInversionSpec) and spec.model == MODEL
    assert spec.state["radius_bins"]["n_bins"] == 16 and spec.state["model"] == MODEL    # gisaxs_dwba_encoder.pt
    assert spec.substrate is None and spec.state["substrate"]["delta"] == SI_12KEV[0]     # the checkpoint's
    with pytest.raises(ValueError, match="radius_bins"):
        GisaxsInversionSpec(state=None, model=MODEL, substrate=SI)
    with pytest.raises(ValueError, match="not a shape parameter"):
        builder.build({"uid": "u", "geometry": poni_dict(ggeo.geometry.to_pyfai()), "scatterflow": {
            **hints, "inversion": {"enabled": True, "gisaxs": {"model": MODEL, "bounds": {"radius": [2, 8]}}}}})


@pytest.mark.parametrize("overlap", [0.5, 1.0], ids=["encoder", "grid"])
@pytest.mark.usefixtures("one_torch_thread")
def test_invert_map_finds_both_modes_of_simulated_maps(overlap):
    """Maps of the model itself (bimodal: 60 % of the particles at 3.5 nm, 40 % at 6 nm; D 20 nm)
    with Poisson counts (~1e3 at the peak) on a 32 x 32 detector: two modes at the truth's, the
    distance, finite errors, verdict good; from the encoder and (min_map_overlap 1: the map does
    not cover the encoder's grid) from the uniform-histogram grid start."""
    from service.train.inversion import load_encoder_checkpoint
    from workers.inversion.histogram_map import GisaxsHistogramInverter
    from workers.inversion.refine import inversion_rows
    ggeo = particle_geometry(shape=(32, 32), pixel=1.12e-3)
    points = InversionMap(ggeo, npt=(32, 32), mask=horizon_mask(ggeo)).points
    inv = GisaxsHistogramInverter(load_encoder_checkpoint("gisaxs_dwba"), min_map_overlap=overlap)
    v, w = _bimodal_volume()
    model = inv.map_model(points)
    z = torch.log(torch.as_tensor(v).clamp_min(1e-12))
    p = torch.cat([torch.tensor([20.0, 0.15], dtype=D), z - z.mean(), torch.tensor([1.0, 1e-3], dtype=D)])[None]
    mu = model.evaluate(p)[:, :points.q_xy.size]
    mu = mu * (1e3 / float((mu * torch.as_tensor(points.weight)).max()))
    counts = torch.as_tensor(np.random.default_rng(1).poisson((mu * torch.as_tensor(points.weight)).repeat(2, 1)
                                                              .numpy()), dtype=D)
    wt = torch.as_tensor(points.weight)
    res = inv.invert_map(points, counts / wt, counts.clamp_min(1).sqrt() / wt)
    rows = inversion_rows(res)
    vol = np.array([rows[f"radius_fraction_{k:02d}"] for k in range(16)]).T
    truth = find_modes(BINS, v)
    assert rows["warm_start"][0] == ("encoder" if overlap < 1 else "grid")
    for i in range(2):
        modes = find_modes(BINS, vol[i])
        assert rows["n_modes"][i] == 2 and len(modes) == 2, modes
        np.testing.assert_allclose([m[0] for m in modes], [m[0] for m in truth], rtol=0.03)
        np.testing.assert_allclose([m[1] for m in modes], [m[1] for m in truth], atol=0.05)
    pulls = (rows["distance"] - 20.0) / rows["distance_err"]
    print(f"distance {np.round(rows['distance'], 3)} +- {np.round(rows['distance_err'], 3)}; modes "
          f"{[np.round(find_modes(BINS, x), 3).tolist() for x in vol]}, truth {np.round(truth, 3).tolist()}; "
          f"chi2 {np.round(rows['chi2'], 3)}")
    assert np.all(np.abs(pulls) < 4) and np.all(np.abs(rows["distance"] / 20.0 - 1) < 0.03), pulls
    assert set(rows["fit_quality"]) == {"good"}
    for c in ("distance_err", "radius_mean_err", "radius_width_err", "radius_fraction_12_err"):
        assert np.all(np.isfinite(rows[c]) & (rows[c] > 0)), c


def test_cli_trains_the_histogram_encoder():
    """``scatterflow train gisaxs_dist`` reaches service.train.inversion's gisaxs_dist run."""
    from service.cli import build_parser
    from service.train import inversion
    args = build_parser().parse_args(["train", "gisaxs_dist", "--n-train", "8", "--born"])
    assert args.kind == "gisaxs_dist" and args.func is inversion.run and args.n_train == 8 and args.born


# ---------------------------------------------------------------------------------------------
# live, through the service
SECOND = (6.0, 0.5)       # radius nm, volume share (over TIMES the small mode grows 3.0 -> 3.5 nm)
RADIUS_TOL, SHARE_TOL, DIST_TOL = 0.03, 0.05, 0.01


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_bimodal_particles_inverted_live_as_a_histogram(gisaxs_service, tmp_path):
    pytest.importorskip("bornagain")
    import httpx

    from helpers import wait_stopped

    service, pub, sub, shared_tiled = gisaxs_service
    sim = GisaxsParticleSimulator(particle_geometry(shape=(64, 64), pixel=5.6e-4), SI_12KEV, radius=(3.0, 3.5),
                                  pd=0.06, duration=TIMES[-1], peak_counts=2e3, background=1e-3, seed=7, second=SECOND)
    images = [sim.frame(t) for t in TIMES]
    uid = send_run(pub, sim, images, {"enabled": True, "gisaxs": {"model": MODEL}})   # Si: the checkpoint's substrate
    t0 = time.monotonic()
    run = wait_stopped(service, uid, timeout=120)
    elapsed = time.monotonic() - t0
    assert run.status == "complete" and run.frames_received == N and not run.failed

    api = f"http://127.0.0.1:{service.api_port}/api/v1/runs"
    cols = httpx.get(f"{api}/{uid}/inversion").json()["columns"]
    assert cols["seq_num"] == list(range(1, N + 1))                  # each frame once
    assert set(cols["model"]) == {MODEL} and set(cols["warm_start"]) == {"encoder"}
    for c in ("distance", "distance_err", "radius_mean", "radius_mean_err", "radius_width", "radius_width_err",
              "n_modes", "radius_fraction_00", "radius_fraction_15", "radius_fraction_07_err", "chi2",
              "fit_quality"):
        assert c in cols, c
    vol = np.array([cols[f"radius_fraction_{k:02d}"] for k in range(16)]).T          # (N, K)
    np.testing.assert_allclose(vol.sum(1), 1.0, rtol=1e-9)
    assert cols["n_modes"] == [2] * N
    errs = []
    for i, t in enumerate(TIMES):
        (r1, _), (r2, _) = modes = find_modes(BINS, vol[i])
        truth = (float(sim.truth(t)["radius"]), SECOND[0])
        errs.append((r1 / truth[0] - 1, r2 / truth[1] - 1, modes[1][1] - SECOND[1]))
    errs = np.array(errs)
    dist = np.array(cols["distance"])
    print(f"{N} frames in {elapsed:.1f} s; mode radius errors (small, large) {np.round(errs[:, :2], 3)}; "
          f"large-mode volume share - truth {np.round(errs[:, 2], 3)}; distance {np.round(dist, 3)}; "
          f"chi2 {np.round(cols['chi2'], 3)}; radius_mean {np.round(cols['radius_mean'], 3)} "
          f"+- {np.round(cols['radius_mean_err'], 3)}")
    # measured (seed 7): mode radii within 1.9 % (mostly 0.5-1 %, biased +: the bins' within-bin
    # spread), volume shares within 0.012, distance within 0.16 %, chi2_red 0.96-1.02
    assert np.all(np.abs(errs[:, :2]) < RADIUS_TOL) and np.all(np.abs(errs[:, 2]) < SHARE_TOL), errs
    assert np.all(np.abs(dist / 20.0 - 1) < DIST_TOL), dist
    for c in ("distance_err", "radius_mean_err", "radius_width_err"):
        assert np.all(np.isfinite(cols[c]) & (np.array(cols[c]) > 0)), c
    pulls = (dist - 20.0) / np.array(cols["distance_err"])
    mean_truth = np.array([sum(r * n for r, n in sim.species(t)) for t in TIMES])     # number-weighted
    mean_off = np.array(cols["radius_mean"]) / mean_truth - 1
    print(f"distance pulls {np.round(pulls, 2)}; radius_mean / truth - 1 {np.round(mean_off, 4)}")
    # measured: distance pulls within 2.1, radius_mean within 0.8 % of the truth
    assert np.all(np.abs(pulls) < 4) and np.all(np.abs(mean_off) < 0.02), (pulls, mean_off)
    assert set(cols["fit_quality"]) <= {"good", "poor"} and max(cols["chi2"]) < 1.3
    summary = httpx.get(f"{api}/{uid}").json()["inversion"]
    assert summary["frames"] == N and summary["bad"] == 0 and summary["model"] == MODEL

    # the results stream: one inversion event per frame, with the histogram's columns
    events = stream_events(sub, uid, "inversion")
    assert sorted(e["data"]["source_seq_num"] for e in events) == list(range(1, N + 1))
    by_seq = {e["data"]["source_seq_num"]: e["data"]["radius_fraction_12"] for e in events}
    np.testing.assert_allclose([by_seq[s] for s in range(1, N + 1)], cols["radius_fraction_12"])

    # Tiled: the analysis run's inversion table has the new columns
    table = analysis_table(shared_tiled.uri, shared_tiled.api_key, uid, "inversion", N)
    np.testing.assert_allclose(table["radius_mean"], cols["radius_mean"])
    np.testing.assert_array_equal(table["n_modes"], cols["n_modes"])

    # the run report from Tiled: the histogram as one map of volume fractions, two modes a frame
    from service.report import write_report_for
    deadline = time.monotonic() + 30
    while True:
        try:
            html = write_report_for(shared_tiled.uri, shared_tiled.api_key, uid, tmp_path / "report").read_text()
            if "radius histogram" in html:
                break
        except Exception:          # the run's containers may still be filling
            pass
        assert time.monotonic() < deadline, "no report with the radius histogram"
        time.sleep(0.5)
    assert "16 bins of volume fraction (figure), modes per frame: median 2" in html
    assert "radius_fraction_00: median" not in html and "radius_mean: median" in html
