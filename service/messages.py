"""The messages of a frame's path, as dataclasses: ingest -> dispatcher (``Frame``), dispatcher ->
worker (``StartRun``, ``FrameBatch``, ``StopRun``, ``Shutdown``) and worker -> dispatcher
(``WorkerReady``, ``BatchReduced``, ``BatchFailed``, ``SetupFailed``, ``RunStopped``).

They cross process boundaries by pickle (multiprocessing queues) and carry only numpy arrays,
plain values and the workers' own dataclasses (workers/pipeline.py), so an engine other than
local processes can carry the same messages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from .frame_refs import FrameRef
from .frame_slots import SlotRef

if TYPE_CHECKING:
    from workers.pipeline import BatchResult, RunFinal, RunSpec

FrameKind = Literal["frame", "profile"]


@dataclass
class Frame:
    """One detector frame (kind "frame": (rows, cols) counts, row-major) or an already reduced
    profile (kind "profile": (3, N) rows q 1/nm, intensity, sigma) of analysis ``run_uid``.
    ``data`` is a FrameRef where the frame stays in its HDF5 file until a worker on another node
    reads it (engines whose ``takes_file_refs``). ``arrival`` is time.monotonic() at receipt."""
    run_uid: str
    seq_num: int
    time: float                 # event time, s since epoch
    data: np.ndarray | FrameRef
    arrival: float
    scalars: dict[str, float]   # the event's other scalar fields (motors, truth in simulation)
    kind: FrameKind = "frame"


# dispatcher -> worker -------------------------------------------------------------------------
@dataclass
class StartRun:
    uid: str
    spec: "RunSpec"


@dataclass
class FrameBatch:
    """Frames of one run: seq (B,) int64, times (B,) s, frames (B, H, W) or (B, 3, N) profiles,
    or a reference to them: in shared memory (SlotRef, service/frame_slots.py), in Ray's object
    store (an ObjectRef, resolved by the actor: service/ray_engine.py), or in their HDF5 files
    (a tuple of FrameRef, read by the worker: service/frame_refs.py)."""
    uid: str
    batch_id: int
    seq: np.ndarray
    times: np.ndarray
    frames: Union[np.ndarray, SlotRef, tuple[FrameRef, ...], Any]
    kind: FrameKind = "frame"


@dataclass
class StopRun:
    uid: str


@dataclass
class Shutdown:
    """The worker exits after the messages before it."""


# worker -> dispatcher -------------------------------------------------------------------------
@dataclass
class WorkerReady:
    index: int
    device: str
    pid: int
    node: str = ""              # host name (local engine) or "ip/node-id" (Ray engine)


@dataclass
class BatchReduced:
    uid: str
    batch_id: int
    result: "BatchResult"


FailReason = Literal["no_setup", "no_geometry", "reduction_error", "file_unavailable", "refused", "quarantined"]

#: added by ingest to a stop document: events lost upstream (seq_num gaps, or announced by its
#: num_events) that never arrived and were not recovered from the catalogue
MISSING_EVENTS_KEY = "scatterflow_missing_events"
#: added by ingest to a stop document: events lost upstream and recovered from the catalogue
RECOVERED_EVENTS_KEY = "scatterflow_recovered_events"


@dataclass
class BatchFailed:
    uid: str
    batch_id: int
    seq: np.ndarray
    reason: FailReason
    detail: str


@dataclass
class SetupFailed:
    uid: str
    detail: str
    traceback: str


@dataclass
class RunStopped:
    uid: str
    final: "RunFinal"


ToWorker = Union[StartRun, FrameBatch, StopRun, Shutdown]
FromWorker = Union[WorkerReady, BatchReduced, BatchFailed, SetupFailed, RunStopped]
