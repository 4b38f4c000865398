"""Frames left in their HDF5 file: a reference that a worker on another node reads itself.

With the Ray engine (service/ray_engine.py) a frame named by a resource/datum or
stream_resource/stream_datum document does not travel through the service: ingest checks
that the file holds it (path confined, dataset shape, the writer's rows flushed, as for a read,
service/resolve.py) and hands on a :class:`FrameRef`; the worker that reduces the frame reads
the row on its own node (`read_frame_refs`), from the shared file system mounted at the same
path there. The pixels cross the network once, from the file server to the GPU node.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import h5py
import numpy as np

try:  # compressed detector chunks (bitshuffle/LZ4, blosc), as in service/resolve.py
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pass


class FrameReadError(RuntimeError):
    """A referenced frame could not be read on the worker's node (file missing there, changed)."""


@dataclass(frozen=True)
class FrameRef:
    """Row ``row`` of dataset ``dataset`` in HDF5 file ``path`` (the real path ingest checked),
    a frame of ``shape`` (rows, cols), row-major, of numpy dtype ``dtype``."""
    path: str
    dataset: str
    row: int
    shape: tuple[int, int]
    dtype: str

    @property
    def size(self) -> int:
        """Pixels of the frame (as ``ndarray.size``; the dispatcher sizes batches by it)."""
        return self.shape[0] * self.shape[1]


def read_frame_refs(refs: tuple[FrameRef, ...]) -> np.ndarray:
    """The frames ``(len(refs), rows, cols)`` that `refs` point at, each file opened once
    (SWMR: the writer may still be appending) and consecutive rows read in one slice.
    FrameReadError names the file when it cannot be read here."""
    if not refs:
        raise ValueError("no frame references")
    shape = refs[0].shape
    if any(r.shape != shape for r in refs):
        raise FrameReadError(f"frames of different shapes in one batch: {sorted({r.shape for r in refs})}")
    out = np.empty((len(refs), *shape), dtype=np.result_type(*[np.dtype(r.dtype) for r in refs]))
    position = {id(r): i for i, r in enumerate(refs)}
    by_file = itertools.groupby(sorted(refs, key=lambda r: (r.path, r.dataset, r.row)), key=lambda r: (r.path, r.dataset))
    for (path, dataset), group in by_file:
        group = list(group)
        try:
            with h5py.File(path, "r", swmr=True) as f:
                ds = f[dataset]
                for run in _consecutive(group):
                    rows = ds[run[0].row:run[-1].row + 1]
                    for r, frame in zip(run, rows):
                        out[position[id(r)]] = frame
        except (OSError, KeyError, ValueError) as exc:
            raise FrameReadError(f"{path}[{dataset}]: {type(exc).__name__}: {exc}") from exc
    return out


def _consecutive(refs: list[FrameRef]) -> list[list[FrameRef]]:
    """`refs` (sorted by row) cut into runs of consecutive rows."""
    runs: list[list[FrameRef]] = []
    for r in refs:
        if runs and r.row == runs[-1][-1].row + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs
