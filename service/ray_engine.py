"""The Ray engine: the worker pool as Ray actors across a cluster's nodes and GPUs.

Each actor (`PipelineActor`) runs the worker loop of service/worker.py on a thread of its own,
with the same messages, so a run behaves as on a local worker process; placement (one actor per
GPU, else per CPU slot, spread over the nodes), the object store, node membership and the
deployments (KubeRay, SLURM, `ray start`) are Ray's. The dispatcher (service/dispatch.py) keeps
the batching, the run placement and the replay of a dead actor's frames on another actor.

- Inline frames go by reference: the dispatcher puts each batch into the object store
  (`ObjectStore.put`) and the actor's `put` receives it as a top-level argument, which Ray
  resolves on the actor's node (zero-copy on the same node).
- File-backed frames go as FrameRefs (service/frame_refs.py): the actor reads the rows itself,
  from the shared file system mounted at the same path on its node.
- `put` is a synchronous call, one at a time (the dispatcher's lock): messages reach a worker in
  the order they were sent, which Ray does not promise for a threaded actor's concurrent calls.
  It waits up to `timeout` s for room in the actor's bounded inbox (back-pressure, as the local
  queue). Once the actor is ready, a call that gets no answer in CALL_GRACE_S more is taken for
  a lost actor: it is killed, so a late delivery cannot happen, and its frames are replayed
  elsewhere. Before it is ready (a replacement waiting for resources) calls wait.
- One thread per actor polls `take` for the answers and puts them on the engine's outbox; an
  actor or node that dies ends its poll with a RayActorError and the actor reads as dead.

`workers.ray_address`: "auto" (the cluster this host is a node of), "host:port" (its GCS),
"ray://host:10001" (Ray Client), or "local" (a private one-node Ray started here).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from .config import WorkersConfig
from .messages import FrameBatch, WorkerReady
from .worker import worker_main

log = logging.getLogger(__name__)

CALL_GRACE_S = 30.0          # an actor that has not answered a call this long after its timeout is lost
POLL_S = 0.5                 # how long one `take` waits for answers


class PipelineActor:
    """A worker on a Ray node: `worker_main` on a thread, its bounded inbox fed by `put`, its
    answers drained by `take`. Created with ``max_concurrency`` > 1 so that `take` runs while a
    `put` waits for room."""

    def __init__(self, index: int, device: str, threads: int, queue_batches: int):
        context = ray.get_runtime_context()
        self.node = f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:8]}"
        self.inbox: queue.Queue = queue.Queue(maxsize=queue_batches)
        self.outbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=worker_main, args=(index, device, self.inbox, self.outbox, threads),
                                       kwargs={"node": self.node}, name=f"worker-{index}", daemon=True)
        self.thread.start()

    def put(self, msg: Any, frames: np.ndarray | None, timeout: float) -> bool:
        """Queue `msg` (its frames, resolved by Ray from the object store, put back in); False
        when the inbox stayed full for `timeout` s."""
        if frames is not None:
            msg = replace(msg, frames=frames)
        try:
            self.inbox.put(msg, timeout=timeout) if timeout > 0 else self.inbox.put_nowait(msg)
            return True
        except queue.Full:
            return False

    def take(self, wait_s: float, most: int = 256) -> list:
        """The answers waiting (at most `most`), after waiting up to `wait_s` s for the first."""
        try:
            items = [self.outbox.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while len(items) < most:
            try:
                items.append(self.outbox.get_nowait())
            except queue.Empty:
                break
        return items

    def join(self, timeout: float) -> bool:
        """True once the worker thread has ended (after a Shutdown)."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


class ActorProcess:
    """A PipelineActor seen as a worker process (service/engine.py WorkerProcess)."""

    def __init__(self, actor, index: int):
        self.actor = actor
        self.index = index
        self.pid: int | None = None          # the actor's process, from its WorkerReady: ready
        self.exitcode: int | None = None
        self.dead = threading.Event()
        self.exited = False

    def is_alive(self) -> bool:
        return not self.dead.is_set() and not self.exited

    def lost(self, why: str) -> None:
        """Take the actor for dead; kill it, so that no call of it runs late."""
        if not self.dead.is_set():
            log.error("ray worker %d: %s", self.index, why)
            self.dead.set()
            self.kill()

    def kill(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone with its node
            pass

    def answer(self, call, timeout: float):
        """The result of `call`, an ObjectRef of this actor's method that may wait `timeout` s.
        Once the actor is ready, no answer CALL_GRACE_S after that counts it lost (GetTimeoutError);
        a dead actor's call raises RayError. Both leave the actor dead."""
        deadline = None
        while True:
            if deadline is None and self.pid is not None:
                deadline = time.monotonic() + timeout + CALL_GRACE_S
            done, _ = ray.wait([call], timeout=1.0)
            if done:
                break
            if self.dead.is_set():
                raise RayError("actor taken for dead")
            if deadline is not None and time.monotonic() > deadline:
                self.lost(f"no answer in {timeout + CALL_GRACE_S:.0f} s")
                raise GetTimeoutError(f"ray worker {self.index} did not answer")
        try:
            return ray.get(call)
        except RayError as exc:
            self.lost(f"died ({type(exc).__name__}: {(str(exc) or '?').splitlines()[0][:200]})")
            raise

    def join(self, timeout: float | None = None) -> None:
        wait = 1.0 if timeout is None else max(0.05, timeout)
        try:
            self.exited = bool(ray.get(self.actor.join.remote(wait), timeout=wait + 5.0))
        except (RayError, GetTimeoutError):
            self.dead.set()


class ActorInbox:
    """The actor's inbox seen from the dispatcher (service/engine.py WorkerInbox)."""

    def __init__(self, process: ActorProcess):
        self.process = process

    def put(self, msg: Any, timeout: float | None = None) -> None:
        self._call(msg, 0.5 if timeout is None else timeout)

    def put_nowait(self, msg: Any) -> None:
        self._call(msg, 0.0)

    def _call(self, msg: Any, timeout: float) -> None:
        """One synchronous `put` on the actor; queue.Full when it had no room, or is dead."""
        if not self.process.is_alive():
            raise queue.Full
        frames = None
        if isinstance(msg, FrameBatch) and isinstance(msg.frames, ray.ObjectRef):
            msg, frames = replace(msg, frames=None), msg.frames
        try:
            accepted = self.process.answer(self.process.actor.put.remote(msg, frames, timeout), timeout)
        except (RayError, GetTimeoutError):
            raise queue.Full from None
        if not accepted:
            raise queue.Full

    def cancel_join_thread(self) -> None:
        pass

    def close(self) -> None:
        pass


class ObjectStore:
    """Batches of inline frames into Ray's object store (service/engine.py FrameStore); the
    reference is held until the batch is answered."""

    def put(self, arrays: list[np.ndarray], capacity: int = 1):
        return ray.put(np.stack(arrays))

    def release(self, ref) -> None:
        pass

    def close(self) -> None:
        pass


class RayEngine:
    name = "ray"
    takes_file_refs = True
    replay_on_replacement = False

    def __init__(self, cfg: WorkersConfig):
        self.cfg = cfg
        self.outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._pollers: list[threading.Thread] = []
        self._processes: list[ActorProcess] = []
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if cfg.ray_address == "local":
                store = cfg.ray_object_store_mb * 2**20 if cfg.ray_object_store_mb else None
                ray.init(object_store_memory=store, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.use_gpus = cfg.device != "cpu" and gpus >= 1
        if cfg.device == "cuda" and not self.use_gpus:
            raise RuntimeError("workers.device is 'cuda' but the Ray cluster has no GPU")
        log.info("ray engine: cluster of %d node(s), resources %s; one actor per %s",
                 len([n for n in ray.nodes() if n.get("Alive")]), ray.cluster_resources(),
                 "GPU" if self.use_gpus else "CPU slot")

    def spawn(self, index: int) -> tuple[ActorProcess, ActorInbox, ObjectStore]:
        threads = self.cfg.threads or 1
        options: dict = {"num_cpus": threads, "max_concurrency": 4, "scheduling_strategy": "SPREAD"}
        if self.use_gpus:
            options["num_gpus"] = 1
        device = "cuda" if self.use_gpus else "cpu"
        actor = _RemoteActor.options(**options).remote(index, device, threads, self.cfg.queue_batches)
        process = ActorProcess(actor, index)
        self._processes.append(process)
        poller = threading.Thread(target=self._poll, args=(process,), name=f"ray-poll-{index}", daemon=True)
        poller.start()
        self._pollers.append(poller)
        return process, ActorInbox(process), ObjectStore()

    def _poll(self, process: ActorProcess) -> None:
        """Forward the actor's answers to the outbox until it dies or the engine closes."""
        while not self._stop.is_set() and process.is_alive():
            try:
                items = process.answer(process.actor.take.remote(POLL_S), POLL_S)
            except (RayError, GetTimeoutError):
                return
            for item in items:
                if isinstance(item, WorkerReady):
                    process.pid = item.pid
                self.outbox.put(item)

    def close(self) -> None:
        """After the dispatcher's Shutdown: stop polling, kill the actors, leave the cluster."""
        self._stop.set()
        for process in self._processes:
            process.kill()
        for t in self._pollers:
            t.join(POLL_S + 2.0)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


_RemoteActor = ray.remote(PipelineActor)
