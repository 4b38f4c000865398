"""Simulated beamline: frames checked with pyFAI, kinetics against the analytic solution, and
the ophyd devices under a real bluesky RunEngine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.optimize import curve_fit

from service.sim import AzoCycle, FrameSimulator, default_geometry, poni_dict, write_default_poni
from service.sim.azopolymer import pseudo_voigt

TAU_UV, TAU_VIS, FLOOR = 8.0, 10.0, 0.1
SCHEDULE = ((0.0, "dark"), (10.0, "uv"), (40.0, "visible"), (70.0, "dark"))


def analytic_crystallinity(t: np.ndarray) -> np.ndarray:
    """x(t) for SCHEDULE written out by hand: 1, then exp decay to FLOOR, then recovery to 1."""
    t = np.asarray(t, float)
    x_uv = FLOOR + (1 - FLOOR) * np.exp(-(t - 10.0) / TAU_UV)
    x40 = FLOOR + (1 - FLOOR) * math.exp(-30.0 / TAU_UV)
    x_vis = 1.0 + (x40 - 1.0) * np.exp(-(t - 40.0) / TAU_VIS)
    x70 = 1.0 + (x40 - 1.0) * math.exp(-30.0 / TAU_VIS)
    return np.select([t < 10, t < 40, t < 70], [np.ones_like(t), x_uv, x_vis], x70)


@pytest.fixture(scope="module")
def ai():
    return default_geometry()


@pytest.fixture(scope="module")
def cycle():
    return AzoCycle(tau_uv=TAU_UV, tau_vis=TAU_VIS, crystallinity_floor=FLOOR, schedule=SCHEDULE)


@pytest.fixture(scope="module")
def sim(ai, cycle):
    return FrameSimulator(ai, cycle, seed=5, polarization_factor=0.95)


def _mask(sim, frame):
    return sim.gap_mask | (frame < 0) | sim.beamstop_mask


# ---- geometry --------------------------------------------------------------------------
def test_default_geometry_and_poni_roundtrip(ai, sim, tmp_path):
    import pyFAI

    assert ai.detector.shape == (619, 487)
    assert ai.detector.pixel1 == pytest.approx(172e-6) and ai.wavelength == pytest.approx(1e-10)
    assert ai.detector.mask.sum() == 2 * 17 * 487          # two horizontal module gaps
    q_seen = sim.q[~sim.mask]
    assert 1.2 < q_seen.min() < 1.8 and 19.5 < q_seen.max() < 21.0
    path = write_default_poni(tmp_path / "demo.poni")
    loaded = pyFAI.load(path)
    for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength"):
        assert getattr(loaded, key) == pytest.approx(getattr(ai, key), abs=1e-12)
    assert poni_dict(loaded) == poni_dict(ai)
    # a PONI path works as geometry too
    assert np.allclose(FrameSimulator(path, AzoCycle(), seed=0).q, sim.q)


# ---- frames ----------------------------------------------------------------------------
def test_frame_format(sim):
    frame = sim.frame(5.0)
    assert frame.dtype == np.int32 and frame.shape == (619, 487)
    assert np.array_equal(frame < 0, sim.gap_mask) and np.all(frame[sim.gap_mask] == -1)
    assert frame[sim.beamstop_mask].mean() < 0.1            # beamstop: near zero counts
    live = frame[~sim.mask]
    assert 10 < np.median(live) < 100                        # realistic counts per pixel
    assert 100 < np.percentile(live, 99.9) < 1000            # lamellar ring: hundreds
    hot = FrameSimulator(sim.ai, sim.cycle, seed=1, hot_pixels=3)
    assert np.sum(hot.frame(5.0) >= 1_000_000) == 3 and hot.mask.sum() == sim.mask.sum() + 3


@pytest.mark.parametrize("t", [5.0, 25.0])
def test_integrated_frame_matches_model_within_poisson(sim, cycle, t):
    """pyFAI (no pixel splitting, solid angle + polarization f = 0.95, Poisson errors) returns
    flux x exposure x I(q, t) with chi²/dof ~ 1: the simulator applied pyFAI's corrections.
    The reference is the model averaged over the pixel centres falling in each bin."""
    frame = sim.frame(t)
    mask = _mask(sim, frame)

    def integ(pol, solid=True):
        return sim.ai.integrate1d_ng(
            frame, 600, unit="q_nm^-1", method=("no", "histogram", "cython"), mask=mask,
            polarization_factor=pol, correctSolidAngle=solid, error_model="poisson",
            radial_range=(1.8, 20.0))

    res = integ(0.95)
    q = res.radial
    dq = q[1] - q[0]
    edges = np.concatenate([q - dq / 2, [q[-1] + dq / 2]])
    q_pix = sim.q[~mask]
    count, _ = np.histogram(q_pix, edges)
    total, _ = np.histogram(q_pix, edges, weights=cycle.profile(q_pix, t))
    # pyFAI's histogram engine folds pixels just outside radial_range into the edge bins
    keep = (count > 20) & (np.arange(q.size) > 0) & (np.arange(q.size) < q.size - 1)
    ref = sim.scale * total[keep] / count[keep]

    def chi2(r):
        return float(np.mean(((r.intensity[keep] - ref) / r.sigma[keep]) ** 2))

    assert keep.sum() > 500
    assert 0.85 < chi2(res) < 1.15
    # the same check has power: unpolarised or no solid-angle correction fail it
    assert chi2(integ(0.0)) > 1.5
    assert chi2(integ(0.95, solid=False)) > 10


def _pv_quadratic(q, c, w, a, eta, b0, b1, b2):
    return pseudo_voigt(q, c, w, a, eta) + b0 + b1 * (q - 3.2) + b2 * (q - 3.2) ** 2


@pytest.mark.parametrize("t", [5.0, 15.0, 60.0])
def test_lamellar_center_from_fit(sim, cycle, t):
    frame = sim.frame(t)
    res = sim.ai.integrate1d_ng(frame, 400, unit="q_nm^-1", method=("bbox", "csr", "cython"),
                                mask=_mask(sim, frame), polarization_factor=0.95,
                                error_model="poisson", radial_range=(2.5, 4.0))
    popt, _ = curve_fit(_pv_quadratic, res.radial, res.intensity, sigma=res.sigma,
                        p0=[3.1, 0.25, 30.0, 0.5, 20.0, 0.0, 0.0],
                        bounds=([2.8, 0.02, 0, 0, -np.inf, -np.inf, -np.inf],
                                [3.5, 1.0, np.inf, 1, np.inf, np.inf, np.inf]))
    truth = cycle.truth(t)["lamellar"]
    assert abs(popt[0] - float(truth["center"])) < 0.01
    assert popt[1] == pytest.approx(float(truth["fwhm"]), rel=0.1)   # pixel size broadens ~3 %


def test_frame_speed_and_normal_noise(sim):
    import time

    fast = FrameSimulator(sim.ai, sim.cycle, seed=2, noise="normal")
    fast.frame(1.0)
    t0 = time.perf_counter()
    frame = fast.frame(1.0)
    assert time.perf_counter() - t0 < 0.5                    # generous: shared 2-core machine
    live = ~sim.mask
    lam = fast.expected(1.0)[live]
    z = (frame[live] - lam) / np.sqrt(lam)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


# ---- model and kinetics ----------------------------------------------------------------
def test_pseudo_voigt_area_and_fwhm():
    area, _ = integrate.quad(lambda q: pseudo_voigt(q, 3.2, 0.18, 60.0, 0.3), -np.inf, np.inf)
    assert area == pytest.approx(60.0, rel=1e-6)
    peak = pseudo_voigt(3.2, 3.2, 0.18, 60.0, 0.3)
    assert pseudo_voigt(3.2 + 0.09, 3.2, 0.18, 60.0, 0.3) == pytest.approx(peak / 2, rel=1e-9)


def test_crystallinity_follows_analytic_exponential(cycle):
    t = np.linspace(-5, 90, 400)
    assert np.allclose(cycle.crystallinity(t), analytic_crystallinity(t), atol=1e-12)
    truth = cycle.truth(t)
    lights = cycle.truth(np.array([-1.0, 5.0, 20.0, 50.0, 80.0]))["light"]
    assert list(lights) == ["dark", "dark", "uv", "visible", "dark"]
    assert truth["phase"][0] == "crystalline" and truth["phase"][int(np.searchsorted(t, 39))] == "amorphous"
    assert "transition" in set(truth["phase"])
    lam = truth["lamellar"]
    assert lam["center"][0] == pytest.approx(3.2) and lam["center"].min() == pytest.approx(3.0, abs=0.01)
    assert lam["fwhm"].max() > 2 * lam["fwhm"][0]
    assert np.all(np.diff(truth["halo"]["area"][(t > 10) & (t < 40)]) > 0)     # halo grows under UV
    # profile at the peak = background + peaks, shapes (N,) and (T, N)
    assert cycle.profile(np.array([3.2, 17.5]), 0.0).shape == (2,)
    assert cycle.profile(np.array([3.2, 17.5]), t[:5]).shape == (5, 2)


def test_step_option_and_dark_relaxation():
    step = AzoCycle(step=True, crystallinity_floor=FLOOR, schedule=SCHEDULE)
    x = step.crystallinity(np.array([9.99, 10.0, 39.9, 40.0, 75.0]))
    assert np.allclose(x, [1.0, FLOOR, FLOOR, 1.0, 1.0])
    relax = AzoCycle(tau_dark=20.0, schedule=((0.0, "uv"), (30.0, "dark")))
    x30 = FLOOR + (1 - FLOOR) * math.exp(-30.0 / 8.0)
    assert relax.crystallinity(50.0) == pytest.approx(1 + (x30 - 1) * math.exp(-1.0))


def test_set_light_follows_actual_history(cycle):
    live = AzoCycle(tau_uv=TAU_UV, tau_vis=TAU_VIS, crystallinity_floor=FLOOR)
    live.restart("dark")
    for t0, light in SCHEDULE[1:]:
        live.set_light(t0, light)
    t = np.linspace(0, 90, 91)
    assert np.allclose(live.crystallinity(t), cycle.crystallinity(t), atol=1e-12)
    # switching back early: continuous, and the dropped future schedule no longer applies
    live.set_light(20.0, "visible")
    x20 = FLOOR + (1 - FLOOR) * math.exp(-10.0 / TAU_UV)
    assert live.crystallinity(20.0) == pytest.approx(x20)
    assert live.crystallinity(45.0) == pytest.approx(1 + (x20 - 1) * math.exp(-25.0 / TAU_VIS))


@pytest.mark.parametrize("kwargs", [dict(tau_uv=0), dict(tau_vis=-1), dict(crystallinity_floor=1.0),
                                    dict(schedule=((0, "infrared"),)), dict(schedule=((5, "uv"), (1, "dark")))])
def test_bad_cycle_options_rejected(kwargs):
    with pytest.raises(ValueError, match="tau_uv|tau_vis|floor|infrared|sorted"):
        AzoCycle(**kwargs)


def test_bad_simulator_options_rejected(ai):
    with pytest.raises(ValueError, match="flux"):
        FrameSimulator(ai, AzoCycle(), flux=0)
    with pytest.raises(ValueError, match="noise"):
        FrameSimulator(ai, AzoCycle(), noise="gaussian")


# ---- ophyd + bluesky -------------------------------------------------------------------
def test_plan_under_run_engine(ai):
    from bluesky import RunEngine

    from service.sim import make_beamline, operando_cycle

    cycle = AzoCycle(tau_uv=TAU_UV, tau_vis=TAU_VIS, crystallinity_floor=FLOOR)
    det, light = make_beamline(ai, cycle, frame_interval=0.5, seed=7)
    docs: list[tuple[str, dict]] = []
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    schedule = [(0, "dark"), (4, "uv"), (8, "visible")]
    (uid,) = RE(operando_cycle(det, light, n_frames=12, schedule=schedule, md={"operator": "test"}))

    names = [n for n, _ in docs]
    assert names[0] == "start" and names[1] == "descriptor" and names[-1] == "stop"
    start = docs[0][1]
    assert start["uid"] == uid and start["detectors"] == ["det"] and start["plan_name"] == "operando_cycle"
    assert start["light_schedule"] == [[0, "dark"], [4, "uv"], [8, "visible"]]
    assert start["light_schedule_s"][1] == [2.0, "uv"]
    assert start["geometry"] == poni_dict(ai) and start["modality"] == "WAXS"
    assert start["operator"] == "test" and start["simulation"]["detector_field"] == "det_image"
    key = docs[1][1]["data_keys"]["det_image"]
    assert key["shape"] == [619, 487] and key["dtype"] == "array" and key["dtype_numpy"] == "<i4"
    assert docs[-1][1]["exit_status"] == "success" and docs[-1][1]["num_events"]["primary"] == 12

    events = [d for n, d in docs if n == "event"]
    assert [e["seq_num"] for e in events] == list(range(1, 13))
    data = {k: np.array([e["data"][k] for e in events]) for k in events[0]["data"] if k != "det_image"}
    assert list(data["light_state"]) == ["dark"] * 4 + ["uv"] * 4 + ["visible"] * 4
    t = np.arange(12) * 0.5
    assert np.allclose(data["det_time_offset"], t)
    x8 = FLOOR + (1 - FLOOR) * math.exp(-2.0 / TAU_UV)
    expected = np.select([t < 2, t < 4], [np.ones_like(t), FLOOR + (1 - FLOOR) * np.exp(-(t - 2) / TAU_UV)],
                         1 + (x8 - 1) * np.exp(-(t - 4) / TAU_VIS))
    assert np.allclose(data["det_crystallinity_truth"], expected, atol=1e-12)
    assert np.allclose(data["det_lamellar_center_truth"], cycle.truth(t)["lamellar"]["center"])
    assert data["det_lamellar_center_truth"][7] < 3.2 - 0.03
    image = events[0]["data"]["det_image"]
    assert image.dtype == np.int32 and image.shape == (619, 487) and np.all(image[ai.detector.mask.astype(bool)] == -1)
    assert not np.array_equal(image, events[1]["data"]["det_image"])

    # a second run restarts the clock and the film
    docs.clear()
    RE(operando_cycle(det, light, n_frames=2, schedule=[(0, "uv")]))
    events = [d for n, d in docs if n == "event"]
    assert events[0]["data"]["det_time_offset"] == 0.0 and events[0]["data"]["det_crystallinity_truth"] == 1.0
    with pytest.raises(ValueError, match="infrared"):
        light.set("infrared")
    with pytest.raises(ValueError, match="beyond n_frames"):
        list(operando_cycle(det, light, n_frames=3, schedule=[(5, "uv")]))


def test_wall_clock_option(ai):
    from service.sim import make_beamline

    det, light = make_beamline(ai, AzoCycle(), wall_clock=True, seed=0)
    det.stage()
    light.set("uv")
    det.trigger()
    t1 = det.time_offset.get()
    det.trigger()
    det.unstage()
    assert 0.0 <= t1 < det.time_offset.get() < 5.0
    assert light.read()["light_state"]["value"] == "uv"


def test_hdf5_mode_documents_and_frames(ai, tmp_path):
    """Frames written to HDF5 as ophyd-async detectors do: documents valid by event-model's schemas
    (stream_resource on the first frame, one stream_datum per frame before its event, the image left
    out of the events), each row readable (SWMR) when its stream_datum is emitted, and the rows the
    very frames the inline detector sends for the same seed."""
    import h5py
    from bluesky import RunEngine
    from event_model import DocumentNames, schema_validators

    from service.sim import HDF5OperandoDetector, make_beamline, operando_cycle

    schedule, n = [(0, "dark"), (2, "uv")], 5
    rows_seen: dict[int, np.ndarray] = {}           # seq_num -> its row, read when its stream_datum came

    def run(hdf5_directory=None):
        det, light = make_beamline(ai, AzoCycle(tau_uv=TAU_UV), frame_interval=0.5, seed=11,
                                   hdf5_directory=hdf5_directory)
        docs: list[tuple[str, dict]] = []

        def collect(name, doc):
            docs.append((name, doc))
            if name == "stream_datum":
                with h5py.File(det.writer.path, "r", swmr=True) as f:
                    rows_seen[doc["seq_nums"]["start"]] = f["/entry/data/data"][doc["indices"]["start"]]
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(collect)
        (uid,) = RE(operando_cycle(det, light, n_frames=n, schedule=schedule))
        return det, light, RE, uid, docs

    *_, inline_docs = run()
    inline_events = [d for name, d in inline_docs if name == "event"]
    frames = [e["data"]["det_image"] for e in inline_events]
    det, light, RE, uid, docs = run(tmp_path)
    assert isinstance(det, HDF5OperandoDetector)

    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    assert [name for name, _ in docs] == ["start", "descriptor", "stream_resource", *["stream_datum", "event"] * n,
                                          "stop"]
    descriptor = docs[1][1]
    key = descriptor["data_keys"]["det_image"]
    assert key["external"] == "STREAM:" and key["shape"] == [1, 619, 487] and key["dtype_numpy"] == "<i4"
    (resource,) = [d for name, d in docs if name == "stream_resource"]
    path = det.writer.path
    assert path.parent == tmp_path.resolve() and path.suffix == ".h5"
    assert resource == {"uid": resource["uid"], "run_start": uid, "data_key": "det_image",
                        "mimetype": "application/x-hdf5", "uri": f"file://localhost{path}",
                        "parameters": {"dataset": "/entry/data/data", "chunk_shape": [1, 619, 487]}}
    datums = [d for name, d in docs if name == "stream_datum"]
    events = [d for name, d in docs if name == "event"]
    assert [d["indices"] for d in datums] == [{"start": i, "stop": i + 1} for i in range(n)]
    assert [d["seq_nums"] for d in datums] == [{"start": e["seq_num"], "stop": e["seq_num"] + 1} for e in events]
    assert all(d["descriptor"] == descriptor["uid"] and d["stream_resource"] == resource["uid"] for d in datums)
    # the events carry everything but the image, with the inline run's values
    assert all("det_image" not in e["data"] and not e["filled"] for e in events)
    for e, ref in zip(events, inline_events):
        assert e["data"] == {k: v for k, v in ref["data"].items() if k != "det_image"}

    # the rows are the inline frames, each one visible to a SWMR reader when its stream_datum was emitted
    with h5py.File(path, "r", swmr=True) as f:
        rows = f["/entry/data/data"][:]
        assert f["/entry/data/data"].chunks == (1, 619, 487)
    assert rows.dtype == np.int32 and rows.shape == (n, 619, 487)
    assert all(np.array_equal(rows[i], frames[i]) for i in range(n))
    assert sorted(rows_seen) == list(range(1, n + 1))
    assert all(np.array_equal(rows_seen[s], frames[s - 1]) for s in rows_seen)

    # a second run writes a file of its own; the first one is closed and keeps its rows
    docs.clear()
    RE(operando_cycle(det, light, n_frames=2, schedule=[(0, "uv")]))
    (second,) = [d for name, d in docs if name == "stream_resource"]
    assert second["uri"] != resource["uri"] and det.writer.path != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, det.writer.path.name])
    with h5py.File(path, "r") as f:
        assert f["/entry/data/data"].shape == (n, 619, 487)


def test_particle_detector_under_run_engine():
    """The growing-particles demo's detector: counted by a RunEngine, each event holds a frame
    of BornAgain's DWBA intensity (the simulator's expected counts, Poisson) and the radius the
    simulator grew to by then (linear in the simulated time, 1 s per frame)."""
    pytest.importorskip("bornagain")
    from bluesky import RunEngine
    from bluesky.plans import count

    from service.sim.devices import ParticleDetector
    from service.sim.gisaxs_particles import SI_12KEV, GisaxsParticleSimulator, particle_geometry

    sim = GisaxsParticleSimulator(particle_geometry(shape=(32, 32), pixel=1.1e-3), SI_12KEV, radius=(3.5, 6.0),
                                  duration=4.0, peak_counts=1e4, seed=2)
    det = ParticleDetector(name="det", simulator=sim)
    docs: list[tuple[str, dict]] = []
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(count([det], num=5))
    events = [d for n, d in docs if n == "event"]
    assert np.allclose([e["data"]["det_time_offset"] for e in events], np.arange(5.0))
    assert np.allclose([e["data"]["det_radius_truth"] for e in events], [3.5, 4.125, 4.75, 5.375, 6.0])
    assert {e["data"]["det_distance_truth"] for e in events} == {20.0}
    last = events[-1]["data"]["det_image"]
    expected = sim.expected(4.0)
    assert last.dtype == np.int32 and last.shape == (32, 32)
    lit = expected > 5.0                                           # above the horizon, counts to speak of
    z = (last[lit] - expected[lit]) / np.sqrt(expected[lit])
    assert lit.sum() > 200 and abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2     # Poisson around the expected counts
    assert np.all(last[expected == 0] == 0)
