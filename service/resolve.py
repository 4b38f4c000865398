"""Frames from documents that point at files, as real area detectors write them.

Two generations of Bluesky documents refer to data in files instead of carrying it:

- ophyd v1: a ``resource`` (spec, root, resource_path, resource_kwargs) and one ``datum`` per
  frame (datum_kwargs); the event carries the datum_id with ``filled[field] = False``.
  Specs read here follow area-detector-handlers / databroker:
  ``AD_HDF5`` and ``AD_HDF5_SWMR`` read ``/entry/data/data[n*fpp:(n+1)*fpp]`` for
  datum ``{point_number: n}`` and resource ``{frame_per_point: fpp}``; ``NPY_SEQ`` reads
  ``<root>/<resource_path>_<index>.npy`` for datum ``{index}`` (ophyd.sim).
- event-model >= 1.2x (ophyd-async): a ``stream_resource`` (uri, mimetype
  ``application/x-hdf5``, ``parameters.dataset``, ``data_key``) and ``stream_datum`` documents
  covering dataset rows ``indices.start:indices.stop`` for events ``seq_nums.start:stop``.

Files are opened with h5py (``swmr=True``), cached per resource and refreshed when a frame
lies beyond the dataset's current length; a file still being written is re-read up to
``retries`` times, ``retry_delay_s`` apart, then refused as ``file_unavailable``. Compressed
chunks (Bitshuffle/LZ4, Blosc, Zstd, ...) are readable when ``hdf5plugin`` is installed; it is
imported here for that. Every refusal is a `RejectedInput` with a metrics reason.

Not thread-safe: one routing thread calls it (DocumentRouter holds its own lock). Calls that
wait for a file block that thread for at most ``retries * retry_delay_s`` seconds.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import h5py
import numpy as np
from event_model import unpack_datum_page

from .errors import RejectedInput

log = logging.getLogger(__name__)

try:  # registers the HDF5 compression filters (bitshuffle, LZ4, blosc, zstd, ...) with libhdf5
    import hdf5plugin
    HDF5PLUGIN_VERSION: str | None = hdf5plugin.version
except ImportError:  # pragma: no cover - depends on the environment
    HDF5PLUGIN_VERSION = None

AD_HDF5_SPECS = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
NPY_SPECS = frozenset({"NPY_SEQ"})
HDF5_MIMETYPES = frozenset({"application/x-hdf5"})
HDF5_STREAM_SPECS = frozenset({"AD_HDF5_SWMR_STREAM", "AD_HDF5_SWMR_SLICE"})   # event-model 1.19-1.21 style
AD_DATASET = "/entry/data/data"
REOPEN_EVERY = 10          # re-open a file (not just refresh) every N waits: writers without SWMR


# --------------------------------------------------------------------------- data keys
def frame_shape(data_key: dict) -> tuple[int, int, int] | None:
    """``(frames_per_event, rows, cols)`` of a descriptor data key holding 2D frames, else None.

    Accepts ``[rows, cols]`` (ophyd.sim, inline arrays), ``[n, rows, cols]`` (ophyd v1 area
    detectors: cam.num_images first; ophyd-async: frames per event first). n = 0 reads as 1.
    """
    shape = [int(s) for s in (data_key.get("shape") or [])]
    if len(shape) == 2:
        shape = [1, *shape]
    if len(shape) != 3 or shape[1] <= 1 or shape[2] <= 1:
        return None
    return max(shape[0], 1), shape[1], shape[2]


@dataclass
class _Resource:
    """A v1 resource or a stream_resource, with its open file (cached)."""
    uid: str
    kind: str                    # "AD_HDF5", "NPY_SEQ", "HDF5_STREAM" or "unsupported"
    spec: str                    # the document's spec or mimetype, for messages
    path: str                    # local path (root_map applied); for NPY_SEQ the file stem
    run_start: str | None
    dataset: str = AD_DATASET
    frame_per_point: int = 1
    data_key: str | None = None
    datums: set[str] = field(default_factory=set)
    file: h5py.File | None = None
    waits: int = 0               # waits since the file was last (re)opened
    filters_checked: bool = False


class FrameResolver:
    """Per-run registry of resource/datum and stream_resource/stream_datum documents, reading frames with h5py.

    `root_map` maps document roots (``resource['root']``, or a leading part of a stream
    resource's path) to local directories, as databroker's ``root_map`` does. Frames are
    returned as read: ``(rows, cols)`` arrays of the detector's dtype, row-major.
    """

    def __init__(self, *, root_map: dict[str, str] | None = None, retries: int = 50, retry_delay_s: float = 0.1,
                 max_frame_pixels: int = 64 * 2**20):
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not isinstance(retry_delay_s, (int, float)) or not math.isfinite(retry_delay_s) or retry_delay_s < 0:
            raise ValueError(f"retry_delay_s must be a finite number >= 0 (s), got {retry_delay_s!r}")
        if isinstance(max_frame_pixels, bool) or not isinstance(max_frame_pixels, int) or max_frame_pixels < 1:
            raise ValueError(f"max_frame_pixels must be an integer >= 1, got {max_frame_pixels!r}")
        root_map = dict(root_map or {})
        for k, v in root_map.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise ValueError(f"root_map must map non-empty str roots to str paths, got {k!r}: {v!r}")
        self.root_map = root_map
        self.retries = retries
        self.retry_delay_s = float(retry_delay_s)
        self.max_frame_pixels = max_frame_pixels
        self._resources: dict[str, _Resource] = {}            # resource / stream_resource uid
        self._datums: dict[str, tuple[str, dict]] = {}        # datum_id -> (resource uid, datum_kwargs)
        self._frame_keys: dict[str, dict[str, tuple[int, int, int]]] = {}   # descriptor uid -> key -> shape
        self._runs: dict[str | None, set[str]] = {}           # run uid -> resource uids
        self._run_descriptors: dict[str, set[str]] = {}       # run uid -> descriptor uids
        if HDF5PLUGIN_VERSION is None:
            log.warning("hdf5plugin is not installed: compressed HDF5 frames (bitshuffle/LZ4, blosc) cannot be read")

    # ----------------------------------------------------------------------- paths
    def _local(self, path: str) -> str:
        """Apply root_map to an absolute path: the longest matching leading directory is replaced."""
        best = None
        for root in self.root_map:
            r = root.rstrip("/") or "/"
            if path == r or path.startswith(r.rstrip("/") + "/"):
                if best is None or len(r) > len(best[0]):
                    best = (r, self.root_map[root])
        if best is None:
            return path
        rest = path[len(best[0]):].lstrip("/")
        return os.path.join(best[1], rest) if rest else best[1]

    def _path(self, doc: dict) -> str:
        if doc.get("uri"):
            parsed = urlparse(doc["uri"])
            if parsed.scheme not in ("", "file"):
                raise RejectedInput("unsupported_uri", doc["uri"][:200])
            return self._local(unquote(parsed.path))
        try:
            root, rel = doc.get("root") or "", doc["resource_path"]
        except KeyError:
            raise RejectedInput("malformed_document", "resource without uri or resource_path") from None
        if root in self.root_map:
            return os.path.join(self.root_map[root], rel)
        return self._local(os.path.join(root, rel))

    # ----------------------------------------------------------------------- v1 documents
    def resource(self, doc: dict) -> None:
        """Register an ophyd v1 resource. Unknown specs are kept and refused when a frame is asked of them."""
        spec = str(doc.get("spec", ""))
        kind = "AD_HDF5" if spec in AD_HDF5_SPECS else "NPY_SEQ" if spec in NPY_SPECS else "unsupported"
        kwargs = doc.get("resource_kwargs") or {}
        res = _Resource(uid=doc["uid"], kind=kind, spec=spec, path=self._path(doc), run_start=doc.get("run_start"))
        if kind == "AD_HDF5":
            fpp = kwargs.get("frame_per_point", 1)
            if isinstance(fpp, bool) or not isinstance(fpp, (int, np.integer)) or fpp < 1:
                raise RejectedInput("bad_resource", f"frame_per_point {fpp!r}")
            res.frame_per_point = int(fpp)
        self._add(res)

    def datum(self, doc: dict) -> None:
        res = self._resources.get(doc["resource"])
        if res is None:
            raise RejectedInput("unknown_resource", f"datum {doc['datum_id']} refers to {doc['resource']}")
        self._datums[doc["datum_id"]] = (res.uid, dict(doc.get("datum_kwargs") or {}))
        res.datums.add(doc["datum_id"])

    def datum_page(self, doc: dict) -> None:
        for datum in unpack_datum_page(doc):
            self.datum(datum)

    def fill_event(self, event: dict, descriptor: dict, field: str) -> np.ndarray:
        """The frame ``(rows, cols)`` that ``event["data"][field]`` (a datum_id) refers to."""
        datum_id = event["data"].get(field)
        if not isinstance(datum_id, str):
            raise RejectedInput("unknown_datum", f"{field} is not a datum_id")
        frames = self.read_datum(datum_id)
        if frames.shape[0] != 1:
            raise RejectedInput("unsupported_frames_per_point", f"{frames.shape[0]} frames for one event")
        frame = frames[0]
        expected = frame_shape(descriptor.get("data_keys", {}).get(field, {}))
        if expected is not None and tuple(frame.shape) != expected[1:]:
            raise RejectedInput("wrong_shape", f"{frame.shape} != descriptor {expected[1:]}")
        return frame

    def read_datum(self, datum_id: str) -> np.ndarray:
        """All frames of one datum, ``(frame_per_point, rows, cols)``."""
        try:
            res_uid, kwargs = self._datums[datum_id]
        except KeyError:
            raise RejectedInput("unknown_datum", datum_id[:200]) from None
        res = self._resources[res_uid]
        if res.kind == "AD_HDF5":
            n = _int_kwarg(kwargs, "point_number")
            fpp = res.frame_per_point
            return self._read_rows(res, n * fpp, (n + 1) * fpp)
        if res.kind == "NPY_SEQ":
            frame = self._read_npy(res, _int_kwarg(kwargs, "index"))
            return frame[np.newaxis]
        raise RejectedInput("unsupported_spec", f"{res.spec!r} (resource {res.uid})")

    # ----------------------------------------------------------------------- stream documents
    def stream_resource(self, doc: dict) -> None:
        """Register a stream_resource (ophyd-async). Non-HDF5 ones are refused when frames are asked of them."""
        spec = str(doc.get("mimetype") or doc.get("spec") or "")
        params = doc.get("parameters") or {}
        hdf5 = spec in HDF5_MIMETYPES or spec in HDF5_STREAM_SPECS
        res = _Resource(uid=doc["uid"], kind="HDF5_STREAM" if hdf5 else "unsupported", spec=spec,
                        path=self._path(doc), run_start=doc.get("run_start"), data_key=doc.get("data_key"),
                        dataset=str(params.get("dataset") or params.get("path") or AD_DATASET))
        self._add(res)

    def stream_data_keys(self, descriptor: dict) -> dict[str, tuple[int, int]]:
        """External ``STREAM:`` data keys of a descriptor that hold 2D frames: ``{key: (rows, cols)}``.

        Also remembers them for the descriptor, so that `stream_datum` skips other keys (sums,
        stats) without opening their files.
        """
        keys = {name: shape for name, key in (descriptor.get("data_keys") or {}).items()
                if str(key.get("external", "")).startswith("STREAM:") and (shape := frame_shape(key)) is not None}
        self._frame_keys[descriptor["uid"]] = keys
        if descriptor.get("run_start"):
            self._run_descriptors.setdefault(descriptor["run_start"], set()).add(descriptor["uid"])
        return {name: shape[1:] for name, shape in keys.items()}

    def stream_datum(self, doc: dict) -> list[tuple[int, np.ndarray]]:
        """``(seq_num, frame (rows, cols))`` for every frame the stream_datum covers; [] for non-frame keys."""
        res = self._resources.get(doc["stream_resource"])
        if res is None:
            raise RejectedInput("unknown_resource", f"stream_datum {doc['uid']} refers to {doc['stream_resource']}")
        start, stop = _range(doc, "indices")
        seq_start, seq_stop = _range(doc, "seq_nums")
        if stop - start != seq_stop - seq_start:
            raise RejectedInput("bad_stream_datum", f"indices {start}:{stop} vs seq_nums {seq_start}:{seq_stop}")
        known = self._frame_keys.get(doc.get("descriptor", ""))
        per_event = 1
        if known is not None:
            if res.data_key not in known:
                return []                                     # a scalar/1D key of the same detector
            per_event, rows, cols = known[res.data_key]
            if per_event != 1:
                raise RejectedInput("unsupported_frames_per_event", f"{res.data_key}: {per_event} frames per event")
        if res.kind != "HDF5_STREAM":
            raise RejectedInput("unsupported_spec", f"{res.spec!r} (stream_resource {res.uid})")
        if stop == start:
            return []
        if known is None and not self._is_frame_dataset(res):
            return []
        frames = self._read_rows(res, start, stop)
        if known is not None and tuple(frames.shape[1:]) != (rows, cols):
            raise RejectedInput("wrong_shape", f"{frames.shape[1:]} != descriptor {(rows, cols)}")
        return [(seq_start + i, frames[i]) for i in range(stop - start)]

    # ----------------------------------------------------------------------- per-run state
    def _add(self, res: _Resource) -> None:
        old = self._resources.get(res.uid)
        if old is not None:
            self._close(old)
        self._resources[res.uid] = res
        self._runs.setdefault(res.run_start, set()).add(res.uid)

    def forget_run(self, run_start_uid: str) -> None:
        """Drop resources, datums and descriptors of a run and close its files (at its stop document)."""
        for uid in self._runs.pop(run_start_uid, set()):
            res = self._resources.pop(uid, None)
            if res is None:
                continue
            for datum_id in res.datums:
                self._datums.pop(datum_id, None)
            self._close(res)
        for d in self._run_descriptors.pop(run_start_uid, set()):
            self._frame_keys.pop(d, None)

    def close(self) -> None:
        """Close every open file (service shutdown)."""
        for res in self._resources.values():
            self._close(res)

    @staticmethod
    def _close(res: _Resource) -> None:
        if res.file is not None:
            try:
                res.file.close()
            except Exception:  # a handle invalidated by the writer closing the file in this process
                pass
            res.file = None

    # ----------------------------------------------------------------------- reading
    def _retry(self, res: _Resource, attempt: Callable[[], Any]) -> Any:
        """Call `attempt` until it returns non-None, at most retries + 1 times; file_unavailable after."""
        last = ""
        for i in range(self.retries + 1):
            try:
                value = attempt()
                if value is not None:
                    return value
                last = "frames not written yet"
            except (OSError, KeyError, ValueError, EOFError) as exc:   # missing, locked, half-written, not created
                if isinstance(exc, RejectedInput):
                    raise
                last = f"{type(exc).__name__}: {exc}"
                self._close(res)
            if i < self.retries:
                time.sleep(self.retry_delay_s)
        raise RejectedInput("file_unavailable", f"{res.path} after {self.retries} retries: {last}"[:400])

    def _dataset(self, res: _Resource) -> h5py.Dataset:
        if res.file is None or not res.file.id.valid:
            res.file = h5py.File(res.path, "r", swmr=True)
            res.waits = 0
        return res.file[res.dataset]

    def _is_frame_dataset(self, res: _Resource) -> bool:
        return self._retry(res, lambda: _frame_rows(self._dataset(res)))

    def _read_rows(self, res: _Resource, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the resource's dataset, ``(stop - start, rows, cols)``, waiting for a growing file."""
        if start < 0 or stop <= start:
            raise RejectedInput("frame_out_of_range", f"frames {start}:{stop}")

        def attempt():
            ds = self._dataset(res)
            if ds.ndim != 3:
                raise RejectedInput("wrong_shape", f"{res.dataset} has shape {ds.shape}, not (frames, rows, cols)")
            if ds.shape[1] * ds.shape[2] > self.max_frame_pixels:
                raise RejectedInput("frame_too_large", f"{ds.shape[1:]} > {self.max_frame_pixels} pixels")
            if ds.shape[0] < stop:
                ds.refresh()                                   # SWMR: see the writer's flushed rows
            if ds.shape[0] >= stop:
                if not res.filters_checked:
                    _check_filters(ds, res.path)
                    res.filters_checked = True
                return ds[start:stop]
            if ds.maxshape[0] is not None and stop > ds.maxshape[0]:
                raise RejectedInput("frame_out_of_range", f"frames {start}:{stop} of at most {ds.maxshape[0]}")
            res.waits += 1
            if res.waits % REOPEN_EVERY == 0:
                self._close(res)                               # a writer without SWMR: refresh cannot see it
            return None

        return self._retry(res, attempt)

    def _read_npy(self, res: _Resource, index: int) -> np.ndarray:
        if index < 0:
            raise RejectedInput("frame_out_of_range", f"index {index}")
        path = f"{res.path}_{index}.npy"

        def attempt():
            frame = np.load(path, allow_pickle=False)     # never unpickle from files named by the network
            if frame.ndim != 2:
                raise RejectedInput("wrong_shape", f"{path}: {frame.shape}")
            if frame.size > self.max_frame_pixels:
                raise RejectedInput("frame_too_large", f"{frame.shape} > {self.max_frame_pixels} pixels")
            return frame

        return self._retry(res, attempt)


def _check_filters(ds: h5py.Dataset, path: str) -> None:
    """Refuse at once (not after retries) a dataset compressed with a filter libhdf5 cannot load."""
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            hint = "" if HDF5PLUGIN_VERSION else " (install hdf5plugin)"
            raise RejectedInput("unsupported_compression",
                                f"{path}: HDF5 filter {code} {name.decode(errors='replace')!r} unavailable{hint}")


def _frame_rows(ds: h5py.Dataset) -> bool:
    return ds.ndim == 3 and ds.shape[1] > 1 and ds.shape[2] > 1


def _int_kwarg(kwargs: dict, name: str) -> int:
    value = kwargs.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RejectedInput("bad_datum", f"datum_kwargs[{name!r}] = {value!r}")
    return int(value)


def _range(doc: dict, name: str) -> tuple[int, int]:
    try:
        r = doc[name]
        start, stop = int(r["start"]), int(r["stop"])
    except (KeyError, TypeError, ValueError):
        raise RejectedInput("bad_stream_datum", f"{name} missing or not {{start, stop}}") from None
    if stop < start:
        raise RejectedInput("bad_stream_datum", f"{name} {start}:{stop}")
    return start, stop
