"""Dispatch: frames to worker processes in batches, results back to the publishers.

One run sticks to one worker (the regularizer's window lives there). Batches are sized by the
load (`batch: auto`): a batch leaves at once when its worker has room (one batch in work, one
queued); while it is busy, frames accumulate up to `max_batch`, so a worker that falls behind
gets larger, cheaper-per-frame batches instead of a queue of small ones. With a fixed `batch`,
a batch leaves when it is full or its oldest frame is `latency_budget_s` old. Queues are
bounded: `block` back-pressure (lossless) by default, `drop_oldest` (counted) when configured.
A dead worker is restarted and its unacknowledged batches are sent again, so every accepted
frame is published or counted failed; a run that was in flight at QUARANTINE_DEATHS deaths of
its worker is not replayed again but quarantined (its unfinished frames counted failed).

A run whose RunSpec cannot be built (a size above its ceiling in ``limits``, a bad value of its
start document) or whose worker cannot set it up is refused: the sink closes it at once with the
reason, and its frames are counted failed ("refused") until its stop document.

Messages to and from workers are the dataclasses of service/messages.py, carried by the engine
(service/engine.py): local processes, or Ray actors across nodes. The dispatcher's interface to
ingest is `start_run`, `submit`, `stop_run`, `close`.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from workers.pipeline import BatchResult, RunFinal, RunSpec
from workers.profiles import resample_profile

from .config import Settings
from .engine import FrameStore, WorkerEngine, WorkerInbox, WorkerProcess, make_engine
from .errors import LimitExceeded
from .frame_refs import FrameRef
from .messages import (BatchFailed, BatchReduced, Frame, FrameBatch, RunStopped, SetupFailed, Shutdown, StartRun,
                       StopRun, WorkerReady)
from .metrics import Metrics

log = logging.getLogger(__name__)

QUARANTINE_DEATHS = 2       # worker deaths with a run's batches in flight before it is quarantined
RATE_WINDOW_S = 30.0        # frames/s per worker over this window (status, dashboard)


class ResultSink(Protocol):
    """What the dispatcher calls with results (service.publish.hub.PublishHub)."""
    def run_started(self, uid: str, start: dict, spec: RunSpec | None) -> None: ...
    def frame_accepted(self, frame: Frame) -> None: ...
    def frames_reduced(self, uid: str, frames: list[Frame], result: BatchResult) -> None: ...
    def frames_failed(self, uid: str, seq: np.ndarray, reason: str, detail: str) -> None: ...
    def run_stopped(self, uid: str, stop: dict, final: RunFinal | None) -> None: ...
    def run_refused(self, uid: str, kind: str, reason: str) -> None: ...
    def run_quarantined(self, uid: str, reason: str) -> None: ...


@dataclass
class _RunSlot:
    uid: str
    worker: int                                     # index; -1: none (refused at start)
    start: dict
    pending: deque = field(default_factory=deque)   # Frame
    oldest: float = 0.0
    stop: dict | None = None
    unfinal: dict = field(default_factory=dict)     # seq_num -> Frame sent but not yet final (replay on worker death)
    reduced: set = field(default_factory=set)       # seq_nums of `unfinal` already published provisionally
    deaths: int = 0                                 # worker deaths while batches of this run were in flight
    closed: str | None = None                       # "refused" | "quarantined": closed before its stop document
    grid: np.ndarray | None = None                  # q grid (1/nm) of the run's reduced profiles: its first one's
    resampled: int = 0                              # profiles resampled onto `grid`


@dataclass
class _Inflight:
    """A batch sent to a worker and not answered yet (``sent``: time.monotonic()); ``slot``:
    the FrameStore's reference to its frames, held until the answer."""
    uid: str
    frames: list[Frame]
    slot: object | None
    sent: float = field(default_factory=time.monotonic)


@dataclass
class _Worker:
    index: int
    process: WorkerProcess
    inbox: WorkerInbox
    slots: FrameStore
    inflight: dict[int, _Inflight] = field(default_factory=dict)    # by batch_id
    runs: set = field(default_factory=set)
    device: str = "?"              # "?" until its WorkerReady arrives (worker_health: "ready")
    node: str = ""
    frames: int = 0                # frames it reduced and fitted
    recent: deque = field(default_factory=deque)    # (time.monotonic(), frames) of its answers, last RATE_WINDOW_S
    started: float = field(default_factory=time.monotonic)

    @property
    def usable(self) -> bool:
        """Alive and ready (its WorkerReady came): new runs and replays may go to it."""
        return self.device != "?" and self.process.is_alive()

    def done(self, batch_id: int) -> _Inflight | None:
        """Forget an answered batch and free its frames' slot; returns it."""
        entry = self.inflight.pop(batch_id, None)
        if entry is not None:
            self.slots.release(entry.slot)
        return entry

    def count(self, n: int, now: float) -> None:
        self.frames += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def fps(self, now: float) -> float:
        """Frames/s over the last RATE_WINDOW_S (or since it started, if later)."""
        span = min(RATE_WINDOW_S, max(now - self.started, 1e-3))
        return sum(n for t, n in list(self.recent) if t >= now - RATE_WINDOW_S) / span


def _form(frame: Frame) -> tuple[str, bool]:
    """What a batch must not mix: the kind, and whether the frame is still in its file."""
    return frame.kind, isinstance(frame.data, FrameRef)


class Dispatcher:
    def __init__(self, settings: Settings, metrics: Metrics, sink: ResultSink,
                 spec_for_run: Callable[[dict], RunSpec], engine: WorkerEngine | None = None):
        self.settings = settings
        self.cfg = settings.workers
        self.metrics = metrics
        self.sink = sink
        self.spec_for_run = spec_for_run
        self.engine = engine or make_engine(self.cfg)
        self._outbox = self.engine.outbox
        self._workers: list[_Worker] = []
        self._runs: dict[str, _RunSlot] = {}
        self._specs: dict[str, RunSpec] = {}
        self._lock = threading.RLock()
        self._batch_ids = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.restarts = 0

    # lifecycle ---------------------------------------------------------------------------
    def start(self, wait_ready: float = 120.0) -> None:
        for i in range(self.cfg.count):
            self._workers.append(self._spawn(i))
        ready = 0
        deadline = time.monotonic() + wait_ready
        while ready < len(self._workers) and time.monotonic() < deadline:
            try:
                msg = self._outbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if isinstance(msg, WorkerReady):
                self._ready(msg)
                ready += 1
        if ready < len(self._workers):
            raise RuntimeError(f"only {ready} of {len(self._workers)} workers started ({self.engine.name} engine)")
        for target, name in ((self._collect, "dispatch-results"), (self._flush_timer, "dispatch-timer")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("dispatch: %d worker(s), %s engine: %s", len(self._workers), self.engine.name,
                 ", ".join(f"{w.device} on {w.node}" for w in self._workers))

    def _spawn(self, index: int) -> _Worker:
        process, inbox, slots = self.engine.spawn(index)
        return _Worker(index=index, process=process, inbox=inbox, slots=slots)

    def _ready(self, msg: WorkerReady) -> None:
        w = self._workers[msg.index]
        w.device, w.node = msg.device, msg.node
        w.started = time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers within about `timeout` s: each gets Shutdown after its queued batches;
        one that has not exited by then (hung, or SIGSTOPped: SIGTERM waits for SIGCONT) is
        SIGKILLed. Setting `_stop` first wakes a `_put` blocked on a full worker queue (ingest
        under back-pressure) within 0.5 s, so closing never waits on a worker that stopped reading."""
        deadline = time.monotonic() + timeout

        def left(reserve: float = 0.0) -> float:
            return max(0.05, deadline - reserve - time.monotonic())
        self._stop.set()
        workers = list(self._workers)
        for w in workers:
            try:
                w.inbox.put(Shutdown(), timeout=min(1.0, left()))
            except queue.Full:
                pass
        for w in workers:
            w.process.join(left(reserve=1.0))
            if w.process.is_alive():
                log.warning("worker %d (pid %s) did not stop in time; killed", w.index, w.process.pid)
                w.process.kill()
                w.process.join(1.0)
            w.inbox.cancel_join_thread()   # never block interpreter exit on a queue nobody reads
        for t in self._threads:
            t.join(timeout=min(2.0, left()))
        for w in workers:
            w.slots.close()
        self.engine.close()

    @property
    def devices(self) -> list[str]:
        return [w.device for w in self._workers]

    @property
    def takes_file_refs(self) -> bool:
        """HDF5 frames may come as FrameRefs (the engine's workers read them on their nodes)."""
        return self.engine.takes_file_refs

    def worker_health(self) -> list[dict]:
        """Per worker: index, pid, device, alive, ready (its WorkerReady came: a restarted worker
        is not ready while it starts), runs, batches in flight and the age (s) of the oldest
        unanswered batch (None when idle): a worker that stopped answering shows here.

        Lock-free (snapshots of the containers; each copy is atomic under the GIL), so that it
        answers while ingest holds the lock, blocked on a worker's full queue."""
        now = time.monotonic()
        out = []
        for w in list(self._workers):
            sent = [b.sent for b in list(w.inflight.values())]
            out.append({"index": w.index, "pid": w.process.pid, "device": w.device, "node": w.node,
                        "alive": w.process.is_alive(), "ready": w.device != "?", "runs": len(w.runs),
                        "inflight_batches": len(sent), "oldest_inflight_s": now - min(sent) if sent else None,
                        "frames": w.frames, "fps": w.fps(now)})
        return out

    def queue_depths(self) -> dict[str, int]:
        """Frames waiting to be batched and batches in flight; lock-free, as `worker_health`."""
        return {"pending_frames": sum(len(r.pending) for r in list(self._runs.values())),
                "inflight_batches": sum(len(w.inflight) for w in list(self._workers))}

    # FrameSink ---------------------------------------------------------------------------
    def start_run(self, uid: str, start: dict) -> None:
        """Open run `uid` on the least busy worker, or refuse it: a size above its ceiling
        ("limits") or any other error building its RunSpec ("setup_error", the ValueError's
        message naming the key) closes it at once in the sink, with that reason."""
        spec, refusal = None, None
        try:
            spec = self.spec_for_run(start)
        except LimitExceeded as exc:
            refusal = ("limits", str(exc))
        except Exception as exc:             # a bad value (ValueError naming the key), a geometry pyFAI refuses
            refusal = ("setup_error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
        with self._lock:
            if refusal is not None:
                self._runs[uid] = _RunSlot(uid=uid, worker=-1, start=start, closed="refused")
            else:
                usable = [w for w in self._workers if w.usable]
                worker = min(usable or self._workers, key=lambda w: len(w.runs))
                worker.runs.add(uid)
                self._runs[uid] = _RunSlot(uid=uid, worker=worker.index, start=start)
                self._specs[uid] = spec
                self._control(worker, StartRun(uid, spec))
        self.sink.run_started(uid, start, spec)
        if refusal is not None:
            self.sink.run_refused(uid, *refusal)

    def submit(self, frame: Frame) -> None:
        self.metrics.frames_in.inc()
        self.sink.frame_accepted(frame)
        with self._lock:
            slot = self._runs.get(frame.run_uid)
            if slot is None or frame.run_uid not in self._specs:
                reason = "no_setup" if slot is None or slot.closed is None else slot.closed
                self.sink.frames_failed(frame.run_uid, np.array([frame.seq_num]), reason,
                                        "run not started" if slot is None else f"the run was {reason}")
                return
            if frame.kind == "profile":
                try:
                    frame = self._on_grid(slot, frame)
                except (ValueError, IndexError) as exc:       # a profile of fewer than 2 points
                    self.sink.frames_failed(frame.run_uid, np.array([frame.seq_num]), "refused",
                                            f"profile not on a q grid: {exc}")
                    return
            if not slot.pending:
                slot.oldest = time.monotonic()
            slot.pending.append(frame)
            self._maybe_flush(slot)

    def _on_grid(self, slot: _RunSlot, frame: Frame) -> Frame:
        """A reduced profile (q, I, sigma) on its run's q grid, the run's first profile's: one on
        another grid (other points, another length: USAXS fly scans, merged instruments) is
        resampled onto it (`resample_profile`), never refused for its grid."""
        q = frame.data[0]
        if slot.grid is None:
            slot.grid = q
            return frame
        if q.shape == slot.grid.shape and np.allclose(q, slot.grid, rtol=1e-9, atol=0.0):
            return frame
        if not slot.resampled:
            log.info("run %s: profiles on other q grids than its first (%d points, %.4g-%.4g 1/nm) are resampled "
                     "onto it", slot.uid[:8], len(slot.grid), slot.grid[0], slot.grid[-1])
        slot.resampled += 1
        self.metrics.profiles_resampled.inc()
        if len(q) < 2:
            raise ValueError(f"{len(q)} point(s)")
        intensity, sigma = resample_profile(q, frame.data[1], frame.data[2], slot.grid)
        return Frame(frame.run_uid, frame.seq_num, frame.time, np.stack([slot.grid, intensity, sigma]), frame.arrival,
                     frame.scalars, frame.kind)

    def stop_run(self, uid: str, stop: dict) -> None:
        with self._lock:
            slot = self._runs.get(uid)
            if slot is None:
                return
            if slot.closed is not None:        # refused or quarantined: the sink closed it already
                self._forget(slot)
                return
            self._flush(slot, self._batch_limit(slot))
            slot.stop = stop
            if uid in self._specs:
                self._control(self._workers[slot.worker], StopRun(uid))
                return
            self._forget(slot)
        self.sink.run_stopped(uid, stop, None)

    def _forget(self, slot: _RunSlot) -> None:
        self._runs.pop(slot.uid, None)
        self._specs.pop(slot.uid, None)
        if slot.worker >= 0:
            self._workers[slot.worker].runs.discard(slot.uid)

    # batching ----------------------------------------------------------------------------
    def _maybe_flush(self, slot: _RunSlot) -> None:
        worker = self._workers[slot.worker]
        n = len(slot.pending)
        if n == 0:
            return
        limit = self._batch_limit(slot)
        if not isinstance(self.cfg.batch, int):
            # auto: a batch leaves as soon as its worker has room (one batch in work, one queued);
            # while the worker is busy frames gather, so batches grow with the load and the
            # per-batch cost of the sparse products and fits is shared by more frames
            if n >= limit or len(worker.inflight) < 2:
                self._flush(slot, limit)
            return
        if n >= limit or time.monotonic() - slot.oldest >= self.cfg.latency_budget_s:
            self._flush(slot, limit)

    def _batch_limit(self, slot: _RunSlot) -> int:
        """Most frames per batch for the frames pending in `slot` (see `_frames_per_batch`)."""
        if slot.pending and slot.pending[0].kind == "frame":    # an array, or a FrameRef: both have .size
            return self._frames_per_batch(slot.pending[0].data.size)
        return self.cfg.batch if isinstance(self.cfg.batch, int) else self.cfg.max_batch

    def _frames_per_batch(self, pixels: int) -> int:
        """Most frames of `pixels` pixels per batch: `batch` when fixed, else `max_batch`, and
        at most `max_batch_pixels` pixels (a 4 Mpx detector gets smaller batches than a 1 Mpx one)."""
        limit = self.cfg.batch if isinstance(self.cfg.batch, int) else self.cfg.max_batch
        return min(limit, max(1, self.cfg.max_batch_pixels // max(1, pixels)))

    def _flush(self, slot: _RunSlot, limit: int) -> None:
        worker = self._workers[slot.worker]
        while slot.pending:
            take = min(limit, len(slot.pending))
            form = _form(slot.pending[0])            # one batch: one kind, in memory or in files
            take = next((i for i in range(take) if _form(slot.pending[i]) != form), take)
            frames = [slot.pending.popleft() for _ in range(take)]
            for f in frames:
                slot.unfinal[f.seq_num] = f
            if not self._send(worker, slot, frames):
                return
            slot.oldest = time.monotonic()
        self.metrics.queue_depth.labels("dispatch").set(sum(len(r.pending) for r in self._runs.values()))

    def _send(self, worker: _Worker, slot: _RunSlot, frames: list) -> bool:
        batch_id = next(self._batch_ids)
        ref = None
        if isinstance(frames[0].data, FrameRef):          # read by the worker from the file
            data = tuple(f.data for f in frames)
        else:
            ref = (worker.slots.put([f.data for f in frames], capacity=self._frames_per_batch(frames[0].data.size))
                   if frames[0].kind == "frame" else None)
            data = ref if ref is not None else np.stack([f.data for f in frames])
        msg = FrameBatch(slot.uid, batch_id, np.array([f.seq_num for f in frames], dtype=np.int64),
                         np.array([f.time for f in frames], dtype=np.float64), data, frames[0].kind)
        worker.inflight[batch_id] = _Inflight(slot.uid, frames, ref)
        return self._put(worker, msg, slot, frames, batch_id)

    def _control(self, worker: _Worker, msg: StartRun | StopRun | FrameBatch) -> bool:
        """Put ``msg`` on the worker's queue, waiting while it is full; gives up (False) when the
        worker died (its replacement gets the run and its frames again) or the dispatcher closes."""
        while True:
            try:
                worker.inbox.put(msg, timeout=0.5)
                return True
            except queue.Full:
                if not worker.process.is_alive() or self._stop.is_set():
                    return False

    def _put(self, worker: _Worker, msg: FrameBatch, slot: _RunSlot, frames: list, batch_id: int) -> bool:
        if self.cfg.backpressure == "block":
            # lossless: blocks ingest while the worker is behind; a dead worker's frames stay in
            # `unfinal` and are replayed to its replacement (_check_workers)
            return self._control(worker, msg)
        try:
            worker.inbox.put_nowait(msg)
            return True
        except queue.Full:                 # drop_oldest: keep the newest frames pending
            worker.done(batch_id)
            for f in frames:
                slot.unfinal.pop(f.seq_num, None)
            slot.pending.extendleft(reversed(frames))
            cap = self.cfg.max_batch * self.cfg.queue_batches
            while len(slot.pending) > cap:
                slot.pending.popleft()
                self.metrics.frames_dropped.inc()
            return False

    def _flush_timer(self) -> None:
        while not self._stop.is_set():
            time.sleep(0.005)
            with self._lock:
                for slot in list(self._runs.values()):
                    if slot.pending and slot.stop is None:
                        self._maybe_flush(slot)

    # results -----------------------------------------------------------------------------
    def _collect(self) -> None:
        last_check = time.monotonic()
        while not self._stop.is_set():
            try:
                msg = self._outbox.get(timeout=0.2)
            except queue.Empty:
                msg = None
            if msg is not None:
                try:
                    self._handle(msg)
                except Exception:
                    log.exception("dispatch: error handling %s", type(msg).__name__)
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                self._check_workers()

    def _handle(self, msg) -> None:
        if isinstance(msg, BatchReduced):
            self._reduced(msg)
        elif isinstance(msg, BatchFailed):
            self._failed(msg)
        elif isinstance(msg, SetupFailed):
            self._setup_failed(msg)
        elif isinstance(msg, RunStopped):
            with self._lock:
                slot = self._runs.get(msg.uid)
                if slot is not None:
                    self._forget(slot)
            if slot is not None and slot.closed is not None:     # the sink closed it already
                return
            self.sink.run_stopped(msg.uid, slot.stop if slot else {}, msg.final)
        elif isinstance(msg, WorkerReady):
            self._ready(msg)

    def _failed(self, msg: BatchFailed) -> None:
        """A batch a worker could not reduce: its frames are final (counted failed, never
        replayed); "no_setup" means the run's setup failed there: counted "refused"."""
        reason = msg.reason
        with self._lock:
            slot = self._runs.get(msg.uid)
            if slot is not None:
                self._workers[slot.worker].done(msg.batch_id)
                if slot.closed == "quarantined":       # a dead worker's late answer: counted at quarantine
                    return
                for s in np.asarray(msg.seq).tolist():
                    slot.unfinal.pop(int(s), None)
                    slot.reduced.discard(int(s))
            if reason == "no_setup" and (slot is None or slot.closed == "refused"):
                reason = "refused"
        self.sink.frames_failed(msg.uid, msg.seq, reason, msg.detail)

    def _setup_failed(self, msg: SetupFailed) -> None:
        """The worker could not build the run's pipeline (a bad value it alone detects): the run
        is refused ("setup_error") as if at start; its frames not yet sent are counted failed."""
        log.error("run %s: worker could not set up: %s\n%s", msg.uid[:8], msg.detail, msg.traceback)
        with self._lock:
            self._specs.pop(msg.uid, None)
            slot = self._runs.get(msg.uid)
            if slot is None or slot.closed is not None:
                return
            slot.closed = "refused"
            self._workers[slot.worker].runs.discard(msg.uid)      # never replayed
            pending = [f.seq_num for f in slot.pending]
            slot.pending.clear()            # a StopRun sent already is answered: RunStopped forgets the slot
        if pending:
            self.sink.frames_failed(msg.uid, np.array(pending), "refused", msg.detail)
        self.sink.run_refused(msg.uid, "setup_error", msg.detail)

    def _reduced(self, msg: BatchReduced) -> None:
        result, uid = msg.result, msg.uid
        seq = np.asarray(result.seq).tolist()
        again: set = set()
        frames: list[Frame] = []
        with self._lock:
            slot = self._runs.get(uid)
            if slot is not None and slot.closed is not None:     # a dead worker's late answer: counted failed
                self._workers[slot.worker].done(msg.batch_id)
                return
            if slot is not None:
                worker = self._workers[slot.worker]
                entry = worker.done(msg.batch_id)
                frames = entry.frames if entry else []
                # frames replayed after a worker death were maybe published already: once only
                again = slot.reduced.intersection(seq)
                slot.reduced.update(seq)
                final = result.final_seq()
                if again:
                    result = result.without(again)
                    frames = [f for f in frames if f.seq_num not in again]
                for s in final:
                    slot.unfinal.pop(int(s), None)
                    slot.reduced.discard(int(s))
        self.metrics.frames_fitted.inc(len(seq) - len(again))
        if slot is not None:
            worker.count(len(seq), time.monotonic())
            self.metrics.worker_frames.labels(str(worker.index), worker.node, worker.device).inc(len(seq))
        self.metrics.batch_frames.observe(len(seq))
        for stage, seconds in result.seconds.items():
            self.metrics.worker_seconds.labels(stage).inc(seconds)
        self.sink.frames_reduced(uid, frames, result)

    def _check_workers(self) -> None:
        quarantined: list[tuple[str, list[int], str]] = []
        with self._lock:
            for i, w in enumerate(self._workers):
                if w.process.is_alive():
                    continue
                self.restarts += 1
                in_flight = {b.uid for b in w.inflight.values()}
                heir = self._heir(w)
                log.error("worker %d (pid %s, %s) died with exit code %s; restarting it and re-sending %d "
                          "batch(es) to worker %s", i, w.process.pid, w.node or "?", w.process.exitcode,
                          len(w.inflight), "new" if heir is None else heir.index)
                w.inbox.cancel_join_thread()       # its reader is gone: do not block exit on its pipe
                w.inbox.close()
                new = self._spawn(i)
                w.slots.close()                    # the new worker gets fresh slots
                self._workers[i] = new
                heir = heir or new
                heir.runs |= w.runs
                # The dead worker's regularizer windows are gone: replay, in order, every frame of
                # its runs that has no final result yet (in flight or waiting in a window).
                # A run in flight at QUARANTINE_DEATHS deaths is not replayed again (it may be the cause).
                for uid in sorted(w.runs):
                    slot = self._runs.get(uid)
                    if slot is None or uid not in self._specs:
                        continue
                    slot.worker = heir.index
                    if uid in in_flight:
                        slot.deaths += 1
                    if slot.deaths >= QUARANTINE_DEATHS:
                        quarantined.append(self._quarantine(slot, heir, w.process.exitcode))
                        continue
                    self._control(heir, StartRun(uid, self._specs[uid]))
                    replay = [slot.unfinal[k] for k in sorted(slot.unfinal)]
                    for j in range(0, len(replay), self.cfg.max_batch):
                        self._send(heir, slot, replay[j:j + self.cfg.max_batch])
                    if slot.stop is not None:
                        self._control(heir, StopRun(uid))
        for uid, seq, reason in quarantined:
            log.error("run %s quarantined: %s", uid[:8], reason)
            if seq:
                self.sink.frames_failed(uid, np.array(seq, dtype=np.int64), "quarantined", reason)
            self.sink.run_quarantined(uid, reason)

    def _heir(self, dead: _Worker) -> _Worker | None:
        """Where a dead worker's runs are replayed: its replacement (None), or, when the engine
        says so (Ray: the replacement may wait for a node that is gone), the least busy other
        worker that is alive and ready, if there is one."""
        if self.engine.replay_on_replacement:
            return None
        others = [w for w in self._workers if w is not dead and w.usable]
        return min(others, key=lambda w: len(w.runs)) if others else None

    def _quarantine(self, slot: _RunSlot, worker: _Worker, exitcode) -> tuple[str, list[int], str]:
        """Close `slot`'s run without replaying it: (uid, seq_nums of its frames without a final
        result, reason). Its later frames are counted failed "quarantined" until its stop."""
        seq = sorted(slot.unfinal) + [f.seq_num for f in slot.pending]
        reason = (f"its worker died {slot.deaths} times while reducing it (last exit code {exitcode}); "
                  f"not replayed: {len(seq)} frame(s) without a final result counted failed")
        slot.unfinal.clear()
        slot.reduced.clear()
        slot.pending.clear()
        slot.closed = "quarantined"
        self._specs.pop(slot.uid, None)
        worker.runs.discard(slot.uid)
        if slot.stop is not None:               # its stop document came already: nothing more will
            self._runs.pop(slot.uid, None)
        return slot.uid, seq, reason
