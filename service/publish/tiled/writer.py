"""The writer thread: takes the callers' messages, buffers runs, turns flushes into ops and
writes each op now, or into the spool while Tiled is unreachable or earlier writes wait there;
drains the spool in order once a probe finds Tiled answering again."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from . import health
from .buffer import FlushPolicy, Rows, RunBuffer
from .errors import is_transient
from ..tiled_server import TILED_LOCK
from .layout import TiledLayout
from .ops import Op
from .spool import Spool

log = logging.getLogger(__name__)


# --- messages from the callers -----------------------------------------------------------

@dataclass(frozen=True)
class Start:
    uid: str
    metadata: dict          # the run container's metadata (metadata.start_metadata)


@dataclass(frozen=True)
class Add:
    uid: str
    rows: Rows


@dataclass(frozen=True)
class Stop:
    uid: str
    metadata: dict          # final status (metadata.stop_metadata)


@dataclass(frozen=True)
class Flush:
    done: threading.Event   # set once everything queued before is written or spooled


@dataclass(frozen=True)
class Close:
    pass


Message = Start | Add | Stop | Flush | Close


class Writer:
    """Owns the run buffers and the Tiled and spool writes; runs on one thread (`run`).

    ``writer_id`` names this process's runs in Tiled (recovery); ``max_retries`` retries of a
    failed write (after tiled's own), ``retry_backoff`` s before the first, doubled per retry;
    ``probe_seconds`` between health probes while spooling. ``spool_only``, set by the closing
    caller: spool what is left without asking Tiled."""

    def __init__(self, inbox: queue.Queue, layout: TiledLayout, spool: Spool, policy: FlushPolicy,
                 *, writer_id: str, max_retries: int, retry_backoff: float, probe_seconds: float):
        self.inbox, self.layout, self.spool, self.policy = inbox, layout, spool, policy
        self.stats = layout.stats
        self.writer_id = writer_id
        self.max_retries, self.retry_backoff = max_retries, retry_backoff
        self.spool_only = False
        self._probe = health.ProbeClock(probe_seconds)
        self._runs: dict[str, RunBuffer] = {}
        self._recover_due = True        # runs an earlier process left open: marked once the old spool is in
        self._last_drain = 0.0          # time.monotonic() of the last drain step
        self._drained = 0               # spool files written to Tiled since the spool was last empty

    def run(self) -> None:
        """The thread's loop, until `Close`; never dies of an error (logged and counted)."""
        while True:
            try:
                msg = self.inbox.get(timeout=self._wait_time())
            except queue.Empty:
                msg = None
            try:
                if self._recover_due and not self.spool.pending:
                    self._recover_due = False
                    self._submit(Op("recover", "", {"writer": self.writer_id}))
                if isinstance(msg, Close):
                    self._flush_all()
                    if not self.spool_only:
                        self.try_drain(force=True)
                    return
                if msg is not None:
                    self._handle(msg)
                self._flush_due()
                # a drain step takes seconds: between steps, take the calls waiting (cheap) so
                # that callers never block on a full queue while the spool drains
                if self.spool.pending and not self.spool_only and (
                        self.inbox.empty() or time.monotonic() - self._last_drain > 5.0):
                    self._last_drain = time.monotonic()
                    self.try_drain()
            except Exception:
                log.exception("Tiled writer: unexpected error")
                self.stats.errors += 1

    def _wait_time(self) -> float:
        """Seconds until the next flush or probe is due (0.5 if none)."""
        due = [d for d in map(self.policy.deadline, self._runs.values()) if d is not None]
        if self.spool.pending:
            due.append(self._probe.next)
        return max(0.0, min(due) - time.monotonic()) if due else 0.5

    # --- buffering ----------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Flush):
            try:
                self._flush_all()
            finally:
                msg.done.set()
            return
        if isinstance(msg, Start):
            self._runs[msg.uid] = RunBuffer(msg.uid)
            self._submit(Op("start", msg.uid, {"metadata": msg.metadata}))
            return
        buf = self._runs.get(msg.uid)
        if buf is None:
            what = type(msg.rows).__name__ if isinstance(msg, Add) else "stop"
            log.error("Tiled writer: %s for unknown run %r dropped (no start_run)", what, msg.uid)
            self.stats.errors += 1
            return
        if isinstance(msg, Stop):
            self._flush_run(buf)
            self._submit(Op("stop", msg.uid, {"metadata": msg.metadata}))
            del self._runs[msg.uid]
            return
        buf.add(msg.rows)
        if self.policy.full(buf):
            self._flush_run(buf)

    def _flush_due(self) -> None:
        now, idle = time.monotonic(), self.inbox.empty()
        for buf in list(self._runs.values()):
            if self.policy.due(buf, now, idle):
                self._flush_run(buf)

    def _flush_all(self) -> None:
        for buf in list(self._runs.values()):
            self._flush_run(buf)

    def _flush_run(self, buf: RunBuffer) -> None:
        for op in buf.take_ops():
            self._submit(op)

    # --- writing: retries, spool ----------------------------------------------------------

    def execute(self, op: Op, check: bool) -> None:
        """One op into Tiled now; ``check``: it may have been (partly) applied before."""
        with TILED_LOCK:
            if op.kind == "recover":
                health.mark_interrupted(self.layout, op.meta["writer"], keep=self._runs)
            else:
                self.layout.execute(op, check)

    def _submit(self, op: Op) -> None:
        """Write now, or spool it if Tiled is unreachable or earlier writes wait there."""
        if self.spool.pending or self.spool_only:
            self._spool(op)
            return
        for attempt in range(self.max_retries + 1):
            try:
                self.execute(op, check=attempt > 0)
                return
            except Exception as exc:
                if not self._failed(op, exc):
                    return
                if attempt == self.max_retries or not self._healthy():
                    break
                time.sleep(self.retry_backoff * 2 ** attempt)
        self._spool(op)

    def _failed(self, op: Op, exc: BaseException) -> bool:
        """Count a failure; True if transient (retry/spool), False if dropped for good."""
        self.stats.failures += 1
        self.layout.forget(op.uid)
        if is_transient(exc):
            log.warning("Tiled write %s/%s failed (%r); will retry", op.kind, op.uid, exc)
            return True
        log.error("Tiled refused %s for run %s; dropped: %r", op.kind, op.uid, exc, exc_info=exc)
        self.stats.errors += 1
        return False

    def _spool(self, op: Op) -> None:
        """Into the spool; the first write of an outage logs a warning (the drain logs the end)."""
        if not self.spool.pending:
            self._probe.later()
            log.warning("Tiled: %s; spooling writes to %s until it answers",
                        "closing with writes left" if self.spool_only else "unreachable", self.spool.directory)
        self.spool.add(op)
        self.stats.spooled += 1

    def _healthy(self) -> bool:
        return health.tiled_answers(self.layout.uri, self.layout.client)

    def try_drain(self, force: bool = False, max_files: int = 64, step_seconds: float = 1.0) -> None:
        """Replay spooled writes in order if a probe is due and Tiled answers: up to
        ``max_files``, stopping after ``step_seconds`` so that the thread gets back to its
        callers (all, ``max_files`` at a time, if ``force``, probe due or not). Consecutive
        writes to one array or table are merged (spool.coalesce): the spool drains faster than
        flushes add to it once Tiled is back."""
        if not force and not self._probe.due():
            return
        if not self._healthy():
            self._probe.no_answer()
            return
        self._probe.answered()
        deadline = time.monotonic() + step_seconds
        for op, paths in self.spool.replay(max_files, everything=force):
            if not force and time.monotonic() > deadline:
                return
            try:
                self.execute(op, check=True)
            except Exception as exc:
                if self._failed(op, exc):
                    self._probe.later()
                    return
            self.spool.remove(paths)
            self._drained += len(paths)
            if not self.spool.pending:
                log.info("Tiled: spool drained, %d spooled write(s) now in Tiled", self._drained)
                self._drained = 0
