"""Events lost on the 0MQ link between bluesky's proxy and the service, fetched back from the
catalogue (service/recovery.py).

A real RunEngine publishes through bluesky's 0MQ proxy and writes through bluesky's TiledWriter
(bluesky_tiled_plugins, batches of 4 events) into a Tiled server on localhost; between the proxy
and the service a relay drops every 4th event, the last one of the run included (a gap the stop's
num_events shows). Every frame must be final at the end, recovered frames fitted in order and
as close to the simulator's truth as the others; a catalogue without the run leaves the lost
events counted unrecoverable and the run incomplete, the service unharmed.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.commands.loopback import free_port, publishing_run_engine, start_proxy
from service.config import load_settings
from service.metrics import total
from service.server import Service
from service.sim import make_beamline, operando_cycle

from helpers import wait_for, wait_stopped

pytestmark = pytest.mark.slow
FIT = {"q_range": [2.0, 4.6], "background": {"kind": "power_law"},
       "peaks": [{"name": "lamellar", "center": 3.2, "fwhm": 0.2, "center_min": 2.7, "center_max": 3.6}],
       "regularizer": {"window": 8, "penalty": "huber"}}


class LossyRelay:
    """SUB on the proxy's out port, PUB on a port of its own: every `drop_every`-th event
    message of a run is not forwarded (its seq_nums in `dropped`)."""

    def __init__(self, out_port: int, drop_every: int):
        import zmq
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.drop_every = drop_every
        self.dropped: list[int] = []
        self._events = 0
        ctx = zmq.Context.instance()
        self._sub, self._pub = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(f"tcp://127.0.0.1:{out_port}")
        self._pub.bind(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgpack
        import zmq
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            message = self._sub.recv()
            _, name, payload = message.split(b" ", 2)
            if name == b"start":
                self._events = 0
            if name == b"event":
                self._events += 1
                if self._events % self.drop_every == 0:
                    self.dropped.append(msgpack.unpackb(payload)["seq_num"])
                    continue
            self._pub.send(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sub.close(linger=0)
        self._pub.close(linger=0)


def test_events_dropped_between_proxy_and_service_recovered_from_the_catalogue(tmp_path):
    from bluesky_tiled_plugins import TiledWriter

    from service.publish.tiled_server import TILED_LOCK, EmbeddedTiled

    with EmbeddedTiled(directory=tmp_path / "catalog", api_key="secretcatalogkey") as catalog:
        client = catalog.client()
        in_port, out_port = start_proxy()
        relay = LossyRelay(out_port, drop_every=4)
        det, light = make_beamline(frame_interval=1.0, seed=5)
        np.save(tmp_path / "mask.npy", det.simulator.mask)
        key = {"uri": catalog.uri, "api_key": catalog.api_key}
        live = Service(load_settings(
            None, geometry={"mask": str(tmp_path / "mask.npy")}, reduction={"npt": 800}, fit=FIT,
            phases={"enabled": False}, ingest={"address": relay.address}, tiled=key,
            catalog={**key, "recover_wait_s": 10.0, "recover_wait_at_stop_s": 3.0},
            results={"address": None}, api={"port": free_port()})).start()
        try:
            time.sleep(1.0)                                   # 0MQ slow joiners (service, relay)
            RE, publisher, uids = publishing_run_engine(in_port)
            raw_writer = TiledWriter(client, batch_size=4)    # the writer shows events 4 at a time

            def write_raw(name, doc):       # this process's requests to the DuckDB-backed Tiled go one at a time
                with TILED_LOCK:
                    raw_writer(name, doc)
            token = RE.subscribe(write_raw)
            truth: dict[int, float] = {}
            RE.subscribe(lambda name, doc: truth.__setitem__(doc["seq_num"], doc["data"]["det_lamellar_center_truth"])
                         if name == "event" else None)

            # 1. the catalogue has every event: all 16 frames final, the 4 dropped ones recovered
            n = 16
            RE(operando_cycle(det, light, n_frames=n, schedule=[(0, "dark"), (6, "uv")], delay=0.01))
            uid = uids[-1]
            rec = wait_stopped(live, uid, 120)
            assert relay.dropped == [4, 8, 12, 16]
            assert rec.status == "complete", rec.reason
            assert rec.frames_final == n
            assert rec.info["events_recovered"] == 4 and rec.info["events_unrecoverable"] == 0
            wait_for(lambda: client["scatterflow"][uid].metadata["status"] == "complete", 30, "Tiled has the run")
            peaks = client["scatterflow"][uid]["peaks"].read()
            fin = peaks[peaks["final"] & (peaks["peak"] == "lamellar")]
            assert sorted(fin["seq_num"]) == list(range(1, n + 1))
            err = {int(s): float(c) - truth[int(s)] for s, c in zip(fin["seq_num"], fin["center"])}
            sigma = {int(s): float(e) for s, e in zip(fin["seq_num"], fin["center_err"])}
            recovered_err = np.array([err[s] for s in relay.dropped])
            others = np.array([err[s] for s in err if s not in relay.dropped])
            print(f"final centre - truth: recovered frames rms {np.sqrt(np.mean(recovered_err ** 2)):.2e}, "
                  f"others rms {np.sqrt(np.mean(others ** 2)):.2e} 1/nm; errors {np.median(list(sigma.values())):.1e}")
            assert np.sqrt(np.mean(recovered_err ** 2)) < 2.5e-3 and np.sqrt(np.mean(others ** 2)) < 2.5e-3
            # in order: each frame's provisional fit was published before the next frame's
            prov = peaks[~peaks["final"] & (peaks["peak"] == "lamellar")]["seq_num"].to_numpy()
            assert prov.tolist() == list(range(1, n + 1))

            # 2. the catalogue does not have the run: the lost events are counted unrecoverable
            RE.unsubscribe(token)
            relay.dropped.clear()
            RE(operando_cycle(det, light, n_frames=4, schedule=[(0, "uv")], delay=0.01))
            rec = wait_stopped(live, uids[-1], 60)
            assert relay.dropped == [4]
            assert rec.status == "incomplete" and "1 event(s) lost upstream" in rec.reason
            assert rec.frames_final == 3
            assert rec.info["events_recovered"] == 0 and rec.info["events_unrecoverable"] == 1
            assert total(live.metrics.events_recovered) == 4 and total(live.metrics.events_unrecoverable) == 1
            assert live.metrics.lost_upstream.labels("event")._value.get() == 5
            publisher.close()
        finally:
            live.close()
            relay.close()
