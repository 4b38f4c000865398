"""Shared-memory hand-off of frame batches from the dispatcher to a worker process.

Pickling a batch through a multiprocessing queue copies every frame three times (np.stack,
pickle into the pipe, unpickle) and costs as much CPU as integrating it (py-spy, 1 Mpx frames,
2 cores). Here the dispatcher copies each frame once into a memory-mapped file under
/dev/shm and sends only a small :class:`SlotRef`; the worker maps the same file and reads the
batch in place. A slot is busy from `acquire` until the worker's answer for its batch comes
back (`release`), so the worker never reads memory that is being overwritten.

The pool is bounded: when every slot is busy `acquire` returns None and the dispatcher falls
back to sending the batch through the queue, which is slower but never blocks or loses frames.
Files are named ``scatterflow-<pid>-<tag>-<slot>-<generation>`` (``pid``: the service process
that owns them) and removed by `close`; a slot that must grow for a larger batch gets a new file
(the worker maps each name once). A service that was killed cannot remove its files: the next
one removes them at start (`remove_stale_segments`), once their owner's pid is gone.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
_POOL_NUMBERS = itertools.count()


def shm_directory() -> Path:
    """/dev/shm where it exists (RAM-backed on Linux), else the temporary directory."""
    d = Path("/dev/shm")
    return d if d.is_dir() and os.access(d, os.W_OK) else Path(tempfile.gettempdir())


@dataclass(frozen=True)
class SlotRef:
    """What crosses the queue instead of the pixels: file, shape and dtype of a batch."""
    slot: int
    path: str
    shape: tuple[int, ...]
    dtype: str


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.generation = 0
        self.path: Path | None = None
        self.nbytes = 0
        self.map: np.memmap | None = None
        self.busy = False


class SlotPool:
    """`n_slots` growable shared-memory blocks owned by the dispatcher for one worker."""

    def __init__(self, tag: str, n_slots: int, directory: str | os.PathLike | None = None):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", tag):     # the file names must parse (segment_owner)
            raise ValueError(f"tag must be letters, digits or _, got {tag!r}")
        self.tag = f"{tag}_{next(_POOL_NUMBERS)}"    # unique in this process (two services, one process)
        self.directory = Path(directory) if directory else shm_directory()
        self._slots = [_Slot(i) for i in range(n_slots)]
        self.fallbacks = 0            # batches sent through the queue because every slot was busy
        self._closed = False

    def put(self, arrays: list[np.ndarray], capacity: int = 1) -> SlotRef | None:
        """Copy equal-shape ``arrays`` into a free slot as one (B, ...) batch; None if all busy.
        A slot that must grow is sized for at least `capacity` such arrays (the largest batch
        expected), so that batches of varying size do not keep growing it: each new slot file
        costs a page fault per 4 KiB on first write."""
        slot = None if self._closed else next((s for s in self._slots if not s.busy), None)
        if slot is None:
            self.fallbacks += 1
            return None
        dtype = np.result_type(*arrays)
        shape = (len(arrays), *arrays[0].shape)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > slot.nbytes:
            self._grow(slot, max(nbytes, nbytes // len(arrays) * capacity))
        view = np.ndarray(shape, dtype=dtype, buffer=slot.map)
        for i, a in enumerate(arrays):
            view[i] = a
        slot.busy = True
        return SlotRef(slot.index, str(slot.path), shape, dtype.str)

    def release(self, ref: SlotRef | None) -> None:
        if ref is not None:
            self._slots[ref.slot].busy = False

    def release_all(self) -> None:
        for s in self._slots:
            s.busy = False

    def _grow(self, slot: _Slot, nbytes: int) -> None:
        self._remove(slot)
        slot.generation += 1
        slot.nbytes = max(nbytes, 2 * slot.nbytes)
        slot.path = self.directory / f"scatterflow-{os.getpid()}-{self.tag}-{slot.index}-{slot.generation}"
        slot.map = np.memmap(slot.path, dtype=np.uint8, mode="w+", shape=(slot.nbytes,))

    @staticmethod
    def _remove(slot: _Slot) -> None:
        if slot.map is not None:
            slot.map._mmap.close()            # noqa: SLF001 (np.memmap has no public close)
            slot.map = None
        if slot.path is not None:
            try:
                slot.path.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Remove the files; later `put` calls answer None (no new file after close)."""
        self._closed = True
        for s in self._slots:
            self._remove(s)


_SEGMENT_NAME = re.compile(r"scatterflow-(\d+)-[A-Za-z0-9_]+-\d+-\d+")


def segment_owner(name: str) -> int | None:
    """The pid in a slot file name ``scatterflow-<pid>-<tag>-<slot>-<generation>``; None for any
    other name."""
    m = _SEGMENT_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """True if a process `pid` exists (ours or another user's: then it is not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments(directory: str | os.PathLike | None = None) -> dict[int, int]:
    """Remove the slot files of scatterflow processes that are gone (killed before `close`):
    files named ``scatterflow-<pid>-...`` in `directory` (default `shm_directory`) whose pid is
    not a live process. Never touches a live process's files (this one's included). Returns
    {dead pid: files removed}. A pid reused by an unrelated process keeps its files until that
    process ends too: the safe side."""
    d = Path(directory) if directory else shm_directory()
    removed: dict[int, int] = {}
    try:
        names = os.listdir(d)
    except OSError as exc:
        log.warning("cannot list %s for stale shared-memory files: %s", d, exc)
        return removed
    me = os.getpid()
    for name in names:
        pid = segment_owner(name)
        if pid is None or pid == me or pid_alive(pid):
            continue
        try:
            (d / name).unlink()
        except FileNotFoundError:           # another starting service removed it first
            continue
        except OSError as exc:
            log.warning("cannot remove stale shared-memory file %s: %s", d / name, exc)
            continue
        removed[pid] = removed.get(pid, 0) + 1
    return removed


class SlotReader:
    """Worker side: maps each slot file once and returns the batch as a read-only array view."""

    def __init__(self):
        self._maps: dict[str, np.memmap] = {}

    def read(self, ref: SlotRef) -> np.ndarray:
        m = self._maps.get(ref.path)
        if m is None:
            stale = [p for p in self._maps if p.rsplit("-", 1)[0] == ref.path.rsplit("-", 1)[0]]
            for p in stale:                   # an older generation of the same slot
                del self._maps[p]
            m = self._maps[ref.path] = np.memmap(ref.path, dtype=np.uint8, mode="r")
        return np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=m)
