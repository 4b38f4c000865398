"""Modalities through the running service (real 0MQ ingest, worker process, hub, REST):
a GIWAXS run (pi-pi centre from the out-of-plane wedge vs the simulator's truth; the published
q-map's missing wedge where ``workers.grazing.missing_wedge_qxy`` puts it, over REST), a GISAXS
run (rod centre on the Yoneda cut, Yoneda band of the vertical cut vs truth), and a SAXS+WAXS
run with two detectors in one run (one analysis each, every frame fitted, peaks vs truth).
Then the Tiled layout of the extras with a real embedded Tiled server (slow), and the grazing
reduction on CUDA against the CPU (``gpu``).

Frames come from the simulators of service/sim (GrazingFrameSimulator, FrameSimulator) on small
detectors; truth from their AzoCycle.
"""
from __future__ import annotations

import functools
import math
import socket
import time

import httpx
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from event_model import compose_run

from service.config import load_settings
from service.server import Service
from service.sim.azopolymer import AzoCycle
from service.sim.frames import FrameSimulator, poni_dict
from service.sim.grazing import GrazingFrameSimulator
from workers.geometry import Geometry
from workers.grazing import GrazingGeometry, missing_wedge_qxy

from helpers import wait_stopped

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]   # small fits: one thread is faster
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)

AI, AC = 3.5e-3, 1.8e-3          # incidence and critical angle, rad
PX = 4 * 172e-6                  # 4x4-binned Pilatus pixels
N_FRAMES = 16
TIMES = np.arange(N_FRAMES, dtype=float)      # s; UV from 2 s: crystalline -> mostly amorphous


def cycle() -> AzoCycle:
    return AzoCycle(schedule=((0.0, "dark"), (2.0, "uv")))


def giwaxs_geometry() -> Geometry:
    return Geometry(dist=0.15, poni1=0.005, poni2=0.0533, detector="Detector", pixel1=PX, pixel2=PX,
                    shape=(122, 155), wavelength=1e-10)


def gisaxs_geometry() -> Geometry:
    """Fine vertical pixels (Yoneda band resolved), coarse horizontal ones (rods at ±3.2 1/nm)."""
    return Geometry(dist=0.5, poni1=0.002, poni2=0.045, detector="Detector", pixel1=172e-6,
                    pixel2=5e-4, shape=(150, 180), wavelength=1e-10)


def transmission_geometry(dist: float) -> Geometry:
    """200 x 200 2x-binned Pilatus pixels, beam in the middle."""
    return Geometry(dist=dist, poni1=0.0344, poni2=0.0344, detector="Detector", pixel1=344e-6,
                    pixel2=344e-6, shape=(200, 200), wavelength=1e-10)


def peak(name, center, fwhm, lo, hi, wlo, whi):
    return {"name": name, "shape": "pseudo_voigt", "center": center, "fwhm": fwhm, "center_min": lo,
            "center_max": hi, "fwhm_min": wlo, "fwhm_max": whi}


PI_PI_FIT = {"q_range": [10.5, 20.5], "background": {"kind": "power_law"},
             "peaks": [peak("halo", 14.0, 5.0, 12.0, 16.0, 2.0, 9.0), peak("pi_pi", 17.5, 1.0, 16.5, 18.5, 0.2, 3.0)]}
LAMELLAR_FIT = {"q_range": [2.2, 4.2], "background": {"kind": "power_law"},
                "peaks": [peak("lamellar", 3.2, 0.2, 2.7, 3.6, 0.03, 1.0)]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service_and_socket(tmp_path_factory):
    port = _port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"}, tiled={"enabled": False},
                             results={"address": None}, api={"port": _port()}, phases={"enabled": False},
                             fit={"regularizer": {"window": 4}})
    service = Service(settings).start()
    time.sleep(1.0)                                   # 0MQ slow joiner
    yield service, pub
    service.close()
    pub.close(linger=0)


def send(pub, name, doc):
    pub.send(b" " + name.encode() + b" " + pack(doc))


def run_frames(pub, frames: dict, md: dict, times=TIMES) -> str:
    """One run whose events carry every field of `frames` ({field: simulator}) and the time."""
    bundle = compose_run(metadata={"plan_name": "modality_test", **md})
    sims = {f: s for f, s in frames.items()}
    keys = {f: {"source": "sim", "dtype": "array", "shape": list(s.shape), "dtype_numpy": "<i4"}
            for f, s in sims.items()}
    keys["t"] = {"source": "sim", "dtype": "number", "shape": []}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    send(pub, "start", bundle.start_doc)
    send(pub, "descriptor", desc.descriptor_doc)
    for i, t in enumerate(times):
        data = {f: s.frame(float(t)) for f, s in sims.items()}
        data["t"] = float(t)
        send(pub, "event", desc.compose_event(data=data, timestamps={k: 0.0 for k in data}, seq_num=i + 1))
        time.sleep(0.01)
    send(pub, "stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


def final_rows(service, key, name):
    cols, _ = service.store.peaks_since(key, 0, final=True)
    idx = [i for i, p in enumerate(cols["peak"]) if p == name]
    seq = np.array([cols["seq_num"][i] for i in idx])
    order = np.argsort(seq)
    pick = lambda c: np.array([cols[c][i] for i in idx], dtype=float)[order]
    return seq[order], pick("center"), pick("center_err")


def peak_height(q, y, centre, half=3.0, gap=1.5):
    """Peak height above a straight line through the flanks (centre ± [gap, half])."""
    flank = (np.abs(q - centre) > gap) & (np.abs(q - centre) < half) & np.isfinite(y)
    line = np.polyval(np.polyfit(q[flank], y[flank], 1), q)
    return np.nanmax((y - line)[np.abs(q - centre) < 0.3])


def rest(service, path):
    r = httpx.get(f"http://127.0.0.1:{service.api_port}/api/v1/{path}", timeout=30, trust_env=False)
    r.raise_for_status()
    return r


def test_giwaxs_run_fits_pi_pi_and_publishes_qmap_with_missing_wedge(service_and_socket):
    service, pub = service_and_socket
    g = giwaxs_geometry()
    sim = GrazingFrameSimulator(GrazingGeometry(g, incident_angle=AI), cycle(), mode="giwaxs",
                                critical_angle=AC, flux=5.0, seed=2)
    rxy, rz, npt = (-4.0, 4.0), (4.0, 16.0), (60, 60)
    md = {"geometry": poni_dict(g.to_pyfai()), "scatterflow": {
        "modality": "GIWAXS", "incident_angle": AI, "fit": PI_PI_FIT,
        "reduction": {"npt": 60, "radial_range": [10.0, 21.0], "qmap_npt": list(npt), "qmap_q_xy_range": list(rxy),
                      "qmap_q_z_range": list(rz), "snapshot_every": 5}}}
    uid = run_frames(pub, {"giwaxs_image": sim}, md)
    run = wait_stopped(service, uid)
    assert run.status == "complete" and run.frames_fitted == N_FRAMES and not run.failed
    assert run.info["modality"] == "giwaxs" and run.unit == "q_nm^-1"

    # fitted pi-pi centre on the out-of-plane wedge follows the truth (17.5 -> 17.2 1/nm here)
    seq, center, err = final_rows(service, uid, "pi_pi")
    truth = np.array([cycle().truth(TIMES[s - 1])["pi_pi"]["center"] for s in seq])
    assert list(seq) == list(range(1, N_FRAMES + 1)) and truth.max() - truth.min() > 0.25
    assert np.all(np.abs(center - truth) < 0.03), np.c_[seq, center, truth, err]   # 1/10 of a pixel in q

    # the published q-map (REST) is empty where the Ewald sphere leaves the missing wedge
    body = rest(service, f"runs/{uid}/qmap").json()
    assert body["seq_num"] == 15 and body["dims"] == ["q_z", "q_xy"]      # frames 1, 5, 10, 15 mapped
    q_xy, q_z = np.array(body["q_xy"]), np.array(body["q_z"])
    img = np.array([[np.nan if v is None else v for v in row] for row in body["intensity"]])
    assert img.shape == (npt[1], npt[0]) and np.allclose(q_xy[[0, -1]], rxy + np.diff(rxy) / npt[0] * [0.5, -0.5], atol=1e-4)
    pix = 2e-9 * math.pi / g.wavelength * PX / g.dist                 # a pixel's extent in q, 1/nm
    dxy, dz = np.diff(q_xy).mean(), np.diff(q_z).mean()
    bound = lambda qz: missing_wedge_qxy(qz, incident_angle=AI, wavelength=g.wavelength)
    empty = (np.abs(q_xy)[None, :] + dxy / 2) < bound(q_z - dz / 2 - pix)[:, None]
    full = (np.abs(q_xy)[None, :] - dxy / 2) > bound(q_z + dz / 2 + pix)[:, None] + pix
    assert empty.sum() > 50 and full.sum() > 1000
    assert np.isnan(img[empty]).all() and np.isfinite(img[full]).all()
    png = rest(service, f"runs/{uid}/qmap.png?size=400")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"

    # extras: in-plane wedge and a face-on Hermans orientation (pi-pi stacking along the normal)
    extras = rest(service, f"runs/{uid}/extras").json()
    assert set(extras["profiles"]) == {"in_plane"} and extras["qmap"] == {"seq_num": 15}
    latest, ip = rest(service, f"runs/{uid}/latest").json(), extras["profiles"]["in_plane"]
    assert latest["seq_num"] == ip["seq_num"] == N_FRAMES and latest["radial"] == ip["radial"]
    q, centre = np.array(ip["radial"]), cycle().truth(TIMES[-1])["pi_pi"]["center"]
    heights = [peak_height(q, np.array(p, dtype=float), centre) for p in (latest["intensity"], ip["intensity"])]
    assert heights[0] > 3 * max(heights[1], 1e-9)     # face-on: the fitted (out-of-plane) wedge holds the ring
    f = extras["scalars"]["hermans_orientation"]
    assert f["seq_num"] == list(range(1, N_FRAMES + 1)) and 0.2 < f["value"][0] < 1.0


def test_gisaxs_run_fits_rod_on_yoneda_cut(service_and_socket):
    service, pub = service_and_socket
    g = gisaxs_geometry()
    sim = GrazingFrameSimulator(GrazingGeometry(g, incident_angle=AI), cycle(), mode="gisaxs",
                                critical_angle=AC, flux=20.0, seed=3)
    md = {"geometry": poni_dict(g.to_pyfai()), "scatterflow": {
        "modality": "gisaxs", "incident_angle": AI, "critical_angle": AC, "fit": LAMELLAR_FIT,
        "reduction": {"npt": 220, "radial_range": [-5.5, 5.5], "qmap_npt": [110, 75], "qmap_q_z_range": [0.0, 1.5],
                      "rod_q_xy_band": [2.9, 3.5]}}}
    uid = run_frames(pub, {"gisaxs_image": sim}, md, times=TIMES[:12])
    run = wait_stopped(service, uid)
    assert run.status == "complete" and run.frames_fitted == 12 and not run.failed
    assert run.info["modality"] == "gisaxs" and run.unit == "qxy_nm^-1"
    seq, center, err = final_rows(service, uid, "lamellar")
    truth = sim.truth(TIMES[seq - 1])
    assert list(seq) == list(range(1, 13))
    assert np.all(np.abs(center - truth["rod_center"]) < 0.02), np.c_[seq, center, truth["rod_center"], err]
    # the vertical cut along the rod peaks at the Yoneda band, q_z = k (sin αi + sin αc)
    cut = rest(service, f"runs/{uid}/extras").json()["profiles"]["vertical_cut"]
    z = np.array(cut["radial"])
    y = np.array([np.nan if v is None else v for v in cut["intensity"]])
    pixel_qz = 2e-9 * math.pi / g.wavelength * g.pixel1 / g.dist
    assert cut["unit"] == "qz_nm^-1" and abs(z[np.nanargmax(y)] - float(truth["yoneda_qz"][0])) < pixel_qz


def test_saxs_and_waxs_detectors_in_one_run(service_and_socket):
    service, pub = service_and_socket
    cyc = cycle()
    saxs_g, waxs_g = transmission_geometry(0.5), transmission_geometry(0.1)
    saxs = FrameSimulator(saxs_g, cyc, flux=3.0, seed=4)
    waxs = FrameSimulator(waxs_g, cyc, flux=3.0, seed=5)
    md = {"scatterflow": {
        "saxs_image": {"geometry": poni_dict(saxs_g.to_pyfai()), "modality": "saxs", "fit": LAMELLAR_FIT,
                       "reduction": {"npt": 200, "radial_range": [1.5, 5.0]}},
        "waxs_image": {"geometry": poni_dict(waxs_g.to_pyfai()), "modality": "waxs", "fit": PI_PI_FIT,
                       "reduction": {"npt": 200, "radial_range": [8.0, 21.0]}}}}
    uid = run_frames(pub, {"saxs_image": saxs, "waxs_image": waxs}, md)
    keys = {d: f"{uid}.{d}_image" for d in ("saxs", "waxs")}
    runs = {d: wait_stopped(service, k) for d, k in keys.items()}
    assert service.store.get(uid) is None                     # no analysis of the run as a whole
    listed = {r["uid"]: r for r in rest(service, "runs").json()["runs"]}
    for d, key in keys.items():
        r = runs[d]
        assert r.status == "complete" and r.frames_fitted == N_FRAMES and r.frames_final == N_FRAMES and not r.failed
        assert listed[key]["source_run"] == uid and listed[key]["detector"] == f"{d}_image"
        assert listed[key]["modality"] == d
    for d, name, tol in (("saxs", "lamellar", 0.01), ("waxs", "pi_pi", 0.05)):
        seq, center, err = final_rows(service, keys[d], name)
        truth = np.array([cyc.truth(TIMES[s - 1])[name]["center"] for s in seq])
        assert list(seq) == list(range(1, N_FRAMES + 1))
        ok = np.array([cyc.truth(TIMES[s - 1])[name]["area"] for s in seq]) > 15   # a peak to fit
        assert ok.sum() >= 8 and np.all(np.abs(center - truth)[ok] < tol), (d, np.c_[seq, center, truth, err])
    assert rest(service, f"runs/{keys['waxs']}/profiles?limit=1").json()["radial"][0] >= 8.0


@pytest.mark.slow
def test_extras_reach_tiled_per_detector_container(tmp_path, shared_tiled):
    """Hub + TiledPublisher + embedded Tiled (the session's): a detector's container
    ``scatterflow/<uid>.<field>`` with source_run/detector metadata, the q-maps (NaN kept) with
    their axes and frames, the in-plane profiles and the scalar table, read back by a fresh
    client equal to what the worker produced."""
    pytest.importorskip("tiled")
    import uuid

    from tiled.client import from_uri

    from service.detectors import detector_start
    from service.messages import Frame
    from service.metrics import Metrics
    from service.publish.hub import PublishHub
    from service.publish.state import RunStore
    from service.publish.tiled import TiledPublisher
    from service.run_spec import RunSpecBuilder
    from workers.pipeline import IntegratorCache, RunPipeline

    g = giwaxs_geometry()
    sim = GrazingFrameSimulator(GrazingGeometry(g, incident_angle=AI), cycle(), mode="giwaxs",
                                critical_angle=AC, flux=5.0, seed=6)
    uid, field = f"run-{uuid.uuid4().hex[:8]}", "giwaxs_image"      # a server shared with other tests
    key = f"{uid}.{field}"
    start = detector_start({"uid": uid, "scatterflow": {
        field: {"modality": "giwaxs", "incident_angle": AI, "fit": {**PI_PI_FIT, "regularizer": {"window": 2}},
                "reduction": {"npt": 40, "radial_range": [10.0, 21.0], "qmap_npt": [30, 20], "snapshot_every": 2}},
        "other_image": {"modality": "saxs"}}}, field, key)
    spec = RunSpecBuilder(load_settings(None)).build(start, calibrated=g)
    pipe = RunPipeline(spec, "cpu", IntegratorCache())
    seqs = [np.array([1, 2]), np.array([3, 4])]
    outs = [pipe.process(q, 1e9 + q, np.stack([sim.frame(float(x)) for x in q])) for q in seqs]
    server = shared_tiled
    pub = TiledPublisher(server.uri, server.api_key, spool_dir=tmp_path / "spool", flush_rows=50)
    hub = PublishHub(RunStore(), Metrics(), tiled=pub)
    hub.run_started(key, start, spec)
    for q, out in zip(seqs, outs):
        hub.frames_reduced(key, [Frame(key, int(x), 1e9 + x, None, 0.0, {}) for x in q], out)
    hub.run_stopped(key, {"exit_status": "success"}, None)
    assert pub.drain(60)
    pub.close()
    assert pub.errors == 0
    node = from_uri(server.uri, api_key=server.api_key)["scatterflow"][key]
    md = node.metadata
    assert (md["source_run"], md["detector"], md["modality"]) == (uid, field, "giwaxs")
    assert md["analysis"]["reduction"]["incident_angle"] == AI
    maps = [m for out in outs for m in out.qmaps.images]
    assert [s for s, _ in maps] == [1, 2, 4]                    # first frame, then seq % 2 == 0
    stored = node["qmap"].read()
    assert stored.shape == (3, 20, 30) and np.isnan(stored).any()
    np.testing.assert_array_equal(stored, np.stack([m for _, m in maps]))
    np.testing.assert_array_equal(node["q_xy"].read(), outs[0].qmaps.q_xy)
    np.testing.assert_array_equal(node["q_z"].read(), outs[0].qmaps.q_z)
    assert node["qmap_frames"].read()["seq_num"].tolist() == [1, 2, 4]
    ip = np.concatenate([out.extra_profiles["in_plane"].intensity for out in outs])
    np.testing.assert_array_equal(node["in_plane"].read(), ip)
    assert node["in_plane_sigma"].read().shape == ip.shape == (4, 40)
    np.testing.assert_array_equal(node["in_plane_radial"].read(), outs[0].extra_profiles["in_plane"].radial)
    table = node["scalars"].read()
    assert table["seq_num"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(table["hermans_orientation"].to_numpy(),
                               np.concatenate([out.scalars["hermans_orientation"] for out in outs]))


@pytest.mark.gpu
def test_grazing_reduction_cuda_matches_cpu():
    from service.run_spec import RunSpecBuilder
    from workers.pipeline import IntegratorCache, RunPipeline

    g = giwaxs_geometry()
    sim = GrazingFrameSimulator(GrazingGeometry(g, incident_angle=AI), cycle(), mode="giwaxs",
                                critical_angle=AC, flux=5.0, seed=7)
    spec = RunSpecBuilder(load_settings(None)).build(
        {"uid": "u", "scatterflow": {"modality": "giwaxs", "incident_angle": AI, "fit": PI_PI_FIT,
                                     "reduction": {"npt": 60, "qmap_npt": [40, 30], "snapshot_every": 2}}},
        calibrated=g)
    frames = np.stack([sim.frame(float(t)) for t in range(4)])
    seq = np.arange(1, 5)
    cpu = RunPipeline(spec, "cpu", IntegratorCache()).reduce(seq, seq * 1.0, frames)
    gpu = RunPipeline(spec, "cuda", IntegratorCache()).reduce(seq, seq * 1.0, frames)
    assert gpu.intensity.device.type == "cuda"
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6, equal_nan=True)
    close(gpu.intensity.cpu().numpy(), cpu.intensity.numpy())
    close(gpu.result.extra_profiles["in_plane"].intensity, cpu.result.extra_profiles["in_plane"].intensity)
    close(gpu.result.scalars["hermans_orientation"], cpu.result.scalars["hermans_orientation"])
    assert [q for q, _ in gpu.result.qmaps.images] == [1, 2, 4]
    for (_, a), (_, b) in zip(gpu.result.qmaps.images, cpu.result.qmaps.images):
        close(a, b)


def test_qmap_routes_and_event_in_process():
    """REST q-map routes and the dashboard's SSE ``qmap`` event on a store holding one map
    (no service): NaN as null, 404 before any map, a PNG of the requested width."""
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from service.api import build_app
    from service.metrics import Metrics
    from workers.pipeline import QMaps
    from service.publish.state import RunStore

    store = RunStore()
    store.start_run("r.det", {"uid": "r"})
    store.set_info("r.det", {"modality": "giwaxs", "source_run": "r", "detector": "det"})
    client = TestClient(build_app(store, Metrics(), dict, stream_interval_s=0.01, stream_max_s=0.2))
    assert client.get("/api/v1/runs/r.det/qmap").status_code == 404
    q_xy, q_z = np.linspace(-2, 2, 5), np.linspace(0, 3, 4)
    image = np.arange(20, dtype=np.float32).reshape(4, 5) + 1
    image[1:, 2] = np.nan                                          # a missing wedge
    store.add_extras("r.det", np.array([7, 8]), QMaps(q_xy, q_z, [(8, image)]), {}, {"f": np.array([0.5, np.nan])})
    body = client.get("/api/v1/runs/r.det/qmap").json()
    assert body["seq_num"] == 8 and body["q_xy"] == q_xy.tolist() and body["q_z"] == q_z.tolist()
    assert body["intensity"][0] == [1.0, 2.0, 3.0, 4.0, 5.0] and body["intensity"][2][2] is None
    png = client.get("/api/v1/runs/r.det/qmap.png?size=300")
    assert png.status_code == 200 and png.headers["x-seq-num"] == "8"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.format == "PNG" and im.size[0] == 300
    assert client.get("/api/v1/runs/r.det/extras").json()["scalars"] == {"f": {"seq_num": [7, 8], "value": [0.5, None]}}
    summary = client.get("/api/v1/runs/r.det").json()
    assert (summary["modality"], summary["source_run"], summary["detector"]) == ("giwaxs", "r", "det")
    with client.stream("GET", "/api/v1/events") as r:
        text = r.read().decode()
    events = [json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if b.startswith("event: qmap")]
    assert events == [{"uid": "r.det", "seq_num": 8}]
