"""Analysis results as Bluesky documents on a 0MQ PUB socket.

For each source run, one analysis run (event-model `compose_run`): a start document
(``source_run_uid``, ``scatterflow_run`` (the analysis's key in REST and Tiled: the source's uid,
or a new one for a replay), the source's ``scan_id``, ``analysis: "scatterflow"``, ``configuration``,
peak names, ``hints.dimensions`` = ``source_seq_num``), then per frame two events in two
streams, and a stop document:

* ``primary``: the final fits, one event per frame when it leaves the regularizer window
  (frames in seq order), so that a stock callback (``BestEffortCallback``,
  ``LivePlot("lamellar_center", x="source_seq_num")``) shows the trajectory as one clean line;
* ``provisional``: the per-frame fits as they come (low latency), which the final fit replaces;
* ``profiles``: each frame's reduced profile (``radial``, ``intensity``, ``sigma`` arrays), and
  the streams ``phases``, ``phase_transitions``, ``inversion`` where the run has them.

Fields of ``primary``, per peak ``<p>``: ``<p>_center``, ``<p>_center_err``, ``<p>_fwhm``,
``<p>_fwhm_err`` (1/nm, or the radial unit of the run), ``<p>_amplitude``,
``<p>_amplitude_err`` (integrated intensity); per frame: ``source_seq_num``, ``source_time``
(s since the epoch), ``chi2_red`` (the reduced chi^2 of the frame's whole-profile fit: every
peak and the background together, so one value per frame, not per peak), ``converged`` (every
peak's fit converged), ``change_point`` (any peak flagged). ``provisional`` has the same
quantities, each fit quantity named ``provisional_<field>`` (``provisional_lamellar_center``,
``provisional_chi2_red``, ...); ``source_seq_num`` and ``source_time`` keep their names. The
distinct names keep a callback that follows a field by name (LivePlot, LiveTable) on the final
values: bluesky's LivePlot does not look at the stream an event belongs to.

Descriptors name one object per peak (``object_keys``: ``<p>`` -> its fields, ``frame`` -> the
per-frame fields) with hints ``<p>_center`` per peak and ``chi2_red`` in ``primary``
(BestEffortCallback's table and plots, against ``source_seq_num``) and empty hints in
``provisional`` (BestEffortCallback shows none of it). Every data key has a ``description``.

``configuration`` is the service's configuration as a JSON string (``json.loads`` gives the
mapping back): event-model's run-start schema refuses any key, at any depth, containing "." or
"/", and configurations have such keys (``ingest.root_map`` maps roots like ``/data``; phase
names and other user mappings may hold dots). Escaping keys would give a consumer a mapping
whose keys it must know to unescape; a JSON string is lossless, and any consumer decodes it
with the standard library.

Wire format is bluesky's 0MQ framing, one frame ``prefix + b" " + name + b" " + payload``
(`bluesky.callbacks.zmq.Publisher`), payload msgpack with msgpack-numpy by default. A
stock `bluesky.callbacks.zmq.RemoteDispatcher` consumes it with
``deserializer=functools.partial(msgpack.unpackb, object_hook=msgpack_numpy.decode)``;
``serializer="pickle"`` only for consumers that cannot pass a deserializer.
"""

from __future__ import annotations

import functools
import json
import pickle
import threading
import time as ttime
from typing import Literal

import numpy as np

PEAK_FIELDS = ("center", "center_err", "fwhm", "fwhm_err", "amplitude", "amplitude_err")
FRAME_FIELDS = ("source_seq_num", "source_time", "chi2_red", "converged", "change_point")
PROVISIONAL = "provisional_"         # prefix of the provisional stream's fit quantities
_UNPREFIXED = ("source_seq_num", "source_time")
_ROW_COLUMNS = {"seq_num", "time", "peak", "converged", "change_point", "final", "chi2", *PEAK_FIELDS}
Serializer = Literal["msgpack", "pickle"]


def msgpack_serializer():
    """``dict -> bytes`` with numpy support (msgpack-numpy)."""
    import msgpack
    import msgpack_numpy

    return functools.partial(msgpack.packb, default=msgpack_numpy.encode)


def msgpack_deserializer():
    """``bytes -> dict``, the inverse of `msgpack_serializer` (arrays arrive read-only)."""
    import msgpack
    import msgpack_numpy

    return functools.partial(msgpack.unpackb, object_hook=msgpack_numpy.decode)


def configuration_json(config: dict) -> str:
    """The configuration as it goes into the analysis start document: a JSON string (see the
    module docstring); non-finite numbers become null."""
    from ..jsonsafe import jsonable

    return json.dumps(jsonable(config), sort_keys=True, allow_nan=False)


_DESCRIPTIONS = {
    "center": "peak centre", "center_err": "standard error of the peak centre",
    "fwhm": "peak full width at half maximum", "fwhm_err": "standard error of the FWHM",
    "amplitude": "integrated intensity of the peak",
    "amplitude_err": "standard error of the integrated intensity",
    "source_seq_num": "seq_num of the frame's event in the source run",
    "source_time": "time of the frame's event in the source run",
    "chi2_red": "reduced chi^2 of the frame's whole-profile fit (all peaks and background)",
    "converged": "every peak's fit of this frame converged",
    "change_point": "a change point was flagged at this frame (any peak)",
}


def stream_field(field: str, final: bool) -> str:
    """The name of ``field`` (``lamellar_center``, ``chi2_red``, ...) in the stream of final
    (``primary``) or provisional results."""
    return field if final or field in _UNPREFIXED else PROVISIONAL + field


def _data_keys(peak_names, final: bool) -> tuple[dict, dict]:
    """Descriptor data keys (event-model DataKey) and object_keys of the stream of final
    (``primary``) or provisional results."""
    src = "scatterflow"
    what = "final" if final else "provisional"

    def key(obj, desc, dtype="number", units=None):
        k = {"dtype": dtype, "dtype_numpy": {"number": "<f8", "integer": "<i8", "boolean": "|b1"}[dtype],
             "shape": [], "source": src, "object_name": obj, "description": f"{desc} ({what} fit)"}
        if dtype == "number":
            k["precision"] = 4
        if units:
            k["units"] = units
        return k

    keys, objects = {}, {}
    for p in peak_names:
        objects[p] = []
        for f in PEAK_FIELDS:
            units = "1/nm" if f.startswith(("center", "fwhm")) else None
            name = stream_field(f"{p}_{f}", final)
            keys[name] = key(p, f"{p}: {_DESCRIPTIONS[f]}", units=units)
            objects[p].append(name)
    dtypes = {"source_seq_num": "integer", "converged": "boolean", "change_point": "boolean"}
    for f in FRAME_FIELDS:
        name = stream_field(f, final)
        keys[name] = key("frame", _DESCRIPTIONS[f], dtypes.get(f, "number"),
                         "s" if f == "source_time" else None)
    objects["frame"] = [stream_field(f, final) for f in FRAME_FIELDS]
    return keys, objects


def _num(v) -> float:
    return float(v) if v is not None else float("nan")


_SRC = {"source": "scatterflow"}
PHASE_KEYS = {"phase": {"dtype": "string", "shape": [], **_SRC},
              **{k: {"dtype": "number", "dtype_numpy": "<f8", "shape": [], **_SRC}
                 for k in ("probability", "crystallinity", "crystallinity_sigma", "source_time")},
              "source_seq_num": {"dtype": "integer", "dtype_numpy": "<i8", "shape": [], **_SRC},
              "final": {"dtype": "boolean", "dtype_numpy": "|b1", "shape": [], **_SRC}}
TRANSITION_KEYS = {"from_phase": {"dtype": "string", "shape": [], **_SRC},
                   "to_phase": {"dtype": "string", "shape": [], **_SRC},
                   "source_seq_num": {"dtype": "integer", "dtype_numpy": "<i8", "shape": [], **_SRC},
                   "source_time": {"dtype": "number", "dtype_numpy": "<f8", "shape": [], "units": "s", **_SRC},
                   "time_sigma": {"dtype": "number", "dtype_numpy": "<f8", "shape": [], "units": "s", **_SRC},
                   "frame_sigma": {"dtype": "number", "dtype_numpy": "<f8", "shape": [], **_SRC},
                   "change_point": {"dtype": "boolean", "dtype_numpy": "|b1", "shape": [], **_SRC}}


def _data_key(values: np.ndarray) -> dict:
    """event-model data key of a column of scalars."""
    kind = values.dtype.kind
    if kind == "b":
        return {"dtype": "boolean", "dtype_numpy": "|b1", "shape": [], **_SRC}
    if kind in "iu":
        return {"dtype": "integer", "dtype_numpy": "<i8", "shape": [], **_SRC}
    if kind == "f":
        return {"dtype": "number", "dtype_numpy": "<f8", "shape": [], **_SRC}
    return {"dtype": "string", "shape": [], **_SRC}


def rows_to_events(rows: dict[str, np.ndarray], peak_names) -> list[tuple[bool, dict]]:
    """Group PeakRows (one row per frame, peak, result) into ``(final, data)`` per
    (seq_num, final) in order of first appearance; missing peaks are NaN. ``data`` has the
    ``primary`` stream's field names (`stream_field` renames for ``provisional``); the row
    column ``chi2``, the frame's reduced chi^2 repeated on each peak's row, becomes the one
    ``chi2_red`` of the frame. Plain Python types, so the documents validate and serialize with
    any serializer."""
    missing = _ROW_COLUMNS - set(rows)
    if missing:
        raise ValueError(f"peak rows lack columns {sorted(missing)}")
    seq = np.asarray(rows["seq_num"]).astype(np.int64)
    final = np.asarray(rows["final"]).astype(bool)
    peaks = [str(p) for p in rows["peak"]]
    unknown = set(peaks) - set(peak_names)
    if unknown:
        raise ValueError(f"peak rows name peaks {sorted(unknown)} not in {list(peak_names)}")
    cols = {f: np.asarray(rows[f], dtype=np.float64) for f in PEAK_FIELDS}
    chi2 = np.asarray(rows["chi2"], dtype=np.float64)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, key in enumerate(zip(seq.tolist(), final.tolist())):
        groups.setdefault(key, []).append(i)
    out = []
    for (s, fin), idx in groups.items():
        data = {f"{p}_{f}": float("nan") for p in peak_names for f in PEAK_FIELDS}
        for i in idx:
            for f in PEAK_FIELDS:
                data[f"{peaks[i]}_{f}"] = float(cols[f][i])
        data["source_seq_num"] = int(s)
        data["source_time"] = float(rows["time"][idx[0]])
        data["chi2_red"] = float(chi2[idx[0]])
        data["converged"] = bool(np.all(np.asarray(rows["converged"])[idx]))
        data["change_point"] = bool(np.any(np.asarray(rows["change_point"])[idx]))
        out.append((bool(fin), data))
    return out


class _AnalysisRun:
    """Composers of one analysis run (start sent; descriptor sent)."""

    def __init__(self, bundle, compose_event: dict, peak_names):
        self.bundle = bundle
        self.compose_event = compose_event      # final (True: primary) / provisional -> compose_event
        self.peak_names = tuple(peak_names)
        self.events = 0
        self.streams: dict = {}         # other streams (phases, phase_transitions): name -> compose_event


class ResultsPublisher:
    """Publish one analysis run per source run as Bluesky documents on 0MQ PUB.

    Parameters
    ----------
    address : ``tcp://host:port`` to bind (``tcp://127.0.0.1:*`` for a free port; the
        bound address is in ``.address``), or to connect to with ``connect=True`` (a
        bluesky 0MQ proxy's input); None: no socket (documents only to ``also``).
    prefix : bytes without spaces; subscribers filter on ``prefix + b" "``.
    serializer : "msgpack" (default, msgpack-numpy) or "pickle" (explicit opt-in).
    validate_events : validate every event against the event-model schema (start,
        descriptor and stop are always validated). Off by default: it costs about 1 ms
        per event (1,000 events/s) against 0.12 ms without (8,000 events/s, 2 cores).
    sndhwm : 0MQ send high-water mark in messages; past it PUB drops silently.
    also : called with ``(name, doc)`` for every document as well (the CatalogWriter that
        writes the analysis runs to Tiled: service/publish/catalog_writer.py); must not block.

    Counters: ``documents``, ``events``. Methods are thread-safe (one lock, 0MQ sockets
    are not).
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5579", prefix: bytes = b"", *,
                 serializer: Serializer = "msgpack", connect: bool = False,
                 validate_events: bool = False, sndhwm: int = 100_000, also=None):
        import zmq

        if not isinstance(prefix, bytes) or b" " in prefix:
            raise ValueError(f"prefix must be bytes without b' ', got {prefix!r}")
        if serializer == "msgpack":
            self._dumps = msgpack_serializer()
        elif serializer == "pickle":
            self._dumps = pickle.dumps
        else:
            raise ValueError(f"serializer must be 'msgpack' or 'pickle', got {serializer!r}")
        if address is not None and (not isinstance(address, str) or "://" not in address):
            raise ValueError(f"address must look like 'tcp://host:port', got {address!r}")
        self.prefix = prefix
        self.serializer = serializer
        self.validate_events = bool(validate_events)
        self._also = also
        self._ctx = self._sock = None
        self.address = None
        if address is not None:
            self._ctx = zmq.Context()
            self._sock = self._ctx.socket(zmq.PUB)
            self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
            self._sock.setsockopt(zmq.LINGER, 1000)
            if connect:
                self._sock.connect(address)
                self.address = address
            else:
                self._sock.bind(address)
                self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._runs: dict[str, _AnalysisRun] = {}
        self.documents = 0
        self.events = 0
        self._closed = False

    def _send(self, name: str, doc: dict) -> None:
        if self._sock is not None:
            self._sock.send(self.prefix + b" " + name.encode() + b" " + self._dumps(doc))
        if self._also is not None:
            self._also(name, doc)
        self.documents += 1

    def start_run(self, uid: str, start_doc: dict, config: dict, peak_names) -> str:
        """Open the analysis run of source run ``uid``; returns the analysis run's uid."""
        from event_model import compose_run

        from ..detectors import replayed_run
        from ..jsonsafe import jsonable
        from .tiled import software_versions

        peak_names = tuple(str(p) for p in peak_names)
        if len(set(peak_names)) != len(peak_names):
            raise ValueError(f"peak_names must be unique, got {peak_names}")
        if "frame" in peak_names:
            raise ValueError("a peak may not be named 'frame': the descriptors' per-frame object")
        metadata = {
            "source_run_uid": replayed_run(start_doc) or uid, "analysis": "scatterflow",
            "scatterflow_run": uid,             # the analysis's key in REST and in Tiled's scatterflow/ container
            "plan_name": "scatterflow_analysis", "plan_type": "analysis",
            "scan_id": jsonable(start_doc.get("scan_id", 0)),
            "configuration": configuration_json(config), "peaks": list(peak_names),
            "software": software_versions(),
            "hints": {"dimensions": [[["source_seq_num"], "primary"]]},
        }
        with self._lock:
            if uid in self._runs:
                raise ValueError(f"analysis run for source run {uid!r} already started")
            bundle = compose_run(metadata=metadata)
            self._send("start", bundle.start_doc)
            compose_event = {}              # no peaks fitted: no peak streams (other streams only)
            for final, name in ((True, "primary"), (False, "provisional")) if peak_names else ():
                keys, objects = _data_keys(peak_names, final)
                hints = ({**{p: {"fields": [f"{p}_center"]} for p in peak_names},
                          "frame": {"fields": ["chi2_red"]}} if final
                         else {obj: {"fields": []} for obj in objects})   # empty: BEC shows none
                desc = bundle.compose_descriptor(name=name, data_keys=keys, object_keys=objects,
                                                 hints=hints)
                self._send("descriptor", desc.descriptor_doc)
                compose_event[final] = desc.compose_event
            self._runs[uid] = _AnalysisRun(bundle, compose_event, peak_names)
            return bundle.start_doc["uid"]

    def publish_rows(self, uid: str, rows: dict[str, np.ndarray]) -> int:
        """Send one event per (frame, provisional/final) in ``rows`` (PeakRows), final ones to
        ``primary``, provisional ones to ``provisional``; returns the number of events sent."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                raise ValueError(f"no analysis run started for source run {uid!r}")
            now = ttime.time()
            events = rows_to_events(rows, run.peak_names)
            for final, data in events:
                data = {stream_field(k, final): v for k, v in data.items()}
                ts = {k: now for k in data}
                doc = run.compose_event[final](data=data, timestamps=ts, time=now,
                                               validate=self.validate_events)
                self._send("event", doc)
            run.events += len(events)
            self.events += len(events)
            return len(events)

    def publish_phases(self, uid: str, rows: dict | None, transitions: list) -> int:
        """Phase labels (stream ``phases``: one event per frame and provisional/final result)
        and confirmed transitions (stream ``phase_transitions``) of source run ``uid``;
        returns the number of events sent. Descriptors are sent with the first events."""
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                raise ValueError(f"no analysis run started for source run {uid!r}")
            now = ttime.time()
            events = []
            if rows is not None and len(rows["seq_num"]):
                compose = self._stream(run, "phases", PHASE_KEYS)
                for i in range(len(rows["seq_num"])):
                    data = {"phase": str(rows["phase"][i]), "probability": _num(rows["probability"][i]),
                            "crystallinity": _num(rows["crystallinity"][i]),
                            "crystallinity_sigma": _num(rows["crystallinity_sigma"][i]),
                            "source_seq_num": int(rows["seq_num"][i]), "source_time": _num(rows["time"][i]),
                            "final": bool(rows["final"][i])}
                    events.append((compose, data))
            if transitions:
                compose = self._stream(run, "phase_transitions", TRANSITION_KEYS)
                for t in transitions:
                    data = {"from_phase": str(t["from"]), "to_phase": str(t["to"]),
                            "source_seq_num": int(t["seq_num"]), "source_time": _num(t["time"]),
                            "time_sigma": _num(t["time_sigma"]), "frame_sigma": _num(t["frame_sigma"]),
                            "change_point": bool(t["change_point"])}
                    events.append((compose, data))
            for compose, data in events:
                self._send("event", compose(data=data, timestamps={k: now for k in data}, time=now,
                                            validate=self.validate_events))
            run.events += len(events)
            self.events += len(events)
            return len(events)

    def publish_stream(self, uid: str, name: str, rows: dict) -> int:
        """Columnar rows (equal-length columns; numbers, bools or strings) as events of the
        stream ``name`` of source run ``uid``'s analysis run, one per row; returns events sent.
        Data keys follow the first rows' columns (``seq_num`` becomes ``source_seq_num``)."""
        n = len(rows["seq_num"])
        cols = {("source_seq_num" if c == "seq_num" else "source_time" if c == "time" else c): np.asarray(v)
                for c, v in rows.items()}
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                raise ValueError(f"no analysis run started for source run {uid!r}")
            compose = self._stream(run, name, {c: _data_key(v) for c, v in cols.items()})
            now = ttime.time()
            for i in range(n):
                data = {c: v[i].item() if v.dtype.kind != "U" else str(v[i]) for c, v in cols.items()}
                self._send("event", compose(data=data, timestamps={k: now for k in data}, time=now,
                                            validate=self.validate_events))
            run.events += n
            self.events += n
            return n

    def publish_profiles(self, uid: str, seq, times, radial, unit: str, intensity, sigma) -> int:
        """The reduced profiles of frames ``seq`` as the stream ``profiles``: per frame
        ``source_seq_num``, ``source_time``, ``radial`` (N,) in `unit`, ``intensity`` and ``sigma``
        (N,); returns the number of events sent."""
        radial = np.asarray(radial, np.float64)
        intensity, sigma = np.asarray(intensity, np.float64), np.asarray(sigma, np.float64)
        with self._lock:
            run = self._runs.get(uid)
            if run is None:
                raise ValueError(f"no analysis run started for source run {uid!r}")
            array = {"dtype": "array", "dtype_numpy": "<f8", "shape": [len(radial)], **_SRC}
            compose = self._stream(run, "profiles", {
                "source_seq_num": {"dtype": "integer", "dtype_numpy": "<i8", "shape": [], **_SRC},
                "source_time": {"dtype": "number", "dtype_numpy": "<f8", "shape": [], "units": "s", **_SRC},
                "radial": {**array, "units": unit, "description": "radial coordinate of the bins"},
                "intensity": {**array, "description": "azimuthally integrated intensity (background kept)"},
                "sigma": {**array, "description": "standard deviation of intensity"}})
            now = ttime.time()
            for i, s in enumerate(np.asarray(seq).tolist()):
                data = {"source_seq_num": int(s), "source_time": _num(times[i]), "radial": radial,
                        "intensity": intensity[i], "sigma": sigma[i]}
                self._send("event", compose(data=data, timestamps={k: now for k in data}, time=now,
                                            validate=self.validate_events))
            run.events += len(intensity)
            self.events += len(intensity)
            return len(intensity)

    def _stream(self, run: "_AnalysisRun", name: str, keys: dict):
        """compose_event of the analysis run's stream ``name``, its descriptor sent on first use."""
        if name not in run.streams:
            desc = run.bundle.compose_descriptor(name=name, data_keys=keys)
            self._send("descriptor", desc.descriptor_doc)
            run.streams[name] = desc.compose_event
        return run.streams[name]

    def stop_run(self, uid: str, exit_status: str = "success", reason: str = "") -> None:
        """Close the analysis run of ``uid`` (exit_status: success, abort or fail)."""
        if exit_status not in ("success", "abort", "fail"):
            raise ValueError(f"exit_status must be success, abort or fail, got {exit_status!r}")
        with self._lock:
            run = self._runs.pop(uid, None)
            if run is None:
                raise ValueError(f"no analysis run started for source run {uid!r}")
            self._send("stop", run.bundle.compose_stop(exit_status=exit_status,
                                                       reason=str(reason)))

    def close(self) -> None:
        """Stop open runs with exit_status "abort", then close the socket."""
        if self._closed:
            return
        for uid in list(self._runs):
            self.stop_run(uid, "abort", "results publisher closed")
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close(linger=500)      # ms: deliver what is queued, never hang shutdown
                self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
