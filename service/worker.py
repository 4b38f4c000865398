"""The worker process: the loop around `workers.pipeline.RunPipeline`.

One process per GPU (or several on CPU). It takes messages (service/messages.py) from the
dispatcher on a bounded queue and answers on a shared one:

  StartRun(uid, spec)      -> a RunPipeline for the run (integrators from the worker's cache)
  FrameBatch(uid, ...)     -> reduce and complete the batch, answer BatchReduced or BatchFailed
  StopRun(uid)             -> flush the regularizer window, answer RunStopped
  Shutdown()               -> exit

A worker exits by itself when the service process is gone (killed: no Shutdown comes), so a
SIGKILLed service leaves no worker behind (`watch_parent`).

A batch goes through two stages on two threads, `RunPipeline.reduce` (reads the frames) then
`RunPipeline.complete` (fits: reads the profiles), so the fits of one batch overlap the
integration of the next; answers keep batch order.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
import traceback

from .frame_refs import FrameReadError, read_frame_refs
from .frame_slots import SlotReader, SlotRef
from .messages import (BatchFailed, BatchReduced, FrameBatch, RunStopped, SetupFailed, Shutdown, StartRun,
                       StopRun, WorkerReady)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("workers.device is 'cuda' but no CUDA device is available")
    return name


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """A daemon thread that ends this process (exit code 1) once its parent `parent_pid` is
    gone, checked every `interval_s` s: the orphan is re-parented, so its parent pid changes.
    Polling rather than prctl(PR_SET_PDEATHSIG): that signal follows the parent *thread* that
    spawned the child, and the dispatcher restarts workers from its results thread."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.error("service process %d is gone; worker %d exiting", parent_pid, os.getpid())
        os._exit(1)
    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


def worker_main(index: int, device_name: str, inbox, outbox, threads: int | None = None,
                node: str | None = None) -> None:
    """Entry point of a worker process (spawned), or of a Ray actor's worker thread
    (service/ray_engine.py, which names its `node`)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        watch_parent(parent.pid)
    from .logs import configure as configure_logging
    configure_logging(fmt=f"%(asctime)s worker[{index}] %(levelname)s %(message)s")     # before pyFAI's imports
    import torch

    from workers.pipeline import IntegratorCache, NoGeometry, RunPipeline

    from .memory import reuse_freed_buffers
    reuse_freed_buffers()
    device = resolve_device(device_name)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    cache = IntegratorCache()
    runs: dict[str, RunPipeline] = {}
    logged: set[tuple[str, str]] = set()       # (run uid, exception type) already logged
    slots = SlotReader()
    # reduce() here, complete() on the "fit" thread, in batch order through a queue of one
    # (torch releases the GIL in its kernels). The shared-memory frames are read by reduce() only.
    fits: queue.Queue = queue.Queue(maxsize=1)
    fitter = threading.Thread(target=_fit_stage, args=(index, fits, outbox), name="fit", daemon=True)
    fitter.start()
    outbox.put(WorkerReady(index, device, os.getpid(), node or socket.gethostname()))
    while True:
        msg = inbox.get()
        if isinstance(msg, Shutdown):
            break
        try:
            if isinstance(msg, StartRun):
                runs[msg.uid] = RunPipeline(msg.spec, device, cache)
            elif isinstance(msg, FrameBatch):
                pipeline = runs.get(msg.uid)
                if pipeline is None:
                    outbox.put(BatchFailed(msg.uid, msg.batch_id, msg.seq, "no_setup", "run setup failed or missing"))
                    continue
                frames = (slots.read(msg.frames) if isinstance(msg.frames, SlotRef)
                          else read_frame_refs(msg.frames) if isinstance(msg.frames, tuple) else msg.frames)
                fits.put((msg, pipeline, pipeline.reduce(msg.seq, msg.times, frames, msg.kind)))
            elif isinstance(msg, StopRun):
                fits.put((msg, runs.pop(msg.uid, None), None))
                logged = {k for k in logged if k[0] != msg.uid}
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            expected = isinstance(exc, (NoGeometry, FrameReadError))    # the hub logs these, once per run
            if not expected and (msg.uid, type(exc).__name__) not in logged:   # once per run and kind: no flood
                logged.add((msg.uid, type(exc).__name__))
                log.error("worker %d: %s for run %s failed: %s (further such failures of this run are counted, "
                          "not logged)", index, type(msg).__name__, msg.uid[:8], exc)
            if isinstance(msg, FrameBatch):
                reason = ("no_geometry" if isinstance(exc, NoGeometry) else
                          "file_unavailable" if isinstance(exc, FrameReadError) else "reduction_error")
                fits.put((BatchFailed(msg.uid, msg.batch_id, msg.seq, reason, detail), None, None))   # in order
            elif isinstance(msg, StartRun):
                outbox.put(SetupFailed(msg.uid, detail, traceback.format_exc(limit=3)))
    fits.put(None)
    fitter.join()


def _fit_stage(index: int, fits: queue.Queue, outbox) -> None:
    """The worker's second stage: complete each reduced batch, finish a stopped run, answer."""
    from workers.pipeline import RunFinal
    while True:
        item = fits.get()
        if item is None:
            return
        msg, pipeline, reduced = item
        try:
            if isinstance(msg, FrameBatch):
                outbox.put(BatchReduced(msg.uid, msg.batch_id, pipeline.complete(reduced)))
            elif isinstance(msg, BatchFailed):
                outbox.put(msg)
            elif isinstance(msg, StopRun):
                outbox.put(RunStopped(msg.uid, pipeline.finish() if pipeline is not None else RunFinal()))
        except Exception as exc:
            log.error("worker %d: %s for run %s failed: %s", index, type(msg).__name__, msg.uid[:8], exc)
            if isinstance(msg, FrameBatch):
                outbox.put(BatchFailed(msg.uid, msg.batch_id, msg.seq, "reduction_error", f"{type(exc).__name__}: {exc}"))
            else:
                outbox.put(RunStopped(msg.uid, RunFinal()))
