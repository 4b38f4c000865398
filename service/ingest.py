"""Ingest: Bluesky documents from bluesky's 0MQ proxy, decoded, validated and turned into frames.

Where a frame enters the service: `ZmqSubscriber` (a dedicated receive thread into a bounded
queue) -> `DocumentDecoder.decode` (framing ``prefix SP name SP payload``, msgpack with
msgpack-numpy by default, pickle only with ``allow_pickle``) -> `DocumentRouter.route`
(event-model schema validation, per-run state, frame extraction) -> `FrameSink` (the dispatcher).

Every refusal raises `RejectedInput(reason)`; the router counts it and carries on.
"""
from __future__ import annotations

import functools
import logging
import pickle
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import msgpack
import msgpack_numpy
import numpy as np
from event_model import DocumentNames, schema_validators, unpack_event_page

from .config import IngestConfig
from .errors import RejectedInput
from .metrics import Metrics
from .resolve import FrameResolver, frame_shape

log = logging.getLogger(__name__)

_msgpack_unpack = functools.partial(msgpack.unpackb, object_hook=msgpack_numpy.decode,
                                    strict_map_key=False)
DOCUMENT_NAMES = frozenset(n.name for n in DocumentNames)


# --------------------------------------------------------------------------- decoding
class DocumentDecoder:
    """Turn one 0MQ message into ``(name, document)``, or raise RejectedInput."""

    def __init__(self, *, serializer: str = "msgpack", allow_pickle: bool = False,
                 prefix: bytes = b"", max_message_bytes: int = 256 * 2**20):
        if serializer not in ("msgpack", "pickle"):
            raise ValueError(f"serializer must be 'msgpack' or 'pickle', got {serializer!r}")
        if serializer == "pickle" and not allow_pickle:
            raise ValueError("serializer 'pickle' needs allow_pickle: true (pickle runs code from the network)")
        self.serializer = serializer
        self.allow_pickle = allow_pickle
        self.prefix = prefix
        self.max_message_bytes = max_message_bytes

    def decode(self, message: bytes) -> tuple[str, dict]:
        if len(message) > self.max_message_bytes:
            raise RejectedInput("message_too_large", f"{len(message)} bytes > {self.max_message_bytes}")
        parts = message.split(b" ", 2)
        if len(parts) != 3:
            raise RejectedInput("bad_framing", "expected 'prefix name payload'")
        prefix, raw_name, payload = parts
        if prefix != self.prefix:
            raise RejectedInput("wrong_prefix", repr(prefix[:32]))
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise RejectedInput("bad_framing", "document name is not ASCII") from None
        if name not in DOCUMENT_NAMES:
            raise RejectedInput("unknown_document", repr(name[:40]))
        doc = self._deserialize(payload)
        if not isinstance(doc, dict):
            raise RejectedInput("malformed_document", f"payload is {type(doc).__name__}, not a mapping")
        return name, doc

    def _deserialize(self, payload: bytes) -> Any:
        looks_pickled = payload[:1] == b"\x80"          # pickle protocol >= 2 opcode PROTO
        if looks_pickled:
            if not self.allow_pickle:
                raise RejectedInput("pickle_refused", "pickle payload while allow_pickle is false")
            try:
                return pickle.loads(payload)  # allow_pickle: the operator turned it on
            except Exception as exc:
                raise RejectedInput("undecodable", f"pickle: {exc}") from None
        if self.serializer != "msgpack":
            raise RejectedInput("undecodable", "expected a pickle payload")
        try:
            return _msgpack_unpack(payload)
        except Exception as exc:
            raise RejectedInput("undecodable", f"msgpack: {type(exc).__name__}") from None


# --------------------------------------------------------------------------- per-run state
@dataclass
class StreamInfo:
    """One event stream (descriptor) of a run and where its frames are."""
    descriptor: dict
    frame_field: str | None
    frame_shape: tuple[int, ...] | None
    external_stream: bool = False       # frames arrive by stream_datum, not in the events
    profile: tuple[str, str, str | None] | None = None   # (intensity, q, sigma) fields of reduced 1D profiles
    last_seq_num: int = 0


@dataclass
class RunInfo:
    """What ingest knows of one open run."""
    uid: str
    start: dict
    streams: dict[str, StreamInfo] = field(default_factory=dict)   # descriptor uid -> stream
    frames: int = 0
    last_seen: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Frame:
    """One detector frame (kind "frame": (rows, cols) counts, row-major) or an already reduced
    profile (kind "profile": (3, N) rows q 1/nm, intensity, sigma) handed to the dispatcher.
    `arrival` is time.monotonic() at receipt."""
    run_uid: str
    seq_num: int
    time: float                 # event time, s since epoch
    data: np.ndarray
    arrival: float
    scalars: dict[str, float]   # the event's other scalar fields (motors, truth in simulation)
    kind: str = "frame"


class FrameSink(Protocol):
    def start_run(self, uid: str, start: dict) -> None: ...
    def submit(self, frame: Frame) -> None: ...
    def stop_run(self, uid: str, stop: dict) -> None: ...


def choose_frame_field(descriptor: dict, configured: str | None) -> tuple[str | None, tuple[int, ...] | None]:
    """The configured field if the descriptor has it, else the first field holding 2D frames
    (shape [rows, cols], or [1, rows, cols] as ophyd-async and area detectors describe them)."""
    keys = descriptor.get("data_keys", {})
    if configured is not None:
        if configured in keys:
            shape = frame_shape(keys[configured])
            return configured, (shape[1:] if shape else tuple(keys[configured].get("shape") or ()) or None)
        return None, None
    for name, key in keys.items():
        shape = frame_shape(key)
        if shape is not None and shape[0] == 1:
            return name, shape[1:]
    return None, None


def choose_profile_fields(descriptor: dict, config: IngestConfig) -> tuple[str, str, str | None] | None:
    """(intensity, q, sigma) field names when the descriptor carries reduced 1D profiles."""
    keys = descriptor.get("data_keys", {})
    i, q, s = config.profile_intensity_field, config.profile_q_field, config.profile_sigma_field
    if i in keys and q in keys and len(keys[i].get("shape") or []) == 1:
        return i, q, (s if s in keys else None)
    return None


class DocumentRouter:
    """Validate documents with event-model's schemas, keep per-run state, emit frames.

    One method per document type, as event-model's DocumentRouter; event_page is unpacked
    into events. State of a run is dropped at its stop document.
    """

    def __init__(self, sink: FrameSink, metrics: Metrics, config: IngestConfig | None = None):
        self.sink = sink
        self.metrics = metrics
        self.config = config or IngestConfig()
        self.runs: dict[str, RunInfo] = {}
        self._descriptor_run: dict[str, str] = {}      # descriptor uid -> run uid
        self.resolver = FrameResolver(root_map=self.config.root_map, retries=self.config.file_retries,
                                      retry_delay_s=self.config.file_retry_delay_s,
                                      max_frame_pixels=self.config.max_frame_pixels)
        self._lock = threading.Lock()

    # entry point ---------------------------------------------------------------------------
    def route(self, name: str, doc: dict, arrival: float | None = None) -> None:
        arrival = time.monotonic() if arrival is None else arrival
        try:
            with self._lock:
                self._validate(name, doc)
                handler = getattr(self, f"_on_{name}", None)
                if handler is None:
                    raise RejectedInput("unsupported_document", name)
                handler(doc, arrival)
            self.metrics.documents.labels(name).inc()
        except RejectedInput as exc:
            self.reject(exc)
        except Exception as exc:  # a bug must not stop ingest; count and log it
            log.exception("internal error handling %s document", name)
            self.reject(RejectedInput("internal_error", f"{type(exc).__name__}: {exc}"))

    def reject(self, exc: RejectedInput) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        log.warning("rejected input: %s", exc)

    @staticmethod
    def _validate(name: str, doc: dict) -> None:
        validator = schema_validators[DocumentNames[name]]
        try:
            validator.validate(doc)
        except jsonschema.ValidationError as exc:
            raise RejectedInput("invalid_document", f"{name}: {exc.message[:200]}") from None

    # handlers ------------------------------------------------------------------------------
    def _on_start(self, doc: dict, arrival: float) -> None:
        uid = doc["uid"]
        if uid in self.runs:
            raise RejectedInput("duplicate_start", uid)
        self.runs[uid] = RunInfo(uid=uid, start=doc)
        self.sink.start_run(uid, doc)

    def _on_descriptor(self, doc: dict, arrival: float) -> None:
        run = self.runs.get(doc["run_start"])
        if run is None:
            self.metrics.lost_upstream.labels("start").inc()
            raise RejectedInput("descriptor_without_start", doc["run_start"])
        fld, shape = choose_frame_field(doc, self.config.detector_field)
        external = fld in self.resolver.stream_data_keys(doc)
        profile = choose_profile_fields(doc, self.config) if fld is None else None
        run.streams[doc["uid"]] = StreamInfo(descriptor=doc, frame_field=fld, frame_shape=shape,
                                             external_stream=external, profile=profile)
        self._descriptor_run[doc["uid"]] = run.uid

    def _on_event(self, doc: dict, arrival: float) -> None:
        run_uid = self._descriptor_run.get(doc["descriptor"])
        if run_uid is None:
            raise RejectedInput("event_before_descriptor", doc["descriptor"])
        run = self.runs[run_uid]
        stream = run.streams[doc["descriptor"]]
        run.last_seen = time.monotonic()
        seq = int(doc["seq_num"])
        if seq > stream.last_seq_num + 1:
            self.metrics.lost_upstream.labels("event").inc(seq - stream.last_seq_num - 1)
            log.warning("run %s: seq_num gap %d -> %d (lost upstream)", run_uid[:8], stream.last_seq_num, seq)
        stream.last_seq_num = max(stream.last_seq_num, seq)
        if stream.profile is None and (stream.frame_field is None or stream.external_stream):
            return              # no frames (baseline), or frames that come by stream_datum
        if stream.profile is not None:
            frame, kind = self._extract_profile(doc, stream.profile), "profile"
        else:
            frame, kind = self._extract_frame(doc, stream), "frame"
        scalars = {k: float(v) for k, v in doc["data"].items()
                   if k != stream.frame_field and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
        run.frames += 1
        self.sink.submit(Frame(run_uid, seq, float(doc["time"]), frame, arrival, scalars, kind))

    def _on_event_page(self, doc: dict, arrival: float) -> None:
        for event in unpack_event_page(doc):
            self._on_event(event, arrival)

    def _on_stop(self, doc: dict, arrival: float) -> None:
        run = self.runs.pop(doc["run_start"], None)
        if run is None:
            self.metrics.lost_upstream.labels("start").inc()
            raise RejectedInput("stop_without_start", doc["run_start"])
        for d in run.streams:
            self._descriptor_run.pop(d, None)
        self.resolver.forget_run(run.uid)
        self.sink.stop_run(run.uid, doc)

    # frames in files (service/resolve.py) --------------------------------------------------
    def _on_resource(self, doc: dict, arrival: float) -> None:
        self.resolver.resource(doc)

    def _on_datum(self, doc: dict, arrival: float) -> None:
        self.resolver.datum(doc)

    def _on_datum_page(self, doc: dict, arrival: float) -> None:
        self.resolver.datum_page(doc)

    def _on_stream_resource(self, doc: dict, arrival: float) -> None:
        self.resolver.stream_resource(doc)

    def _on_stream_datum(self, doc: dict, arrival: float) -> None:
        """Frames written to HDF5 by ophyd-async detectors. The event that goes with them
        carries no image, so the frame time is the stream_datum's arrival (wall clock)."""
        run_uid = self._descriptor_run.get(doc["descriptor"])
        if run_uid is None:
            raise RejectedInput("stream_datum_before_descriptor", doc["descriptor"])
        run = self.runs[run_uid]
        run.last_seen = time.monotonic()
        for seq, frame in self.resolver.stream_datum(doc):
            run.frames += 1
            self.sink.submit(Frame(run_uid, int(seq), time.time(), self._checked(frame, run.streams[doc["descriptor"]]),
                                   arrival, {}))

    def _extract_frame(self, doc: dict, stream: StreamInfo) -> np.ndarray:
        value = doc["data"].get(stream.frame_field)
        if value is None:
            raise RejectedInput("missing_frame", stream.frame_field)
        if isinstance(value, str) or doc.get("filled", {}).get(stream.frame_field) is False:
            frame = self.resolver.fill_event(doc, stream.descriptor, stream.frame_field)
        else:
            frame = np.asarray(value)
        return self._checked(frame, stream)

    def _extract_profile(self, doc: dict, fields: tuple[str, str, str | None]) -> np.ndarray:
        """(3, N): q (1/nm), intensity, sigma (Poisson sqrt(max(I, 1)) when the event has none)."""
        i_f, q_f, s_f = fields
        try:
            intensity = np.asarray(doc["data"][i_f], dtype=np.float64)
            q = np.asarray(doc["data"][q_f], dtype=np.float64)
            sigma = (np.asarray(doc["data"][s_f], dtype=np.float64) if s_f is not None
                     else np.sqrt(np.maximum(intensity, 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise RejectedInput("bad_profile", f"{type(exc).__name__}: {exc}") from None
        if not (intensity.ndim == q.ndim == sigma.ndim == 1 and intensity.shape == q.shape == sigma.shape):
            raise RejectedInput("bad_profile", f"shapes I {intensity.shape}, q {q.shape}, sigma {sigma.shape}")
        if not (np.isfinite(q).all() and np.all(np.diff(q) > 0)):
            raise RejectedInput("bad_profile", "q must be finite and increasing")
        return np.stack([q, intensity, sigma])

    def _checked(self, frame: np.ndarray, stream: StreamInfo) -> np.ndarray:
        if frame.ndim == 3 and frame.shape[0] == 1:
            frame = frame[0]
        if frame.dtype.kind not in "uif":
            raise RejectedInput("bad_dtype", str(frame.dtype))
        if frame.size > self.config.max_frame_pixels:
            raise RejectedInput("frame_too_large", str(frame.shape))
        if frame.ndim != 2 or (stream.frame_shape is not None and tuple(frame.shape) != stream.frame_shape):
            raise RejectedInput("wrong_shape", f"{frame.shape} != descriptor {stream.frame_shape}")
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            raise RejectedInput("nonfinite_frame", f"{int((~np.isfinite(frame)).sum())} NaN/inf pixels")
        return frame

    def expire(self, idle_s: float) -> list[str]:
        """Close runs idle for longer than `idle_s` (no stop document); returns their uids."""
        now = time.monotonic()
        with self._lock:
            stale = [u for u, r in self.runs.items() if now - r.last_seen > idle_s]
            for uid in stale:
                run = self.runs.pop(uid)
                for d in run.streams:
                    self._descriptor_run.pop(d, None)
                self.resolver.forget_run(uid)
        for uid in stale:
            log.warning("run %s: no stop document after %.0f s idle; closed as timed out", uid[:8], idle_s)
            self.sink.stop_run(uid, {"run_start": uid, "exit_status": "abort", "reason": "timeout: no stop document",
                                     "time": time.time(), "uid": "", "num_events": {}})
        return stale


# --------------------------------------------------------------------------- the socket
class ZmqSubscriber:
    """SUB socket on a dedicated thread into a bounded queue, and a routing thread after it.

    0MQ PUB/SUB drops silently past the high-water mark; receiving on its own thread with a
    high RCVHWM keeps up, and the bounded queue blocks that thread (lossless) when full.
    """

    def __init__(self, config: IngestConfig, router: DocumentRouter, metrics: Metrics):
        self.config = config
        self.router = router
        self.metrics = metrics
        self.decoder = DocumentDecoder(serializer=config.serializer, allow_pickle=config.allow_pickle,
                                       prefix=config.prefix.encode(), max_message_bytes=config.max_message_bytes)
        self.queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.received = 0

    def start(self) -> None:
        import zmq   # sockets opened here, not at construction (bluesky's convention)
        ctx = zmq.Context.instance()
        self._socket = ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        self._socket.setsockopt(zmq.SUBSCRIBE, self.config.prefix.encode() + b" " if self.config.prefix else b"")
        self._socket.connect(self.config.address)
        self._threads = [threading.Thread(target=self._receive, name="ingest-recv", daemon=True),
                         threading.Thread(target=self._route, name="ingest-route", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("ingest: subscribed to %s (serializer %s, pickle %s)", self.config.address,
                 self.config.serializer, "allowed" if self.config.allow_pickle else "refused")

    def _receive(self) -> None:
        import zmq
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            message = self._socket.recv(copy=True)
            self.received += 1
            item = (message, time.monotonic())
            while not self._stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.metrics.queue_depth.labels("ingest").set(self.queue.qsize())
        self._socket.close(linger=0)

    def _route(self) -> None:
        while not (self._stop.is_set() and self.queue.empty()):
            try:
                message, arrival = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                name, doc = self.decoder.decode(message)
            except RejectedInput as exc:
                self.router.reject(exc)
                continue
            self.router.route(name, doc, arrival)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
