"""End-to-end benchmark: simulated detector frames published through bluesky's 0MQ proxy into
the real service (ingest, worker processes, Tiled, REST), inline in the events or in an HDF5
file the documents point at; with pyFAI + lmfit per frame measured in the same run as baseline.

Figures: sustained frames/s and Gpixel/s, latency p50/p99 from frame arrival to the published
provisional and final fit, drops (lost upstream, dropped, failed), CPU seconds per frame.
With ``engine="ray"`` the workers are Ray actors of a private one-node Ray (run it in a
loopback-only network namespace: benchmarks/RESULTS.md); the CPU of Ray's own processes (GCS,
raylet with the object store, idle workers) is counted apart as "engine".
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .baseline import baseline_pyfai_lmfit, require_lmfit
from .frames import DETECTORS, bench_geometry, frame_pool
from .sender import run_sender

STALL_S = 30.0      # a measured run that makes no progress for this long has lost its stop document


@dataclass
class BenchResult:
    detector: str
    pixels: int
    mode: str
    frames: int
    rate_requested: float
    send_seconds: float
    fitted: int
    final: int
    seconds: float            # first frame arrival to last final result
    lost: float
    dropped: float
    failed: float
    rejected: float
    latency_provisional: tuple[float, float]
    latency_final: tuple[float, float]
    cpu_seconds: float        # service process + worker processes
    baseline_fps: float | None
    devices: tuple[str, ...] = ()
    cores: int = 1
    cpu_split: dict = None    # CPU seconds of the measured run: service, workers, engine, sender, proxy
    engine: str = "local"
    batches: float = 0.0      # batches the workers reduced
    stage_seconds: dict = None   # worker wall seconds by stage (integrate, fit, phases, ...)
    tiled_requests: int = 0   # requests the Tiled publisher made during the measured run
    thread_seconds: dict = None  # service process CPU seconds by thread name
    stopped: bool = True      # False: the run's stop document never arrived (lost in 0MQ, see `lost`)
    backlog: int = 0          # frames not yet fitted when the sender published its last one

    @property
    def mean_batch(self) -> float:
        return self.fitted / self.batches if self.batches else float("nan")

    @property
    def fps(self) -> float:
        return self.fitted / self.seconds if self.seconds > 0 else float("nan")


def _worker_figures(registry) -> dict[str, float]:
    """Batches reduced and worker seconds by stage, from the service's metrics so far."""
    out = {}
    for fam in registry.collect():
        for smp in fam.samples:
            if smp.name == "scatterflow_batch_frames_count":
                out["batches"] = smp.value
            elif smp.name == "scatterflow_worker_seconds_total":
                out[smp.labels["stage"]] = smp.value
    return out


def _thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of each thread of this (the service) process, by thread name; threads not
    started from Python (the Tiled server's, zmq's I/O) count as "other"."""
    import threading
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid), "other").split("(")[0].rstrip()   # "Thread-3 (serve)" -> "Thread-3"
        out[name] = out.get(name, 0.0) + _stat_cpu_seconds(f"/proc/self/task/{tid}/stat")
    return out


def _stat_cpu_seconds(path: str) -> float:
    """utime + stime of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file (0 if gone)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    return sum(_stat_cpu_seconds(f"/proc/{pid}/stat") for pid in pids)


def _descendants(root: int) -> set[int]:
    """Every live process below `root` (by parent pid, from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - out
        out |= frontier
    return out


def run_bench(*, detector: str = "Eiger1M", frames: int = 300, rate: float = 50.0, mode: str = "inline",
              workers: int = 1, baseline: bool = True, pool_size: int = 16, workdir: str | None = None,
              warmup: int = 8, progress=None, engine: str = "local", tiled: bool = True) -> BenchResult:
    """One measured run (after a warm-up run) through the real service; ``tiled=False`` runs the
    service without its Tiled archive (for a machine without tiled, e.g. the GPU check)."""
    from ..commands.loopback import free_port
    from ..commands.waiting import wait_finished
    from ..config import load_settings
    from ..memory import reuse_environment
    from ..server import Service
    from ..sim import poni_dict
    if mode not in ("inline", "hdf5"):
        raise ValueError(f"mode must be 'inline' or 'hdf5', got {mode!r}")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {sorted(DETECTORS)}, got {detector!r}")
    if baseline:
        require_lmfit()
    work = Path(workdir or tempfile.mkdtemp(prefix="scatterflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ai = bench_geometry(detector)
    pool, mask = frame_pool(ai, pool_size)
    np.save(work / "pool.npy", pool)
    np.save(work / "mask.npy", mask)
    h5_path = None
    if mode == "hdf5":
        import h5py
        h5_path = str(work / "frames.h5")
        with h5py.File(h5_path, "w") as f:
            f.create_dataset("/entry/data/data", data=pool, chunks=(1, *pool.shape[1:]))
    in_port, out_port = free_port(), free_port()
    # bluesky's `bluesky-0MQ-proxy` command, run through this interpreter: its script need not lie
    # beside it (bluesky installed with `pip install --target`, as on the GPU check's machine)
    proxy_main = "import sys; from bluesky.commandline.zmq_proxy import main; sys.exit(main())"
    proxy = subprocess.Popen([sys.executable, "-c", proxy_main, str(in_port), str(out_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **reuse_environment()})
    settings = load_settings(None, **{
        "ingest": {"address": f"tcp://127.0.0.1:{out_port}", "allowed_roots": [str(work)]},
        "geometry": {"mask": str(work / "mask.npy")},
        "workers": {"count": workers, "engine": engine, "ray_address": "local", "ray_object_store_mb": 2000},
        "tiled": {"directory": str(work / "tiled"), "enabled": tiled},
        "api": {"port": free_port()},
        "results": {"address": f"tcp://127.0.0.1:{free_port()}"},
    })
    service = Service(settings).start()
    ctx = mp.get_context("spawn")
    ready, go, done, go_warm = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Event()
    sender = ctx.Process(target=run_sender, args=(f"tcp://127.0.0.1:{in_port}", str(work / "pool.npy"), frames,
                                                  rate, mode, h5_path, poni_dict(ai), ready, go, done, warmup,
                                                  go_warm), daemon=True)
    try:
        sender.start()
        ready.wait(60)
        time.sleep(1.5)                                   # slow joiners: sender -> proxy -> service
        if warmup:
            go_warm.set()
            warm_uid, _, _ = done.get(timeout=600)
            wait_finished(service, warm_uid, 600)
            service.hub.latencies["provisional"].clear()
            service.hub.latencies["final"].clear()
        pids = {"service": [os.getpid()], "workers": [w.process.pid for w in service.dispatcher._workers],
                "proxy": [proxy.pid]}
        pids["engine"] = sorted(_descendants(os.getpid()) - set(pids["workers"]) - {proxy.pid, sender.pid})
        cpu0 = {k: _cpu_seconds(v) for k, v in pids.items()}
        work0 = _worker_figures(service.metrics.registry)
        threads0 = _thread_cpu_seconds()
        tiled = service.hub.tiled
        requests0 = tiled.requests if tiled else 0
        go.set()
        uid, send_seconds, sender_cpu = done.get(timeout=frames / max(rate, 1) * 10 + 600)
        at_end = service.store.get(uid)
        backlog = frames - (at_end.frames_fitted if at_end else 0)   # not yet fitted when the detector stopped
        run = wait_finished(service, uid, 600, progress, stall_s=STALL_S)
        cpu_split = {k: _cpu_seconds(v) - cpu0[k] for k, v in pids.items()} | {"sender": sender_cpu}
        work = {k: v - work0.get(k, 0.0) for k, v in _worker_figures(service.metrics.registry).items()}
        threads = {k: v - threads0.get(k, 0.0) for k, v in _thread_cpu_seconds().items()}
        hub = service.hub
        prov = np.array(hub.latencies["provisional"])
        fin = np.array(hub.latencies["final"])
        status = service.status()
        # time span: first arrival .. last final publication ~ send time + the final latency of the last frame
        seconds = send_seconds + (fin[-1] if len(fin) else 0.0)
        m = service.metrics.registry
        def metric(name, **labels):
            return sum(s.value for fam in m.collect() for s in fam.samples
                       if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
        result = BenchResult(
            detector=detector, pixels=int(pool.shape[1] * pool.shape[2]), mode=mode, frames=frames,
            rate_requested=rate, send_seconds=send_seconds, fitted=run.frames_fitted if run else 0,
            final=run.frames_final if run else 0, seconds=seconds,
            # gaps in seq_num are counted by ingest; frames lost after the last one that arrived too
            lost=metric("scatterflow_lost_upstream_total") + max(0, frames - (run.frames_fitted if run else 0)
                                                                 - metric("scatterflow_frames_failed_total")),
            stopped=run is not None and run.status != "running",
            dropped=metric("scatterflow_frames_dropped_total"),
            failed=metric("scatterflow_frames_failed_total"), rejected=status["rejected"],
            latency_provisional=tuple(np.percentile(prov, [50, 99])) if len(prov) else (np.nan, np.nan),
            latency_final=tuple(np.percentile(fin, [50, 99])) if len(fin) else (np.nan, np.nan),
            cpu_seconds=cpu_split["service"] + cpu_split["workers"] + cpu_split["engine"], baseline_fps=None,
            devices=tuple(service.dispatcher.devices), cores=os.cpu_count() or 1, cpu_split=cpu_split,
            batches=work.pop("batches", 0.0), stage_seconds=work, thread_seconds=threads,
            tiled_requests=(tiled.requests - requests0) if tiled else 0, backlog=backlog, engine=engine)
    finally:
        service.close()
        proxy.terminate()
        proxy.wait(10)
        sender.join(5)
    if baseline:
        result.baseline_fps = baseline_pyfai_lmfit(ai, pool, mask, settings)
    return result

