"""Reduced profiles as instruments write them: each on its own q grid (other points, other
lengths, log-spaced, some points NaN) through the service, every frame accounted for, fitted
against the simulator's truth with calibrated errors; `resample_profile` against an analytic line."""
from __future__ import annotations

import numpy as np
import pytest
from event_model import compose_run

from service.config import load_settings
from service.server import Service
from service.sim.azopolymer import AzoCycle
from workers.profiles import resample_profile

from helpers import wait_stopped

FIT = {"q_range": [2.0, 4.6], "background": {"kind": "power_law"},
       "peaks": [{"name": "lamellar", "center": 3.2, "fwhm": 0.2, "center_min": 2.7, "center_max": 3.6}],
       "regularizer": {"window": 8}}
GRIDS = [np.linspace(1.5, 6.0, 450),                       # the run's first: its grid
         np.linspace(1.4, 6.2, 380),                       # another length and spacing
         np.geomspace(1.5, 6.0, 520)]                      # log-spaced, as USAXS writes


def test_resample_is_exact_on_a_line_and_propagates_errors():
    q = np.array([1.0, 2.0, 4.0])
    got_i, got_s = resample_profile(q, 3 * q + 1, np.array([0.3, 0.4, 1.2]), np.array([0.5, 1.5, 3.0, 4.0, 4.5]))
    np.testing.assert_allclose(got_i[1:4], [5.5, 10.0, 13.0])
    np.testing.assert_allclose(got_s[1:4], [np.hypot(0.15, 0.2), np.hypot(0.2, 0.6), 1.2])
    assert np.isnan(got_i[[0, 4]]).all() and np.isnan(got_s[[0, 4]]).all()      # no extrapolation


@pytest.mark.slow
def test_profiles_on_their_own_grids_all_fitted(free_port):
    n = 24
    service = Service(load_settings(None, ingest={"address": f"tcp://127.0.0.1:{free_port()}"},
                                    tiled={"enabled": False}, results={"address": None},
                                    api={"port": free_port()}, fit=FIT)).start()
    try:
        cycle, rng = AzoCycle(schedule=((0.0, "dark"), (5.0, "uv"))), np.random.default_rng(4)
        bundle = compose_run(metadata={"plan_name": "profiles"})
        desc = bundle.compose_descriptor(name="primary", data_keys={
            k: {"source": "sim", "dtype": "array", "shape": [450]} for k in ("q", "intensity", "sigma")}).descriptor_doc
        service.router.route("start", bundle.start_doc)
        service.router.route("descriptor", desc)
        truth = {}
        for i in range(n):
            q = GRIDS[i % 3]
            counts = rng.poisson(20 * cycle.profile(q, float(i))).astype(float)
            sigma = np.sqrt(np.maximum(counts, 1))
            if i % 3 == 2:
                counts[100:104] = np.nan                   # dead points
            truth[i + 1] = float(cycle.truth(float(i))["lamellar"]["center"])
            t = float(i)
            service.router.route("event", {"uid": f"e{i}", "descriptor": desc["uid"], "seq_num": i + 1, "time": t,
                                           "data": {"q": q, "intensity": counts, "sigma": sigma},
                                           "timestamps": {"q": t, "intensity": t, "sigma": t}, "filled": {}})
        service.router.route("stop", bundle.compose_stop())
        rec = wait_stopped(service, bundle.start_doc["uid"], 60)
        assert rec.status == "complete" and not rec.failed
        assert rec.frames_received == rec.frames_fitted == rec.frames_final == n
        assert service.metrics.profiles_resampled._value.get() == 16
        cols, _ = service.store.peaks_since(rec.uid, 0, final=False)
        seq, centre, err = (np.array(cols[k]) for k in ("seq_num", "center", "center_err"))
        z = (centre - np.array([truth[s] for s in seq])) / err
        print(f"pulls by grid: {[f'{np.std(z[(seq - 1) % 3 == g]):.2f}' for g in range(3)]}")
        assert sorted(seq) == list(range(1, n + 1))
        assert np.all(np.abs(z) < 4) and 0.5 < np.std(z) < 1.5
    finally:
        service.close()
