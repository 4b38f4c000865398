"""Ingest: Bluesky documents from bluesky's 0MQ proxy, decoded, validated and turned into frames.

Where a frame enters the service: `ZmqSubscriber` (a dedicated receive thread into a bounded
queue) -> `DocumentDecoder.decode` (framing ``prefix SP name SP payload``, msgpack with
msgpack-numpy by default, pickle only with ``allow_pickle``) -> `DocumentRouter.route`
(event-model schema validation, per-run state, frame extraction) -> `FrameSink` (the dispatcher).

Every refusal raises `RejectedInput(reason)`; the router counts it and carries on. Hostile
input is bounded before it costs memory: message bytes, msgpack objects and nesting depth,
array dtypes (service/decode.py: `DocumentDecoder`), frame pixels,
open runs (the idlest is evicted past ``max_open_runs``), seq_num jumps and bytes waiting in the
receive queue (`IngestConfig`); tests/test_fuzz.py, tests/test_hardening_ingest.py.

Frames in files are read off the routing thread: a run that reads files gets a `RunLane` (a
thread of its own through which all its frames and its stop pass, in document order), and each
read runs with a timeout (`FrameResolver.read`), so a missing, slow or hung file holds back its
own run only. Every message is counted once, accepted or refused, also when its frames were
read on a lane (counted there, once they are).

Events lost on the link are fetched back from the catalogue when one is configured
(service/recovery.py): a `Recover` item on the run's lane, ahead of the run's later frames.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import jsonschema
import numpy as np
from event_model import DocumentNames, schema_validators, unpack_event_page

from .config import IngestConfig
from .decode import DocumentDecoder
from .detectors import MAX_DETECTORS, REPLAY_DOC_KEY, detector_start, match_field, run_detectors
from .errors import RejectedInput
from .frame_refs import FrameRef
from .messages import MISSING_EVENTS_KEY, RECOVERED_EVENTS_KEY, Frame, FrameKind
from .metrics import Metrics
from .recovery import CatalogRecovery
from .resolve import FileRead, FrameResolver, frame_shape

log = logging.getLogger(__name__)

REJECT_LOG_INTERVAL_S = 10.0            # at most one log line per refusal reason this often
LANE_MAX_ITEMS = 1000                   # frames of one run waiting for files; past it refused ("read_backlog")


def _range_of(doc: dict, name: str) -> tuple[int, int]:
    """(start, stop) of a stream_datum's ``indices`` or ``seq_nums`` (checked by the resolver)."""
    return int(doc[name]["start"]), int(doc[name]["stop"])


# --------------------------------------------------------------------------- per-run state
@dataclass
class StreamInfo:
    """One event stream (descriptor) of a run and where its frames are."""
    descriptor: dict
    frame_field: str | None
    frame_shape: tuple[int, ...] | None
    external_stream: bool = False       # frames arrive by stream_datum, not in the events
    profile: tuple[str, str, str | None] | None = None   # (intensity, q, sigma) fields of reduced 1D profiles
    external_profile: str | None = None  # field holding datum_ids of reduced profiles in files (NXcanSAS)
    last_seq_num: int = 0
    datum_seq_num: int = 0              # last seq_num whose frames came by stream_datum
    last_datum: tuple[str, int, int] | None = None    # that stream_datum's (stream_resource, indices stop, seq_nums stop)
    held: list = field(default_factory=list)     # [(seq_num, FileFrames)]: one frame's stream_datum awaiting its event
    gap_lost: int = 0                   # events counted lost upstream from seq_num gaps, not to be recovered
    fanout: list = field(default_factory=list)   # multi-detector run: [(analysis key, StreamInfo of one detector)]


@dataclass
class RunInfo:
    """What ingest knows of one open run."""
    uid: str
    start: dict
    streams: dict[str, StreamInfo] = field(default_factory=dict)   # descriptor uid -> stream
    last_seen: float = field(default_factory=time.monotonic)
    detectors: dict[str, str] = field(default_factory=dict)   # name -> analysis key (service/detectors.py); {}: one
    recovered: int = 0                  # lost frames read from their file (stream_datum gaps)

    @property
    def keys(self) -> list[str]:
        """Analysis keys of the run: its uid, or one per detector."""
        return list(self.detectors.values()) or [self.uid]


class FrameSink(Protocol):
    #: True: HDF5 frames are handed on as FrameRefs (service/frame_refs.py), read by the worker
    #: on its own node (the Ray engine); absent or False: ingest reads the pixels
    takes_file_refs: bool

    def start_run(self, uid: str, start: dict) -> None: ...
    def submit(self, frame: Frame) -> None: ...
    def stop_run(self, uid: str, stop: dict) -> None: ...


# --------------------------------------------------------------------------- runs that read files
@dataclass
class FileFrames:
    """Frames of analysis `key` still in a file: read on the run's lane, each frame checked
    against `stream` (None for profiles) and submitted. `alone`: a refusal is counted on its own
    (one detector of a multi-detector event) instead of refusing the whole document."""
    key: str
    read: FileRead
    time: float                 # event time, s since epoch
    arrival: float
    scalars: dict[str, float]
    kind: FrameKind
    stream: StreamInfo | None
    alone: bool = False


@dataclass
class DocumentEnd:
    """The last item of one document in a lane: the document is counted there, accepted, or
    refused with `error` or the first refusal of its items."""
    name: str
    error: RejectedInput | None = None


@dataclass
class Recover:
    """Events `seqs` of stream `stream_name` of run `run_uid` lost on the link, to fetch from
    the catalogue with the data keys `fields`; each event gives a frame to every (analysis key,
    StreamInfo) of `targets`. `at_stop`: the last try (the run has stopped)."""
    run_uid: str
    stream_name: str
    seqs: tuple[int, ...]
    fields: tuple[str, ...]
    targets: tuple[tuple[str, StreamInfo], ...]
    at_stop: bool = False


@dataclass
class RunEnd:
    """A run closed: `stop` (None at service shutdown) to the sink for each of `keys`, then its
    files closed; the lane's thread ends after it."""
    keys: list[str]
    stop: dict | None
    resources: list


class RunLane:
    """The items of one run that reads files (`Frame`, `FileFrames`, `DocumentEnd`, `RunEnd`),
    handled in order on a thread of the run's own by `handle(item, lane)`."""

    def __init__(self, uid: str, handle: Callable[[Any, "RunLane"], None]):
        self.uid = uid
        self.failed: RejectedInput | None = None      # first refusal among the current document's items
        self.recovered = 0                            # events fetched from the catalogue
        self.unrecoverable = 0                        # events the catalogue did not have in time
        self.retry_at_stop: list[Recover] = []        # recoveries that ran out of time while the run went on
        self._items: queue.Queue = queue.Queue()
        self._handle = handle
        self.thread = threading.Thread(target=self._run, name=f"ingest-files-{uid[:8]}", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        """Queue an item (or a threading.Event, set when reached); frames past LANE_MAX_ITEMS
        waiting are refused ("read_backlog")."""
        if isinstance(item, (Frame, FileFrames)) and self._items.qsize() >= LANE_MAX_ITEMS:
            raise RejectedInput("read_backlog", f"run {self.uid[:8]}: {LANE_MAX_ITEMS} frames wait for their files")
        self._items.put(item)

    def backlog(self) -> int:
        """Items waiting."""
        return self._items.qsize()

    def _run(self) -> None:
        while True:
            item = self._items.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._handle(item, self)
            if isinstance(item, RunEnd):
                return


def abort_stop(uid: str, reason: str) -> dict:
    """The stop document ingest writes for a run it closes itself (timeout, eviction)."""
    return {"run_start": uid, "exit_status": "abort", "reason": reason, "time": time.time(), "uid": "",
            "num_events": {}}


def with_fixed_shapes(descriptor: dict) -> dict:
    """The descriptor with only the data keys whose shape is a list of integers >= 0.

    event-model allows ``None`` for a dimension of variable length; such keys (and malformed
    shapes) cannot hold the fixed-size frames or profiles reduced here, so they are left out of
    the choice of frame and profile fields instead of failing the whole descriptor."""
    keys = descriptor.get("data_keys") or {}
    fixed = {name: key for name, key in keys.items()
             if all(isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0 and float(n).is_integer()
                    for n in key.get("shape") or [])}
    return descriptor if len(fixed) == len(keys) else {**descriptor, "data_keys": fixed}


def choose_frame_field(descriptor: dict, configured: str | None) -> tuple[str | None, tuple[int, ...] | None]:
    """The configured field if the descriptor has it, else the first field holding 2D frames
    (shape [rows, cols], or [1, rows, cols] as ophyd-async and area detectors describe them; a
    field in files may have [n, rows, cols], several frames per point, read as their sum)."""
    keys = descriptor.get("data_keys", {})
    if configured is not None:
        if configured in keys:
            shape = frame_shape(keys[configured])
            return configured, (shape[1:] if shape else tuple(keys[configured].get("shape") or ()) or None)
        return None, None
    for name, key in keys.items():
        shape = frame_shape(key)
        if shape is not None and (shape[0] == 1 or key.get("external")):
            return name, shape[1:]
    return None, None


def choose_external_profile(descriptor: dict) -> str | None:
    """The first field whose data live in a file (``external`` set) with a 1D shape: reduced
    profiles in NXcanSAS files. ``STREAM:`` ones arrive by stream_datum, others by datum_id."""
    for name, key in (descriptor.get("data_keys") or {}).items():
        shape = [int(s) for s in (key.get("shape") or [])]
        if key.get("external") and (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) and shape[-1] > 2:
            return name
    return None


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

    def __init__(self, sink: FrameSink, metrics: Metrics, config: IngestConfig | None = None, *,
                 max_detectors: int = MAX_DETECTORS, recovery: CatalogRecovery | None = None):
        self.sink = sink
        self.recovery = recovery                         # None: losses are counted, not recovered
        self.metrics = metrics
        self.config = config or IngestConfig()
        self.max_detectors = max_detectors               # limits.detectors
        self.runs: dict[str, RunInfo] = {}
        self._descriptor_run: dict[str, str] = {}      # descriptor uid -> run uid
        self.resolver = FrameResolver(root_map=self.config.root_map, allowed_roots=self.config.allowed_roots,
                                      retries=self.config.file_retries,
                                      retry_delay_s=self.config.file_retry_delay_s,
                                      max_frame_pixels=self.config.max_frame_pixels)
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._last_log: dict[str, tuple[float, int]] = {}    # reason -> (time of last line, refusals since)
        self._lanes: dict[str, RunLane] = {}            # open run uid -> its lane (runs that read files)
        self._ending: list[RunLane] = []                # lanes of closed runs, finishing their items
        self._deferred: RunLane | None = None           # the lane that took items of the document being routed
        self._deadline: float | None = None             # set by close(): reads get what is left until then

    # entry point ---------------------------------------------------------------------------
    def route(self, name: str, doc: dict, arrival: float | None = None) -> None:
        """Validate and handle one document; count it accepted or refused (on its run's lane,
        after its frames, when it handed frames to one)."""
        arrival = time.monotonic() if arrival is None else arrival
        error: RejectedInput | None = None
        with self._lock:
            try:
                self._validate(name, doc)
                handler = getattr(self, f"_on_{name}", None)
                if handler is None:
                    raise RejectedInput("unsupported_document", name)
                handler(doc, arrival)
            except RejectedInput as exc:
                error = exc
            except Exception as exc:  # a bug must not stop ingest; count and log it
                log.exception("internal error handling %s document", name)
                error = RejectedInput("internal_error", f"{type(exc).__name__}: {exc}")
            lane, self._deferred = self._deferred, None
            if lane is not None:                # before any RunEnd another thread could queue
                lane.put(DocumentEnd(name, error))
                return
        if error is None:
            self.metrics.documents.labels(name).inc()
        else:
            self.reject(error)

    def reject(self, exc: RejectedInput) -> None:
        """Count a refusal; log it, at most one line per reason every REJECT_LOG_INTERVAL_S
        (a flood of bad messages must not flood the log: the counter has every one)."""
        self.metrics.rejected.labels(exc.reason).inc()
        self._log_limited(exc.reason, f"rejected input: {exc}")

    def _log_limited(self, key: str, message: str) -> None:
        """Log a warning, at most one line per `key` every REJECT_LOG_INTERVAL_S."""
        now = time.monotonic()
        with self._log_lock:
            last, since = self._last_log.get(key, (-math.inf, 0))
            if now - last < REJECT_LOG_INTERVAL_S:
                self._last_log[key] = (last, since + 1)
                return
            self._last_log[key] = (now, 0)
        more = f" (and {since} more '{key}' in the last {now - last:.0f} s)" if since else ""
        log.warning("%s%s", message, more)

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
        if len(self.runs) >= self.config.max_open_runs:    # bounded state: room made for the newest run
            self._evict_idlest()
        run = self.runs[uid] = RunInfo(uid=uid, start=doc, detectors=run_detectors(doc, self.config.detector_fields,
                                                                               self.max_detectors))
        if not run.detectors:
            self.sink.start_run(uid, doc)
        for name, key in run.detectors.items():             # one analysis per detector
            self.sink.start_run(key, detector_start(doc, name, key))

    def _on_descriptor(self, doc: dict, arrival: float) -> None:
        run = self.runs.get(doc["run_start"])
        if run is None:
            self.metrics.lost_upstream.labels("start").inc()
            raise RejectedInput("descriptor_without_start", doc["run_start"])
        fixed = with_fixed_shapes(doc)
        if run.detectors:
            self._fanout_descriptor(run, doc, fixed)
            return
        fld, shape = choose_frame_field(fixed, self.config.detector_field)
        external = fld in self.resolver.stream_data_keys(fixed)
        profile = choose_profile_fields(fixed, self.config) if fld is None else None
        ext_profile = choose_external_profile(fixed) if fld is None and profile is None else None
        run.streams[doc["uid"]] = StreamInfo(descriptor=doc, frame_field=fld, frame_shape=shape,
                                             external_stream=external, profile=profile,
                                             external_profile=ext_profile)
        self._descriptor_run[doc["uid"]] = run.uid

    def _on_event(self, doc: dict, arrival: float) -> None:
        """seq_num (bluesky counts from 1, one by one, per stream): a gap counts the events
        between as lost upstream, at most ``ingest.max_seq_gap`` of them: an event further ahead
        is refused ("seq_num_out_of_range") and counts no loss (a corrupt seq_num, not a million
        lost events); below 1 it is refused ("bad_seq_num"); a repeated or late one is taken."""
        run_uid = self._descriptor_run.get(doc["descriptor"])
        if run_uid is None:
            raise RejectedInput("event_before_descriptor", doc["descriptor"])
        run = self.runs[run_uid]
        stream = run.streams[doc["descriptor"]]
        run.last_seen = time.monotonic()
        seq = int(doc["seq_num"])
        if not math.isfinite(doc["time"]):
            raise RejectedInput("bad_time", repr(doc["time"]))
        if seq < 1:
            raise RejectedInput("bad_seq_num", f"{seq} after {stream.last_seq_num}")
        gap = seq - stream.last_seq_num - 1
        if gap > self.config.max_seq_gap:
            raise RejectedInput("seq_num_out_of_range", f"{seq} after {stream.last_seq_num}: more than "
                                                        f"ingest.max_seq_gap ({self.config.max_seq_gap}) ahead")
        if gap > 0:
            self.metrics.lost_upstream.labels("event").inc(gap)
            log.warning("run %s: seq_num gap %d -> %d (lost upstream)", run_uid[:8], stream.last_seq_num, seq)
            if not stream.external_stream:      # else its frames come by stream_datum (_stream_datum_gap)
                recover = self._recovery_of(run, stream, range(stream.last_seq_num + 1, seq))
                if recover is not None:
                    self._enqueue(run, recover)
                else:
                    stream.gap_lost += gap
        stream.last_seq_num = max(stream.last_seq_num, seq)
        if stream.fanout:
            self._submit_fanout(run, stream, doc, seq, arrival)
            return
        if stream.external_profile is not None and isinstance(doc["data"].get(stream.external_profile), str):
            data, kind = self.resolver.plan_profile(doc, stream.external_profile), "profile"
        elif stream.external_stream:                # its frame came by stream_datum, held for this event
            self._release_held(run, stream, doc, {k: float(v) for k, v in doc["data"].items()
                                                  if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})
            return
        elif stream.profile is None and stream.frame_field is None:
            return              # no frames (baseline)
        elif stream.profile is not None:
            data, kind = self._extract_profile(doc, stream.profile), "profile"
        else:
            data, kind = self._extract_frame(doc, stream), "frame"
        scalars = {k: float(v) for k, v in doc["data"].items()
                   if k != stream.frame_field and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
        self._emit(run, self._item(run_uid, seq, float(doc["time"]), data, arrival, scalars, kind, stream))

    @staticmethod
    def _item(key: str, seq: int, t: float, data: np.ndarray | FileRead, arrival: float, scalars: dict,
              kind: FrameKind, stream: StreamInfo, alone: bool = False) -> Frame | FileFrames:
        if isinstance(data, FileRead):
            return FileFrames(key, data, t, arrival, scalars, kind, stream if kind == "frame" else None, alone)
        return Frame(key, seq, t, data, arrival, scalars, kind)

    def _recovery_of(self, run: RunInfo, stream: StreamInfo, seqs: range, at_stop: bool = False) -> Recover | None:
        """The `Recover` item for events `seqs` of `stream`, or None when they are not to be
        fetched: no catalogue, a replayed run (not the catalogue's uid), no frames or profiles
        in the stream's events (a baseline stream; profiles in files)."""
        if self.recovery is None or REPLAY_DOC_KEY in run.start or not seqs:
            return None
        targets = tuple((key, sub) for key, sub in stream.fanout if sub.frame_field) if stream.fanout else \
            ((run.uid, stream),) if stream.frame_field or stream.profile else ()
        if not targets:
            return None
        arrays = {f for _, sub in targets for f in ([sub.frame_field] if sub.frame_field else [*filter(None, sub.profile)])}
        scalars = {k for k, dk in (stream.descriptor.get("data_keys") or {}).items()
                   if dk.get("dtype") in ("number", "integer") and not dk.get("shape") and k not in arrays}
        return Recover(run.uid, stream.descriptor.get("name") or "primary", tuple(seqs),
                       tuple(sorted(arrays)) + tuple(sorted(scalars)), targets, at_stop)

    def _enqueue(self, run: RunInfo, item: Recover) -> None:
        """A recovery onto the run's lane (opened if the run has none): the run's later items wait behind it."""
        lane = self._lanes.get(run.uid)
        if lane is None:
            lane = self._lanes[run.uid] = RunLane(run.uid, self._lane_item)
        lane.put(item)

    def _emit(self, run: RunInfo, item: Frame | FileFrames) -> None:
        """Hand a frame on: to the sink now, or through the run's lane once the run reads files
        (its first file read opens the lane; from then on all its frames go through it, in order)."""
        lane = self._lanes.get(run.uid)
        if lane is None and isinstance(item, FileFrames):
            lane = self._lanes[run.uid] = RunLane(run.uid, self._lane_item)
        if lane is None:
            self.sink.submit(item)
            return
        lane.put(item)
        self._deferred = lane

    def _fanout_descriptor(self, run: RunInfo, doc: dict, fixed: dict) -> None:
        """A descriptor of a multi-detector run: each detector's 2D field (service/detectors.py
        ``match_field``) becomes a frame source of its own analysis key."""
        external = self.resolver.stream_data_keys(fixed)
        fields = {name: shape[1:] for name, key in (fixed.get("data_keys") or {}).items()
                  if (shape := frame_shape(key)) is not None and (shape[0] == 1 or key.get("external"))}
        fanout = []
        for name, key in run.detectors.items():
            fld = match_field(name, fields)
            if fld is not None:
                fanout.append((key, StreamInfo(descriptor=doc, frame_field=fld, frame_shape=fields[fld],
                                               external_stream=fld in external)))
        run.streams[doc["uid"]] = StreamInfo(descriptor=doc, frame_field=None, frame_shape=None, fanout=fanout)
        self._descriptor_run[doc["uid"]] = run.uid

    def _submit_fanout(self, run: RunInfo, stream: StreamInfo, doc: dict, seq: int, arrival: float) -> None:
        """One frame per detector of the event, each to its analysis; a bad frame of one
        detector is refused (counted) without losing the others'."""
        fields = {sub.frame_field for _, sub in stream.fanout}
        scalars = {k: float(v) for k, v in doc["data"].items()
                   if k not in fields and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
        for key, sub in stream.fanout:
            if sub.external_stream:
                continue        # frames by stream_datum: not routed per detector (single-detector runs only)
            try:
                data = self._extract_frame(doc, sub)
                self._emit(run, self._item(key, seq, float(doc["time"]), data, arrival, scalars, "frame", sub,
                                           alone=True))
            except RejectedInput as exc:
                self.reject(exc)

    def _on_event_page(self, doc: dict, arrival: float) -> None:
        for event in unpack_event_page(doc):
            self._on_event(event, arrival)

    def _on_stop(self, doc: dict, arrival: float) -> None:
        """The run's stop to the sink (after its frames), with ``scatterflow_missing_events``
        when events it announced never arrived (`_missing_events`)."""
        run = self.runs.get(doc["run_start"])
        if run is None:
            self.metrics.lost_upstream.labels("start").inc()
            raise RejectedInput("stop_without_start", doc["run_start"])
        missing = self._missing_events(run, doc)
        counts = {**({MISSING_EVENTS_KEY: missing} if missing else {}),
                  **({RECOVERED_EVENTS_KEY: run.recovered} if run.recovered else {})}
        self._close(run.uid, {**doc, **counts})

    def _missing_events(self, run: RunInfo, stop: dict) -> int:
        """Events of `run` that never arrived: the seq_num gaps (counted lost upstream when they
        showed) plus, per stream, the events its stop's ``num_events`` announces beyond the last
        seq_num seen (counted lost upstream here, once). Streams whose descriptor never arrived
        are left out (their events, if any came, were refused), and so is an announcement more
        than ``ingest.max_seq_gap`` beyond the last event (logged, not counted)."""
        announced = stop.get("num_events") or {}
        last: dict[str, tuple[int, StreamInfo]] = {}
        gaps = 0
        for stream in run.streams.values():
            name = stream.descriptor.get("name")
            seen = stream.datum_seq_num if stream.external_stream and stream.datum_seq_num else stream.last_seq_num
            if seen >= last.get(name, (0, None))[0]:
                last[name] = (seen, stream)
            gaps += stream.gap_lost
        tail = 0
        for name, (seen, stream) in last.items():
            n = announced.get(name) if isinstance(name, str) else None
            if isinstance(n, bool) or not isinstance(n, int) or n <= seen:
                continue
            if n - seen > self.config.max_seq_gap:
                log.warning("run %s: stop announces %d %r events after %d: not counted as lost", run.uid[:8], n,
                            name, seen)
                continue
            recover = self._recovery_of(run, stream, range(seen + 1, n + 1), at_stop=True)
            if recover is not None:
                self.metrics.lost_upstream.labels("event").inc(n - seen)
                log.warning("run %s: %d event(s) announced by the stop never arrived; fetching them from the "
                            "catalogue", run.uid[:8], n - seen)
                self._enqueue(run, recover)
                continue
            tail += n - seen
        if tail:
            self.metrics.lost_upstream.labels("event").inc(tail)
            log.warning("run %s: %d event(s) announced by the stop never arrived (lost upstream)", run.uid[:8], tail)
        return gaps + tail

    # frames in files (service/resolve.py) --------------------------------------------------
    def _open_run_of(self, doc: dict) -> None:
        """Resources are kept per run and dropped at its stop: one naming no open run would
        never be dropped, so it is refused (ophyd v1 and ophyd-async both set run_start)."""
        if doc.get("run_start") not in self.runs:
            self.metrics.lost_upstream.labels("start").inc()
            raise RejectedInput("resource_without_start", str(doc.get("run_start"))[:40])

    def _on_resource(self, doc: dict, arrival: float) -> None:
        self._open_run_of(doc)
        self.resolver.resource(doc)

    def _on_datum(self, doc: dict, arrival: float) -> None:
        self.resolver.datum(doc)

    def _on_datum_page(self, doc: dict, arrival: float) -> None:
        self.resolver.datum_page(doc)

    def _on_stream_resource(self, doc: dict, arrival: float) -> None:
        self._open_run_of(doc)
        self.resolver.stream_resource(doc)

    def _on_stream_datum(self, doc: dict, arrival: float) -> None:
        """Frames written to HDF5 by ophyd-async detectors. The event that goes with them
        carries no image; it follows its stream_datum, which waits for it (`_release_held`) when
        it names one frame, so that the frame gets the event's time and scalars. Frames of a
        stream_datum naming several go at once, timed by its arrival (wall clock)."""
        run_uid = self._descriptor_run.get(doc["descriptor"])
        if run_uid is None:
            raise RejectedInput("stream_datum_before_descriptor", doc["descriptor"])
        run = self.runs[run_uid]
        run.last_seen = time.monotonic()
        plan = self.resolver.plan_stream_datum(doc)
        stream = run.streams[doc["descriptor"]]
        if plan is not None and stream.external_stream:
            lost = self._stream_datum_gap(run, stream, doc)
            if lost is not None:
                self._release_held(run, stream)
                self._emit(run, FileFrames(run_uid, lost, time.time(), arrival, {}, "frame", stream))
        if plan is not None:
            kind = self.resolver.stream_kind(doc)
            item = FileFrames(run_uid, plan, time.time(), arrival, {}, kind, stream if kind == "frame" else None)
            first, stop = _range_of(doc, "seq_nums")
            if kind == "frame" and stream.external_stream and stop - first == 1:
                stream.held.append((first, item))
            else:
                self._release_held(run, stream)
                self._emit(run, item)

    def _release_held(self, run: RunInfo, stream: StreamInfo, event: dict | None = None,
                      scalars: dict | None = None) -> None:
        """Hand on the stream's held frames up to `event`'s seq_num (all without one), the one
        of that seq_num with the event's time and scalars."""
        seq = int(event["seq_num"]) if event is not None else None
        keep = []
        for first, item in stream.held:
            if seq is not None and first > seq:
                keep.append((first, item))
            elif seq is not None and first == seq:
                self._emit(run, replace(item, time=float(event["time"]), scalars=scalars or {}))
            else:
                self._emit(run, item)
        stream.held = keep

    def _stream_datum_gap(self, run: RunInfo, stream: StreamInfo, doc: dict) -> FileRead | None:
        """Frames by stream_datum: a ``seq_nums`` range starting past the last one seen means
        stream_datum documents were lost. Between two of one stream_resource, the lost frames are
        the rows between their ``indices`` (a resource's stream_datums tile its rows): returned,
        to be read from the file like the others; otherwise fetched from the catalogue (or counted)."""
        first, stop = int(doc["seq_nums"]["start"]), int(doc["seq_nums"]["stop"])
        gap = first - stream.datum_seq_num - 1
        last, stream.last_datum = stream.last_datum, (doc["stream_resource"], int(doc["indices"]["start"]) + stop - first,
                                                      stop)
        stream.datum_seq_num = max(stream.datum_seq_num, stop - 1)
        if not (0 < gap <= self.config.max_seq_gap and first > 0):
            return None
        self.metrics.lost_upstream.labels("stream_datum").inc(gap)
        log.warning("run %s: stream_datum seq_nums jump %d -> %d (lost upstream)", run.uid[:8], first - gap - 1, first)
        if last is not None and last[0] == doc["stream_resource"] and int(doc["indices"]["start"]) - last[1] == gap:
            self.metrics.events_recovered.inc(gap)
            run.recovered += gap
            lost = {**doc, "uid": f"{doc['uid']}/lost", "indices": {"start": last[1], "stop": last[1] + gap},
                    "seq_nums": {"start": last[2], "stop": first}}
            return self.resolver.plan_stream_datum(lost)
        recover = self._recovery_of(run, stream, range(first - gap, first))
        if recover is not None:
            self._enqueue(run, recover)
        else:
            stream.gap_lost += gap
        return None

    def _extract_frame(self, doc: dict, stream: StreamInfo) -> np.ndarray | FileRead:
        """The event's frame, checked; or, when it is in a file, the read of it (checked once read)."""
        value = doc["data"].get(stream.frame_field)
        if value is None:
            raise RejectedInput("missing_frame", stream.frame_field)
        if isinstance(value, str) or doc.get("filled", {}).get(stream.frame_field) is False:
            return self.resolver.plan_event(doc, stream.descriptor, stream.frame_field)
        else:
            try:
                frame = np.asarray(value)
            except (ValueError, TypeError) as exc:      # ragged nested lists
                raise RejectedInput("bad_frame", f"{type(exc).__name__}: {str(exc)[:120]}") from None
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

    def _checked_ref(self, ref: FrameRef, stream: StreamInfo) -> None:
        """`_checked` for a frame left in its file: dtype, size and shape (its pixels, and so
        non-finite values, are the worker's to see)."""
        if np.dtype(ref.dtype).kind not in "uif":
            raise RejectedInput("bad_dtype", ref.dtype)
        if ref.size > self.config.max_frame_pixels:
            raise RejectedInput("frame_too_large", str(ref.shape))
        if stream.frame_shape is not None and tuple(ref.shape) != stream.frame_shape:
            raise RejectedInput("wrong_shape", f"{ref.shape} != descriptor {stream.frame_shape}")

    def expire(self, idle_s: float) -> list[str]:
        """Close runs idle for longer than `idle_s` (no stop document); returns their uids."""
        now = time.monotonic()
        ends = []
        with self._lock:
            stale = [u for u, r in self.runs.items() if now - r.last_seen > idle_s]
            for uid in stale:
                end, lane = self._detach(uid, abort_stop(uid, "timeout: no stop document"))
                if lane is not None:
                    lane.put(end)
                else:
                    ends.append(end)
        for uid in stale:
            log.warning("run %s: no stop document after %.0f s idle; closed as timed out", uid[:8], idle_s)
        for end in ends:                        # the sink may block (back-pressure): not under the lock
            self._end_run(end)
        return stale

    def _evict_idlest(self) -> None:
        """Make room for a new run at ``ingest.max_open_runs``: the open run idle longest is
        closed as the run timeout closes it (exit_status "abort") and counted (runs_evicted)."""
        victim = min(self.runs.values(), key=lambda r: r.last_seen)
        idle = time.monotonic() - victim.last_seen
        self._log_limited("evicted", f"run {victim.uid[:8]}: closed after {idle:.1f} s idle to make room for a "
                                     f"new run (ingest.max_open_runs = {self.config.max_open_runs})")
        self.metrics.runs_evicted.inc()
        self._close(victim.uid, abort_stop(victim.uid, f"evicted: {len(self.runs)} runs open (ingest.max_open_runs), "
                                                        f"this one idle longest ({idle:.1f} s)"))

    def _close(self, uid: str, stop: dict) -> None:
        """Close an open run: its stop to the sink after its frames (through its lane, if any)."""
        end, lane = self._detach(uid, stop)
        if lane is not None:
            lane.put(end)
        else:
            self._end_run(end)

    def _detach(self, uid: str, stop: dict | None) -> tuple[RunEnd, RunLane | None]:
        """Forget open run `uid` (under the lock): what closing it still needs, and its lane."""
        run = self.runs.pop(uid)
        deferred = self._deferred                # the closing document is counted on its own
        for stream in run.streams.values():
            self._release_held(run, stream)
        self._deferred = deferred
        for d in run.streams:
            self._descriptor_run.pop(d, None)
        lane = self._lanes.pop(uid, None)
        if lane is not None:
            self._ending = [x for x in self._ending if x.thread.is_alive()]
            self._ending.append(lane)
        return RunEnd(run.keys, stop, self.resolver.detach_run(uid)), lane

    def _end_run(self, end: RunEnd) -> None:
        for key in end.keys if end.stop is not None else ():
            self.sink.stop_run(key, end.stop)
        self.resolver.close_files(end.resources)

    # the lanes (their own threads) ---------------------------------------------------------
    def _lane_item(self, item, lane: RunLane) -> None:
        """One item of a run's lane. Items of a document after one refused are dropped, as the
        routing thread stops at a document's first refusal; the document is counted at its end."""
        try:
            if isinstance(item, DocumentEnd):
                error, lane.failed = item.error or lane.failed, None
                if error is None:
                    self.metrics.documents.labels(item.name).inc()
                else:
                    self.reject(error)
            elif isinstance(item, RunEnd):
                self._end_run(self._recovered_end(item, lane))
            elif isinstance(item, Recover):
                self._recover(item, lane)
            elif lane.failed is None:
                try:
                    self._submit_item(item)
                except RejectedInput as exc:
                    if isinstance(item, FileFrames) and item.alone:
                        self.reject(exc)
                    else:
                        lane.failed = exc
        except Exception as exc:  # a bug must not stop the lane; count and log it
            log.exception("internal error on the file lane of run %s", lane.uid[:8])
            self.reject(RejectedInput("internal_error", f"{type(exc).__name__}: {exc}"))

    def _recover(self, item: Recover, lane: RunLane) -> None:
        """Fetch the events of `item` from the catalogue and submit their frames. While the run
        goes on, the wait ends at ``catalog.recover_wait_s`` or when half the lane's room is
        taken by the frames waiting behind it; what is missing then is tried again at the stop."""
        wait = self.recovery.wait_at_stop_s if item.at_stop else self.recovery.wait_s
        deadline = time.monotonic() + wait
        if self._deadline is not None:
            deadline = min(deadline, self._deadline)
        crowded = (lambda: False) if item.at_stop else (lambda: lane.backlog() > LANE_MAX_ITEMS // 2)
        got = set()
        for event in self.recovery.events(item.run_uid, item.stream_name, list(item.seqs), list(item.fields),
                                          deadline, crowded):
            got.add(event.seq_num)
            doc = {"seq_num": event.seq_num, "time": event.time, "data": event.data, "filled": {}}
            for key, stream in item.targets:
                arrays = {stream.frame_field, *(stream.profile or ())}
                scalars = {k: float(v) for k, v in event.data.items()
                           if k not in arrays and isinstance(v, (int, float)) and not isinstance(v, bool)}
                try:
                    if stream.profile is not None:
                        data, kind = self._extract_profile(doc, stream.profile), "profile"
                    else:
                        data, kind = self._extract_frame(doc, stream), "frame"
                    self.sink.submit(Frame(key, event.seq_num, event.time, data, time.monotonic(), scalars, kind))
                except RejectedInput as exc:
                    self.reject(exc)
        lane.recovered += len(got)
        self.metrics.events_recovered.inc(len(got))
        missing = tuple(s for s in item.seqs if s not in got)
        if got:
            log.info("run %s: %d lost event(s) of %r recovered from the catalogue", item.run_uid[:8], len(got),
                     item.stream_name)
        if missing and not item.at_stop:
            log.warning("run %s: %d lost event(s) of %r not in the catalogue after %.1f s; tried again at the stop",
                        item.run_uid[:8], len(missing), item.stream_name, wait)
            lane.retry_at_stop.append(replace(item, seqs=missing, at_stop=True))
        elif missing:
            lane.unrecoverable += len(missing)
            self.metrics.events_unrecoverable.inc(len(missing))
            log.warning("run %s: %d lost event(s) of %r not in the catalogue (%s): unrecoverable", item.run_uid[:8],
                        len(missing), item.stream_name, self.recovery.uri)

    def _recovered_end(self, end: RunEnd, lane: RunLane) -> RunEnd:
        """A run's end after its recoveries: those that ran out of time tried once more, and the
        stop naming what was recovered and what is still missing."""
        if end.stop is None:
            return end
        retries, lane.retry_at_stop = lane.retry_at_stop, []
        for item in retries:
            self._recover(item, lane)
        if not (lane.recovered or lane.unrecoverable):
            return end
        stop = dict(end.stop)
        stop[MISSING_EVENTS_KEY] = int(stop.get(MISSING_EVENTS_KEY) or 0) + lane.unrecoverable
        stop[RECOVERED_EVENTS_KEY] = int(stop.get(RECOVERED_EVENTS_KEY) or 0) + lane.recovered
        return replace(end, stop=stop)

    def _submit_item(self, item: Frame | FileFrames) -> None:
        if isinstance(item, Frame):
            self.sink.submit(item)
            return
        if item.read.locate is not None and getattr(self.sink, "takes_file_refs", False):
            located = FileRead(item.read.resource, item.read.locate)
            for seq, ref in self.resolver.read(located, self._read_timeout()):
                if item.stream is not None:
                    self._checked_ref(ref, item.stream)
                self.sink.submit(Frame(item.key, int(seq), item.time, ref, item.arrival, item.scalars, item.kind))
            return
        for seq, data in self.resolver.read(item.read, self._read_timeout()):
            if item.stream is not None:
                data = self._checked(data, item.stream)
            self.sink.submit(Frame(item.key, int(seq), item.time, data, item.arrival, item.scalars, item.kind))

    def _read_timeout(self) -> float:
        """Seconds one read may take: ``file_open_timeout_s`` plus its retry waits; at
        shutdown, at most what is left until close()'s deadline."""
        c = self.config
        timeout = c.file_open_timeout_s + c.file_retries * c.file_retry_delay_s
        deadline = self._deadline
        return timeout if deadline is None else min(timeout, deadline - time.monotonic())

    def hung_reads(self) -> int:
        """File reads abandoned after their timeout whose threads are still blocked (for /health)."""
        return self.resolver.hung_reads()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every lane has handled what it holds now; False if one has not after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            marks = [threading.Event() for _ in self._lanes]
            for lane, mark in zip(self._lanes.values(), marks):
                lane.put(mark)
            ending = list(self._ending)
        for mark in marks:
            mark.wait(max(0.0, deadline - time.monotonic()))
        for lane in ending:
            lane.thread.join(max(0.0, deadline - time.monotonic()))
        return all(m.is_set() for m in marks) and not any(x.thread.is_alive() for x in ending)

    def close(self, timeout: float = 5.0) -> None:
        """Service shutdown, after the routing thread has stopped: lanes finish their items
        within `timeout` s (reads get what is left of it, then are refused); lanes of runs still
        open end without a stop (the service stops those runs itself, after this)."""
        with self._lock:
            self._deadline = time.monotonic() + timeout
            lanes = [*self._lanes.values(), *self._ending]
            for lane in self._lanes.values():
                lane.put(RunEnd([], None, []))
            self._lanes.clear()
        for lane in lanes:                      # a read refused at the deadline takes a moment more
            lane.thread.join(max(0.0, self._deadline + 1.0 - time.monotonic()))
        stuck = [lane.uid[:8] for lane in lanes if lane.thread.is_alive()]
        if stuck:
            log.error("ingest: the file lanes of runs %s did not finish at shutdown", ", ".join(stuck))
        else:
            self.resolver.close()               # files of runs still open (no reader holds them now)


# --------------------------------------------------------------------------- the socket
class ZmqSubscriber:
    """SUB socket on a dedicated thread into a bounded queue, and a routing thread after it.

    0MQ PUB/SUB drops silently past the high-water mark; receiving on its own thread with a
    high RCVHWM keeps up, and the bounded queue blocks that thread (lossless) when full.
    """

    def __init__(self, config: IngestConfig, router: DocumentRouter, metrics: Metrics):
        self._busy_since: float | None = None
        self.config = config
        self.router = router
        self.metrics = metrics
        self.decoder = DocumentDecoder(serializer=config.serializer, allow_pickle=config.allow_pickle,
                                       prefix=config.prefix.encode(), max_message_bytes=config.max_message_bytes,
                                       max_objects=config.max_objects, max_depth=config.max_depth)
        self.queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._queued_bytes = 0                  # bytes in `queue`, at most config.max_queue_bytes (or one message)
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.received = 0

    def start(self) -> None:
        import zmq   # sockets opened here, not at construction (bluesky's convention)
        ctx = zmq.Context.instance()
        self._socket = ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        if self.config.curve_secret_key:        # as bluesky's RemoteDispatcher does with a ClientCurve
            import zmq.auth
            public, secret = zmq.auth.load_certificate(self.config.curve_secret_key)
            server, _ = zmq.auth.load_certificate(self.config.curve_server_public_key)
            if secret is None:
                raise ValueError(f"{self.config.curve_secret_key} holds no secret key")
            self._socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self._socket.setsockopt(zmq.CURVE_SERVERKEY, server)
        self._socket.setsockopt(zmq.SUBSCRIBE, self.config.prefix.encode() + b" " if self.config.prefix else b"")
        self._socket.connect(self.config.address)
        self._threads = [threading.Thread(target=self._receive, name="ingest-recv", daemon=True),
                         threading.Thread(target=self._route, name="ingest-route", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("ingest: subscribed to %s (serializer %s, pickle %s%s)", self.config.address,
                 self.config.serializer, "allowed" if self.config.allow_pickle else "refused",
                 ", CURVE" if self.config.curve_secret_key else "")

    def _receive(self) -> None:
        import zmq
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            message = self._socket.recv(copy=False)    # zmq.Frame: decoded in place (DocumentDecoder)
            self.received += 1
            if len(message) > self.config.max_message_bytes:    # refused before it takes queue memory
                self.router.reject(RejectedInput("message_too_large",
                                                 f"{len(message)} bytes > {self.config.max_message_bytes}"))
                continue
            self._reserve(len(message))
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
                self.metrics.queue_depth.labels("ingest").set(self.queue.qsize())    # idle: 0
                continue
            self.metrics.queue_depth.labels("ingest").set(self.queue.qsize())
            self._release(len(message))
            self._busy_since = time.monotonic()
            try:
                self.handle(message, arrival)
            finally:
                self._busy_since = None

    def route_busy_s(self) -> float | None:
        """Seconds the routing thread has spent on the message it is handling now; None when idle
        (for /health: a document that blocks routing shows here)."""
        since = self._busy_since
        return None if since is None else time.monotonic() - since

    def handle(self, message, arrival: float | None = None) -> None:
        """Decode and route one received message; every refusal is counted, none raises."""
        try:
            name, doc = self.decoder.decode(message)
        except RejectedInput as exc:
            self.router.reject(exc)
            return
        except Exception as exc:  # a decoder bug must not stop ingest; count and log it
            log.exception("internal error decoding a message")
            self.router.reject(RejectedInput("internal_error", f"{type(exc).__name__}: {exc}"))
            return
        self.router.route(name, doc, arrival)

    def _reserve(self, nbytes: int) -> None:
        """Wait until `nbytes` more fit in config.max_queue_bytes (an empty queue takes any message)."""
        with self._room:
            while (self._queued_bytes and self._queued_bytes + nbytes > self.config.max_queue_bytes
                   and not self._stop.is_set()):
                self._room.wait(0.1)
            self._queued_bytes += nbytes

    def _release(self, nbytes: int) -> None:
        with self._room:
            self._queued_bytes -= nbytes
            self._room.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving, route what is queued, then let the runs' file lanes finish
        (router.close), within about `timeout` s in all."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        self.router.close(max(0.1, deadline - time.monotonic() - 1.0))
