"""Raw runs from the beamline's catalogue, as the Bluesky documents that made them.

The catalogue is a Tiled server fed by bluesky's ``TiledWriter`` (bluesky_tiled_plugins; the
older bluesky.callbacks.tiled_writer too): a run is a container with spec ``BlueskyRun`` and
metadata ``start`` and ``stop``; each stream a ``BlueskyEventStream`` whose metadata is its
descriptor (without ``name``, ``run_start``). Under the stream, the table ``internal`` holds the
events' scalar values (``seq_num``, ``time``, ...; the older writer put inline arrays there too,
flattened: reshaped here with the descriptor's ``shape``); array nodes hold inline arrays
(bluesky_tiled_plugins) and external data (HDF5 files the detector wrote, served by Tiled itself,
so no file system access is needed here).

Tiled's SQL storage reads a whole column for any request on a table (even for a lookup of one
of its fields), and its DuckDB connection fails under concurrent reads of one table: the inline
columns are read once per stream, in one request, and all requests to the catalogue go one at
a time (`TILED_LOCK`). Array nodes are read in slices of FRAMES_PER_REQUEST frames.

`replay_documents` yields start, descriptor(s), events and stop as a RunEngine would have
published them, frames inline, under a new start uid with ``REPLAY_DOC_KEY`` naming the source
(several analyses of one source coexist). `scatterflow reprocess` routes them into the service.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .detectors import REPLAY_DOC_KEY
from .publish.tiled_server import TILED_LOCK

FRAMES_PER_REQUEST = 16        # frames of an array node read per Tiled request (one HTTP round trip each)


class CatalogError(RuntimeError):
    """The catalogue does not have the run, or not as a BlueskyRun."""


def connect(uri: str, api_key: str | None = None):
    """A tiled client of the catalogue at `uri` (e.g. ``http://host:8000/api/v1``)."""
    from tiled.client import from_uri
    return from_uri(uri, api_key=api_key)


@dataclass(frozen=True)
class RawRun:
    uid: str
    start: dict
    stop: dict | None
    streams: tuple[str, ...]         # event streams, ``primary`` first
    events: dict[str, int]           # events per stream


def raw_run(client, uid: str) -> RawRun:
    """The run ``uid`` (a uid or a unique prefix Tiled resolves) of the catalogue."""
    with TILED_LOCK:
        try:
            node = client[uid]
        except KeyError:
            raise CatalogError(f"no run {uid!r} in the catalogue") from None
        start = dict(node.metadata.get("start") or {})
        if not start.get("uid"):
            raise CatalogError(f"{uid!r} is not a BlueskyRun (no start document in its metadata)")
        streams = [k for k in node if "data_keys" in (node[k].metadata or {})]
        streams.sort(key=lambda s: (s != "primary", s))
        stop = dict(node.metadata.get("stop") or {}) or None
    events = {s: int((stop or {}).get("num_events", {}).get(s, -1)) for s in streams}
    for s in streams:
        if events[s] < 0:                     # no stop document (an aborted writer): count the rows
            events[s] = len(_inline_table(node[s], ["seq_num"])["seq_num"])
    return RawRun(start["uid"], start, stop, tuple(streams), events)


def _raw(stream):
    """The stream's raw container (a composite view's ``base``; the node itself otherwise)."""
    return getattr(stream, "base", stream)


def _inline_table(stream, columns: list[str], arrays: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Scalar columns of the stream's ``internal`` table in one request; array columns
    (`arrays`) one request each, through the stream's array view of them (the table gives
    list columns back as text)."""
    with TILED_LOCK:
        frame = _raw(stream)["internal"].read(columns)
        out = {c: frame[c].to_numpy() for c in columns}
        for c in arrays:
            out[c] = np.asarray(stream[c].read())
    return out


def replay_documents(client, run: RawRun, catalog: str, streams: tuple[str, ...] | None = None,
                     new_uid: str | None = None) -> Iterator[tuple[str, dict]]:
    """The documents of `run` for the service, frames inline: a start with a new uid and
    ``REPLAY_DOC_KEY`` {source_run, catalog}, each stream's descriptor (without ``external``:
    its arrays come inline now) and events in seq order, then the stop."""
    with TILED_LOCK:
        node = client[run.uid]
    new_uid = new_uid or str(uuid.uuid4())
    yield "start", {**run.start, "uid": new_uid, REPLAY_DOC_KEY: {"source_run": run.uid, "catalog": catalog}}
    for name in streams or run.streams:
        with TILED_LOCK:
            stream = node[name]
            md = dict(stream.metadata)
            raw = _raw(stream)
            table_columns = list(raw["internal"].structure().columns) if "internal" in raw else []
            array_nodes = [k for k in md["data_keys"] if k in raw and k != "internal"]
        data_keys = {k: {kk: vv for kk, vv in dk.items() if kk != "external"} for k, dk in md["data_keys"].items()}
        desc_uid = str(uuid.uuid4())
        yield "descriptor", {"uid": desc_uid, "run_start": new_uid, "name": name, "time": md.get("time", time.time()),
                             "data_keys": data_keys, "configuration": md.get("configuration") or {},
                             "hints": md.get("hints") or {}, "object_keys": md.get("object_keys") or {}}
        inline = [k for k in data_keys if k in table_columns]
        arrays = tuple(k for k in inline if data_keys[k].get("dtype") == "array" or data_keys[k].get("shape"))
        table = _inline_table(stream, ["seq_num", "time", *[k for k in inline if k not in arrays]], arrays)
        seq, times = table["seq_num"], table["time"]
        with TILED_LOCK:
            nodes = {k: raw[k] for k in array_nodes}          # one look-up each, then slices of them
        for k, arr in nodes.items():
            if arr.shape[0] < len(seq):     # rows follow the events (seq order); missing ones would misalign
                raise CatalogError(f"run {run.uid[:8]}, stream {name!r}: {k!r} has {arr.shape[0]} rows for "
                                   f"{len(seq)} events (frames the writer never registered)")
        for lo in range(0, len(seq), FRAMES_PER_REQUEST):
            hi = min(lo + FRAMES_PER_REQUEST, len(seq))
            chunk = {k: _shaped(table[k][lo:hi], data_keys[k]) for k in inline}
            for k, arr in nodes.items():
                with TILED_LOCK:
                    chunk[k] = _shaped(np.asarray(arr[lo:hi]), data_keys[k])
            for i in range(hi - lo):
                data = {k: _value(v[i]) for k, v in chunk.items()}
                t = float(times[lo + i])
                yield "event", {"uid": str(uuid.uuid4()), "descriptor": desc_uid, "seq_num": int(seq[lo + i]),
                                "time": t, "data": data, "timestamps": {k: t for k in data}, "filled": {}}
    stop = dict(run.stop or {})
    yield "stop", {"uid": str(uuid.uuid4()), "run_start": new_uid, "time": stop.get("time", time.time()),
                   "exit_status": stop.get("exit_status", "success"), "reason": stop.get("reason", ""),
                   "num_events": {s: run.events.get(s, 0) for s in (streams or run.streams)}}


def _shaped(rows: np.ndarray, data_key: dict) -> np.ndarray:
    """Rows of one field with each value in the descriptor's shape (bluesky's TiledWriter stores
    inline arrays flattened; a leading frames-per-event axis of 1 is dropped)."""
    shape = [int(s) for s in data_key.get("shape") or []]
    if shape and shape[0] == 1 and len(shape) == 3:
        shape = shape[1:]
    if len(shape) >= 2 and rows.shape[1:] != tuple(shape) and int(np.prod(rows.shape[1:])) == int(np.prod(shape)):
        rows = rows.reshape(len(rows), *shape)
    return rows


def _value(v):
    """An event value as a RunEngine would send it: numpy scalars as Python numbers, strings as str."""
    if isinstance(v, np.ndarray) and v.ndim > 0:
        return v
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode()
    return v.item() if hasattr(v, "item") else v
