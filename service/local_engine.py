"""The local engine: worker processes on this host (service/worker.py), each with a bounded
multiprocessing queue, answering on one shared queue; frames through shared memory
(service/frame_slots.py) unless ``workers.shared_memory`` is off."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np

from .config import WorkersConfig
from .frame_slots import SlotPool, SlotRef
from .worker import worker_main


class NoSlots:
    """Stand-in for SlotPool when shared memory is off: every batch goes pickled through the queue."""

    def put(self, arrays: list[np.ndarray], capacity: int = 1) -> None:
        return None

    def release(self, ref: SlotRef | None) -> None:
        pass

    def close(self) -> None:
        pass


class LocalEngine:
    name = "local"
    takes_file_refs = False
    replay_on_replacement = True

    def __init__(self, cfg: WorkersConfig):
        self.cfg = cfg
        self._ctx = mp.get_context("spawn")
        self.outbox = self._ctx.Queue()

    def spawn(self, index: int) -> tuple[mp.Process, mp.Queue, SlotPool | NoSlots]:
        inbox = self._ctx.Queue(maxsize=self.cfg.queue_batches)
        # torch's OpenMP pool spins against the service's own threads: by default a CPU worker
        # gets an equal share of the cores with one share left to the service process.
        threads = self.cfg.threads or max(1, (os.cpu_count() or 2) // (self.cfg.count + 1))
        proc = self._ctx.Process(target=worker_main, args=(index, self.cfg.device, inbox, self.outbox, threads),
                                 name=f"scatterflow-worker-{index}", daemon=True)
        proc.start()
        # queued batches + the one being processed + one being answered
        slots = SlotPool(f"w{index}", self.cfg.queue_batches + 2) if self.cfg.shared_memory else None
        return proc, inbox, slots or NoSlots()

    def close(self) -> None:
        pass
