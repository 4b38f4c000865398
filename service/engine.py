"""What a worker engine gives the dispatcher (service/dispatch.py), and the choice of engine.

An engine starts workers and carries the typed messages of service/messages.py to and from
them; batching, run placement, replay after a death and accounting stay in the dispatcher, the
same for every engine. Two engines: ``local`` (processes on this host, service/local_engine.py)
and ``ray`` (Ray actors across a cluster's nodes and GPUs, service/ray_engine.py), chosen by
``workers.engine``.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .config import WorkersConfig


class WorkerProcess(Protocol):
    """A worker as a process: ``pid`` (None until known), alive, its exit code, kill, join."""
    pid: int | None
    exitcode: int | None

    def is_alive(self) -> bool: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


class WorkerInbox(Protocol):
    """A worker's bounded inbox: ``put`` waits up to ``timeout`` s and raises queue.Full."""
    def put(self, msg: Any, timeout: float | None = None) -> None: ...
    def put_nowait(self, msg: Any) -> None: ...
    def cancel_join_thread(self) -> None: ...
    def close(self) -> None: ...


class FrameStore(Protocol):
    """Where a batch's frames wait for the worker (shared memory, Ray's object store): ``put``
    returns the reference the FrameBatch carries, or None to send the array itself."""
    def put(self, arrays: list[np.ndarray], capacity: int = 1) -> Any: ...
    def release(self, ref: Any) -> None: ...
    def close(self) -> None: ...


class Outbox(Protocol):
    """The workers' answers, all workers together: ``get`` raises queue.Empty after `timeout` s."""
    def get(self, timeout: float | None = None) -> Any: ...


class WorkerEngine(Protocol):
    name: str
    #: HDF5 frames go to the workers as FrameRefs, read on the worker's node
    takes_file_refs: bool
    #: a dead worker's runs are replayed on its replacement (True), or on another ready worker
    #: when there is one (False: a replacement on a lost node may never start)
    replay_on_replacement: bool
    outbox: Outbox

    def spawn(self, index: int) -> tuple[WorkerProcess, WorkerInbox, FrameStore]: ...
    def close(self) -> None: ...


def make_engine(cfg: WorkersConfig) -> WorkerEngine:
    """The engine ``cfg.engine`` names; the Ray engine connects to its cluster here."""
    if cfg.engine == "ray":
        from .ray_engine import RayEngine
        return RayEngine(cfg)
    from .local_engine import LocalEngine
    return LocalEngine(cfg)
