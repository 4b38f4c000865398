"""Per-frame GISAXS inversion through the running service (real 0MQ ingest, worker process, REST,
results stream, a real Tiled): 2D detector frames of spheres growing on a radial paracrystal on
Si, rendered in the DWBA by BornAgain (service/sim/gisaxs_particles.py) with Poisson noise (a few
counts in most pixels: the fit's errors from the model's expected counts, not the observed); the
service remaps each frame to its (q_xy, q_z) map and fits the DWBA model there
(``inversion: {enabled, substrate}`` in the start document). Per frame the radius and distance
against the simulator's truth, their LM errors against the scatter (pulls), every frame once;
the same frames fitted in the Born approximation (start document: ``gisaxs: {model:
spheres_paracrystal}``) are flagged as not described."""
import functools
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
from service.sim.frames import poni_dict
from service.sim.gisaxs_particles import SI_12KEV, GisaxsParticleSimulator, particle_geometry

from helpers import analysis_table, stream_events, wait_stopped

pytest.importorskip("bornagain")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
N = 8
TIMES = np.linspace(0.0, 10.0, N)            # s; radius 3.5 -> 6 nm
AC = 2.5e-3                                  # rad, Si at 12.4 keV: sqrt(2 delta)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gisaxs_service(shared_tiled):
    port, results = _port(), f"tcp://127.0.0.1:{_port()}"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"}, api={"port": _port()},
                             tiled={"uri": shared_tiled.uri, "api_key": shared_tiled.api_key, "flush_seconds": 0.5},
                             results={"address": results}, fit={"peaks": []}, phases={"enabled": False})
    service = Service(settings).start()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(results)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    time.sleep(1.0)                                   # 0MQ slow joiner, both sockets
    yield service, pub, sub, shared_tiled
    service.close()
    pub.close(linger=0)
    sub.close(linger=0)


@pytest.fixture(scope="module")
def frames():
    sim = GisaxsParticleSimulator(particle_geometry(shape=(64, 64), pixel=5.6e-4), SI_12KEV, radius=(3.5, 6.0),
                                  duration=TIMES[-1], peak_counts=2e3, background=1e-3, seed=4)   # 2-20 counts
    return sim, [sim.frame(t) for t in TIMES]


def send_run(pub, sim, images, inversion: dict) -> str:
    hints = {"modality": "gisaxs", "incident_angle": sim.grazing.incident_angle, "critical_angle": AC,
             "reduction": {"rod_q_xy_band": [0.2, 0.4], "qmap_npt": [64, 64]}, "inversion": inversion}
    bundle = compose_run(metadata={"plan_name": "particle_growth", "scatterflow": hints,
                                   "geometry": poni_dict(sim.grazing.geometry.to_pyfai())})
    keys = {"image": {"source": "sim", "dtype": "array", "shape": list(sim.shape), "dtype_numpy": "<i4"},
            "t": {"source": "sim", "dtype": "number", "shape": []}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    send = lambda name, doc: pub.send(b" " + name.encode() + b" " + pack(doc))   # noqa: E731
    send("start", bundle.start_doc)
    send("descriptor", desc.descriptor_doc)
    for i, (t, image) in enumerate(zip(TIMES, images)):
        send("event", desc.compose_event(data={"image": image, "t": float(t)}, timestamps={"image": 0.0, "t": 0.0},
                                         seq_num=i + 1))
        time.sleep(0.01)
    send("stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


def test_growing_particles_inverted_live_in_the_dwba(gisaxs_service, frames):
    service, pub, sub, tiled = gisaxs_service
    sim, images = frames
    substrate = {"delta": SI_12KEV[0], "beta": SI_12KEV[1]}
    dwba = send_run(pub, sim, images, {"enabled": True, "substrate": substrate})
    born = send_run(pub, sim, images, {"enabled": True, "gisaxs": {"model": "spheres_paracrystal"}})
    for uid in (dwba, born):
        run = wait_stopped(service, uid, timeout=120)
        assert run.status == "complete" and run.frames_received == N and not run.failed

    api = f"http://127.0.0.1:{service.api_port}/api/v1/runs"
    body = httpx.get(f"{api}/{dwba}/inversion").json()
    cols = body["columns"]
    assert cols["seq_num"] == list(range(1, N + 1))                  # each frame once
    truth = sim.truth(TIMES)
    pulls = []
    for name, tol in (("radius", 0.02), ("distance", 0.005)):        # 2 % and 0.5 %: 6-7 sigma
        fitted, err = np.array(cols[name]), np.array(cols[f"{name}_err"])
        assert np.all(np.abs(fitted / truth[name] - 1) < tol), (name, fitted)
        assert np.all(np.isfinite(err) & (err > 0))
        pulls.append((fitted - truth[name]) / err)
    pulls = np.concatenate(pulls)
    print(f"radius {np.round(cols['radius'], 3)}; pulls (radius, distance) {np.round(pulls, 2)}, "
          f"std {pulls.std():.2f}; chi2 {np.round(cols['chi2'], 3)}")
    assert np.abs(pulls).max() < 4 and 0.4 < pulls.std() < 2.0             # errors calibrated
    assert set(cols["fit_quality"]) <= {"good", "poor"} and max(cols["chi2"]) < 1.2
    assert all(cols["converged"]) and set(cols["warm_start"]) == {"encoder"}
    summary = httpx.get(f"{api}/{dwba}").json()["inversion"]
    assert summary["frames"] == N and summary["bad"] == 0 and summary["model"] == "spheres_paracrystal_dwba"

    # the Born approximation cannot describe particles on a substrate: every frame flagged
    flagged = httpx.get(f"{api}/{born}").json()["inversion"]
    assert flagged["model"] == "spheres_paracrystal" and flagged["bad"] == N

    # the results stream: the DWBA run's inversion stream, one event per frame
    events = stream_events(sub, dwba, "inversion")
    assert sorted(e["data"]["source_seq_num"] for e in events) == list(range(1, N + 1))
    by_seq = {e["data"]["source_seq_num"]: e["data"]["radius"] for e in events}
    np.testing.assert_allclose([by_seq[s] for s in range(1, N + 1)], cols["radius"])

    # Tiled: the analysis run's inversion table
    table = analysis_table(tiled.uri, tiled.api_key, dwba, "inversion", N)
    np.testing.assert_allclose(table["radius"], cols["radius"])
