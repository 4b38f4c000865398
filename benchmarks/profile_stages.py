"""Where a frame's CPU time goes on the service path, stage by stage, one thread each.

Prints CPU ms per frame for: the sender's msgpack encoding (the detector side, on the same
machine in `scatterflow bench`), ingest decoding and event-model validation, the hand-off to the
worker (pickled through a queue versus copied into shared memory), the integrator's
preprocessing and sparse products, per-frame LM fits and the regularized window fit; then the
frame rate those costs allow on this machine's cores. This is the profile that says why the
end-to-end rate is what `scatterflow bench` measures.

    python benchmarks/profile_stages.py --detector Eiger1M --batch 16
"""
from __future__ import annotations

import argparse
import functools
import os
import pickle
import time
import warnings

import numpy as np
import torch


def cpu_ms(fn, repeat: int, per: int) -> float:
    """CPU (process) ms per item of `fn` over `repeat` calls of `per` items, after one warm call."""
    fn()
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return 1e3 * (time.process_time() - t0) / (repeat * per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="Eiger1M", choices=["Pilatus300k", "Eiger1M", "Eiger4M"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import msgpack
    import msgpack_numpy
    from event_model import compose_run, schema_validators, DocumentNames

    from service.bench.frames import bench_geometry, frame_pool
    from service.config import load_settings
    from service.frame_slots import SlotPool, SlotReader
    from workers.geometry import Geometry
    from workers.integrate import build_integrator_1d
    from workers.temporal import TrajectoryFitter

    B, R = args.batch, args.repeat
    ai = bench_geometry(args.detector)
    pool, mask = frame_pool(ai, B)
    npix = pool.shape[1] * pool.shape[2]
    settings = load_settings(None)
    integ = build_integrator_1d(Geometry.from_pyfai(ai), npt=settings.reduction.npt, mask=mask, dummy=-1.0,
                                delta_dummy=0.5, polarization_factor=0.95)
    frames = torch.from_numpy(pool)
    stages: list[tuple[str, float]] = []

    pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
    desc = compose_run().compose_descriptor(name="primary", data_keys={
        "det": {"source": "x", "dtype": "array", "shape": list(pool.shape[1:])}})
    event = desc.compose_event(data={"det": pool[0]}, timestamps={"det": 0.0}, seq_num=1)
    payload = pack(event)
    stages.append(("sender: msgpack encode (detector side)", cpu_ms(lambda: pack(event), R * B, 1)))
    stages.append(("ingest: msgpack decode", cpu_ms(lambda: msgpack.unpackb(payload, object_hook=msgpack_numpy.decode),
                                                     R * B, 1)))
    validator = schema_validators[DocumentNames.event]
    stages.append(("ingest: event-model validation", cpu_ms(lambda: validator.validate(event), R * B, 1)))
    arrays = list(pool)
    stages.append(("hand-off: np.stack + pickle + unpickle (queue)",
                   cpu_ms(lambda: pickle.loads(pickle.dumps(np.stack(arrays), protocol=-1)), R, B)))
    slots, reader = SlotPool("prof", 1), SlotReader()

    def shm():
        ref = slots.put(arrays)
        reader.read(ref).sum(dtype=np.int64)          # touch every byte the worker will read
        slots.release(ref)
    base_touch = cpu_ms(lambda: np.stack(arrays).sum(dtype=np.int64), R, B) - cpu_ms(lambda: np.stack(arrays), R, B)
    stages.append(("hand-off: copy into shared memory (service/frame_slots.py)", cpu_ms(shm, R, B) - base_touch))
    slots.close()
    stages.append(("worker: preprocess (dark, dummies, variance)", cpu_ms(lambda: integ._preprocessed(frames), R, B)))
    total_int = cpu_ms(lambda: integ(frames), R, B)
    stages.append(("worker: sparse products (CSR, bbox splitting)", total_int - stages[-1][1]))
    res = integ(frames)
    fitter = TrajectoryFitter(settings.fit.model_spec(), settings.fit.regularizer)
    n = [0]

    def fit():
        seq = np.arange(n[0], n[0] + B)
        n[0] += B
        fitter.update(res.radial, res.intensity, res.sigma, seq, seq.astype(float))
    fit()
    t0 = time.process_time()
    for _ in range(R):
        fit()
    fit_total = 1e3 * (time.process_time() - t0) / (R * B)
    per_frame = cpu_ms(lambda: fitter._fit_frames(*fitter._prepare(res.radial, res.intensity, res.sigma)), R, B)
    stages.append(("worker: per-frame LM fits (provisional)", per_frame))
    stages.append(("worker: regularized window fits (final) + bookkeeping", fit_total - per_frame))
    evals = fitter.window_evaluations / (n[0] - fitter.lag)

    width = max(len(s) for s, _ in stages)
    print(f"{args.detector}: {pool.shape[1]} x {pool.shape[2]} = {npix / 1e6:.2f} Mpx, batch {B}, "
          f"{settings.reduction.npt} bins, one thread per stage, CPU ms per frame")
    for name, ms in stages:
        print(f"  {name:<{width}}  {ms:8.2f}")
    service_ms = sum(ms for name, ms in stages if not name.startswith("sender") and "pickle" not in name)
    cores = os.cpu_count() or 1
    print(f"  {'service total (shared-memory hand-off)':<{width}}  {service_ms:8.2f}")
    print(f"  window fits: {evals:.2f} model evaluations per final frame")
    print(f"  => at most {1e3 * cores / service_ms:.1f} frames/s on {cores} cores if every stage ran in parallel "
          f"with nothing else ({1e3 / service_ms:.1f} frames/s per core)")


if __name__ == "__main__":
    main()
