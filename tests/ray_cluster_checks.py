"""The Ray engine on a simulated cluster (ray.cluster_utils.Cluster): a head that runs only the
service (the driver) and two worker nodes with two CPU slots each, one actor per node.

Run by tests/test_ray_engine.py inside a network namespace with only loopback (Ray binds to the
node's own address); not collected by itself (no ``test_`` prefix in the file name).

Two runs through bluesky's 0MQ proxy: run A from a RunEngine with the simulated beamline
(frames inline in the events: they reach the actor through Ray's object store), run B with its
frames in an HDF5 file named by stream_resource/stream_datum documents (the actor reads the rows
itself). In the middle of run B the node of its actor is removed: its frames without a final
fit are replayed on the other actor, and every frame of both runs is final exactly once, with
the lamellar centre within its errors of the simulator's truth (frames read from the wrong row
or replayed out of order would not be).
"""
from __future__ import annotations

import threading
import time

import h5py
import numpy as np
import pytest
from event_model import compose_run

from service.commands.loopback import free_port, publishing_run_engine, start_proxy
from service.config import load_settings
from service.server import Service
from service.sim import FrameSimulator, make_beamline, operando_cycle
from service.sim.azopolymer import AzoCycle
from service.sim.frames import default_geometry, poni_dict

from helpers import wait_for, wait_stopped

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

STORE = 150 * 2**20            # object store per node (bytes)
FIT = {"q_range": [2.0, 4.6], "background": {"kind": "power_law"},
       "peaks": [{"name": "lamellar", "center": 3.2, "fwhm": 0.2, "center_min": 2.7, "center_max": 3.6}],
       "regularizer": {"window": 8, "penalty": "huber"}}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    for _ in range(2):
        c.add_node(num_cpus=2, object_store_memory=STORE)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    in_port, out_port = start_proxy()
    det, light = make_beamline(frame_interval=1.0, seed=3)
    np.save(tmp / "mask.npy", det.simulator.mask)
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{out_port}", "allowed_roots": [str(tmp)]},
                             geometry={"mask": str(tmp / "mask.npy")}, reduction={"npt": 800},
                             fit=FIT, phases={"enabled": False}, tiled={"enabled": False},
                             results={"address": None}, api={"port": free_port()},
                             workers={"engine": "ray", "ray_address": cluster.address, "count": 2, "device": "cpu"})
    s = Service(settings).start()
    time.sleep(1.0)                                          # 0MQ slow joiner
    s.test = {"tmp": tmp, "in_port": in_port, "det": det, "light": light}
    yield s
    s.close()


def final_rows(service, uid: str) -> dict[int, tuple[float, float]]:
    """seq_num -> (lamellar centre, its error) of the final fits; every seq_num once."""
    cols, _ = service.store.peaks_since(uid, 0, final=True)
    seqs = [s for s, p in zip(cols["seq_num"], cols["peak"]) if p == "lamellar"]
    assert len(seqs) == len(set(seqs)), "a frame's final fit published twice"
    return {s: (c, e) for s, p, c, e in zip(cols["seq_num"], cols["peak"], cols["center"], cols["center_err"])
            if p == "lamellar"}


def assert_near_truth(rows: dict, truth: dict) -> None:
    """Each frame's final centre near the simulator's truth for *its* seq_num: the peak moves by
    3e-3 to 2e-2 1/nm per frame, so a frame read from another row, or fits of replayed frames
    put in the wrong order, show as an rms of 1e-2 or more. (The same frames through the local
    engine give the same numbers; how honest the errors are is the regularizer's business.)"""
    d = np.array([rows[s][0] - truth[s] for s in sorted(rows)])
    e = np.array([rows[s][1] for s in sorted(rows)])
    print(f"centre - truth: rms {np.sqrt(np.mean(d ** 2)):.2e}, max {np.abs(d).max():.2e} 1/nm; "
          f"within 3 sigma + 5e-4: {np.mean(np.abs(d) < 3 * e + 5e-4):.2f}")
    assert np.sqrt(np.mean(d ** 2)) < 2.5e-3 and np.abs(d).max() < 6e-3


def test_two_runs_node_removed_mid_run_every_frame_final_once(cluster, service):
    disp = service.dispatcher
    workers = disp.worker_health()
    nodes = {w["node"] for w in workers}
    print("workers:", [(w["index"], w["node"], w["device"]) for w in workers])
    assert disp.engine.name == "ray" and len(workers) == 2 and all(w["ready"] for w in workers)
    assert len(nodes) == 2, "SPREAD placed both actors on one node"
    status = service.status()
    assert status["engine"] == "ray" and {w["node"] for w in status["worker_pool"]} == nodes

    # run A: a RunEngine and the simulated beamline, frames inline (object store)
    RE, publisher, uids = publishing_run_engine(service.test["in_port"])
    truth_a: dict[int, float] = {}
    RE.subscribe(lambda name, doc: truth_a.__setitem__(doc["seq_num"], doc["data"]["det_lamellar_center_truth"])
                 if name == "event" else None)
    n_a = 14
    (uid_a,) = RE(operando_cycle(service.test["det"], service.test["light"], n_frames=n_a,
                                 schedule=[(0, "dark"), (6, "uv")], delay=0.01))
    rec_a = wait_stopped(service, uid_a, 120)
    assert rec_a.status == "complete" and rec_a.frames_final == n_a and not rec_a.failed
    rows_a = final_rows(service, uid_a)
    assert sorted(rows_a) == list(range(1, n_a + 1))
    assert_near_truth(rows_a, truth_a)

    # run B: frames in an HDF5 file (FrameRefs, read by the actor), its actor's node removed mid-run
    sim = FrameSimulator(default_geometry(), AzoCycle(schedule=((0.0, "dark"), (4.0, "uv"))), flux=3.0, seed=5)
    n_b = 28
    h5_path = service.test["tmp"] / "frames_b.h5"
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack([sim.frame(float(t)) for t in range(n_b)]),
                         chunks=(1, *sim.shape))
    truth_b = {t + 1: float(sim.truth(float(t))["lamellar_center"]) for t in range(n_b)}
    bundle = compose_run(metadata={"plan_name": "ray_hdf5", "geometry": poni_dict(sim.ai)})
    uid_b = bundle.start_doc["uid"]
    key = {"source": "sim", "dtype": "array", "shape": [1, *sim.shape], "external": "STREAM:"}
    desc = bundle.compose_descriptor(name="primary", data_keys={"det_image": key})
    sres = bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{h5_path}",
                                          data_key="det_image", parameters={"dataset": "/entry/data/data"})
    emit = publisher                                          # bluesky's Publisher: (name, doc)
    for name, doc in (("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", sres.stream_resource_doc)):
        emit(name, doc)

    def send_events(first: int, last: int) -> None:
        for i in range(first, last + 1):
            emit("stream_datum", sres.compose_stream_datum(indices={"start": i - 1, "stop": i},
                                                           seq_nums={"start": i, "stop": i + 1},
                                                           descriptor=desc.descriptor_doc))
            emit("event", desc.compose_event(data={}, timestamps={}, seq_num=i))
            time.sleep(0.03)

    feeder = threading.Thread(target=send_events, args=(1, n_b))
    feeder.start()
    wait_for(lambda: (r := service.store.get(uid_b)) is not None and r.frames_fitted >= 10, 120, "run B fitting")
    host = disp._workers[disp._runs[uid_b].worker]
    node_id = host.node.split("/")[1]
    (victim,) = [n for n in cluster.worker_nodes if n.node_id.startswith(node_id)]
    fitted_at_removal = service.store.get(uid_b).frames_fitted
    cluster.remove_node(victim)
    print(f"removed node {node_id} (worker {host.index}) with {fitted_at_removal} of {n_b} frames of run B fitted")
    feeder.join()
    emit("stop", bundle.compose_stop())
    publisher.close()
    rec_b = wait_stopped(service, uid_b, 180)
    print("run B:", rec_b.status, rec_b.frames_received, rec_b.frames_fitted, rec_b.frames_final, dict(rec_b.failed))
    assert disp.restarts == 1 and fitted_at_removal < n_b
    assert rec_b.status == "complete" and rec_b.frames_received == n_b and rec_b.frames_final == n_b
    assert not rec_b.failed
    rows_b = final_rows(service, uid_b)
    assert sorted(rows_b) == list(range(1, n_b + 1))
    cols, _ = service.store.peaks_since(uid_b, 0, final=False)
    provisional = [s for s, p in zip(cols["seq_num"], cols["peak"]) if p == "lamellar"]
    assert sorted(provisional) == list(range(1, n_b + 1))      # provisional once each too
    assert_near_truth(rows_b, truth_b)
    # the replacement actor starts on the surviving node (its second CPU slot)
    wait_for(lambda: all(w["ready"] and w["alive"] for w in disp.worker_health()), 120, "replacement ready")
    after = disp.worker_health()
    assert {w["node"] for w in after} == nodes - {host.node}
    assert sum(w["frames"] for w in after) >= n_b - fitted_at_removal
