"""The benchmark's detector side, in a process of its own: Bluesky documents composed with
event-model and published on a 0MQ PUB socket at a set frame rate, frames inline in the events
or in an HDF5 file the documents point at (stream_resource / stream_datum)."""
from __future__ import annotations

import functools
import multiprocessing as mp
import time

import numpy as np


def run_sender(address: str, frames_path: str, n_frames: int, rate: float, mode: str, h5_path: str | None,
               poni: dict, ready: mp.Event, go: mp.Event, done: mp.Queue, warmup: int = 0,
               go_warm: mp.Event | None = None) -> None:
    """Runs in its own process: compose Bluesky documents and publish them at `rate` frames/s.
    With `warmup` > 0 a short run goes first (as fast as possible) so that the measured run
    does not include building integration matrices and first-call costs."""
    import msgpack
    import msgpack_numpy
    import zmq

    from ..memory import reuse_freed_buffers
    reuse_freed_buffers()
    pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
    pool = np.load(frames_path, mmap_mode="r")
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(address)
    ready.set()

    def send(name, doc):
        # bluesky.callbacks.zmq.Publisher's framing, b" ".join([prefix, name, payload]), sent
        # without pyzmq's copy of the message (the frame's bytes are not touched again)
        sock.send(b" ".join((b"", name.encode(), pack(doc))), copy=False)

    if warmup:
        go_warm.wait()
        done.put((publish_run(send, pool, warmup, 0.0, mode, h5_path, poni, "bench-warmup")[0], 0.0, 0.0))
    go.wait()
    cpu0 = time.process_time()
    uid, seconds = publish_run(send, pool, n_frames, rate, mode, h5_path, poni, "bench")
    done.put((uid, seconds, time.process_time() - cpu0))
    time.sleep(0.5)
    sock.close(linger=2000)


def publish_run(send, pool, n_frames: int, rate: float, mode: str, h5_path: str | None, poni: dict,
                plan_name: str) -> tuple[str, float]:
    """One run of `n_frames` events at `rate` frames/s (0: at once); (start uid, seconds sending)."""
    from event_model import compose_run
    rows, cols = pool.shape[1:]
    bundle = compose_run(metadata={"plan_name": plan_name, "geometry": poni, "detectors": ["det"]})
    send("start", bundle.start_doc)
    key = {"source": "bench", "dtype": "array", "shape": [1, rows, cols], "dtype_numpy": pool.dtype.str}
    if mode == "hdf5":
        key["external"] = "STREAM:"
    desc = bundle.compose_descriptor(name="primary", data_keys={"det_image": key})
    send("descriptor", desc.descriptor_doc)
    if mode == "hdf5":
        sres = bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{h5_path}",
                                              data_key="det_image",
                                              parameters={"dataset": "/entry/data/data", "chunk_shape": [1, rows, cols]})
        send("stream_resource", sres.stream_resource_doc)
    t0 = time.perf_counter()
    for i in range(n_frames):
        if rate > 0:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        k = i % len(pool)
        if mode == "hdf5":
            datum = sres.compose_stream_datum(indices={"start": k, "stop": k + 1},
                                              seq_nums={"start": i + 1, "stop": i + 2},
                                              descriptor=desc.descriptor_doc)
            send("stream_datum", datum)
            send("event", desc.compose_event(data={}, timestamps={}, seq_num=i + 1))
        else:
            send("event", desc.compose_event(data={"det_image": np.asarray(pool[k])},
                                             timestamps={"det_image": time.time()}, seq_num=i + 1))
    send("stop", bundle.compose_stop())
    return bundle.start_doc["uid"], time.perf_counter() - t0

