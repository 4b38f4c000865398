"""Frames from documents that point at files, as real area detectors write them.

Two generations of Bluesky documents refer to data in files instead of carrying it:

- ophyd v1: a ``resource`` (spec, root, resource_path, resource_kwargs) and one ``datum`` per
  frame (datum_kwargs); the event carries the datum_id with ``filled[field] = False``.
  Specs read here follow area-detector-handlers / databroker:
  ``AD_HDF5`` and ``AD_HDF5_SWMR`` read ``/entry/data/data[n*fpp:(n+1)*fpp]`` for
  datum ``{point_number: n}`` and resource ``{frame_per_point: fpp}``; ``NPY_SEQ`` reads
  ``<root>/<resource_path>_<index>.npy`` for datum ``{index}`` (ophyd.sim); ``AD_TIFF`` and
  ``AD_CBF`` read one file per frame named by the resource's template, ``AD_EIGER2`` /
  ``AD_EIGER`` a Dectris master file and the data files it links (service/detector_files.py).
- event-model >= 1.2x (ophyd-async): a ``stream_resource`` (uri, mimetype
  ``application/x-hdf5``, ``parameters.dataset``, ``data_key``) and ``stream_datum`` documents
  covering dataset rows ``indices.start:indices.stop`` for events ``seq_nums.start:stop``; or
  mimetype ``multipart/related;type=image/tiff`` (ophyd-async's TIFF writer): one file per frame,
  ``uri + parameters.template.format(k)``.

Several frames per point (an area detector's ``frame_per_point``, an Eiger series, ophyd-async
data keys ``[n, rows, cols]``) are summed into one frame per event: counts add, so the Poisson
variance stays right; flagged pixels stay flagged (`detector_files.point_frame`). Only one frame
per point of an HDF5 file is handed on as a FrameRef (`FileRead.locate`); the rest is read here.

Reduced 1D profiles in NXcanSAS files (the canSAS HDF5 standard that SasView, pyFAI and
DAWN write): a resource with spec ``NXcanSAS`` and datums ``{entry: name}`` and/or
``{frame: n}`` (row n of a time-resolved ``I(T, Q)``), or a stream_resource with mimetype
``application/x-nxcansas`` whose stream_datum indices are rows of ``I``. They are returned as
``(3, N)`` arrays of q (1/nm), I and σ and go straight to fitting.

Paths are confined to the local directory of the root_map entry that matched or, for roots
root_map does not name, to one of ``allowed_roots`` (none by default: refused), refused as
``path_outside_root``. When the resource arrives its path is checked as text (``..`` resolved,
no file system access: a hung mount must not stop the routing thread); a path outside refuses
the resource document and every frame that points into it. Each time a file is opened its real
path (``os.path.realpath``: symlinks followed) is checked against the root's real path, on the
reader thread: a frame behind a symlink that leads outside is refused, however old the link.

Files are opened with h5py (``swmr=True``), cached per resource and refreshed when a frame
lies beyond the dataset's current length (TIFF, CBF and Eiger files are opened for each read);
a file still being written (or a frame file not yet there) is re-read up to ``retries`` times,
``retry_delay_s`` apart, then refused as ``file_unavailable``. Compressed
chunks (Bitshuffle/LZ4, Blosc, Zstd, ...) are readable when ``hdf5plugin`` is installed; it is
imported here for that. Every refusal is a `RejectedInput` with a metrics reason.

Threads: documents are registered, and the frames an event or stream_datum asks for are
planned (`plan_event`, `plan_profile`, `plan_stream_datum`: look-ups and checks, no I/O), on
the routing thread, which owns the registry. The I/O of a plan (`FileRead.read`) touches only
its `_Resource`; `read(plan, timeout_s)` runs it on a reader thread of its own and gives up
after `timeout_s` (``file_unavailable``), leaving that thread behind. Before h5py or numpy
opens a file it is checked with ``os.stat`` to be a regular file: libhdf5 holds the GIL while
it blocks (a FIFO would stop every thread of the process), ``os.stat`` does not, so a hung
mount blocks only the reader thread. A mount that hangs after a file is open still blocks
inside libhdf5, GIL held: that, only a reader process could contain. `fill_event`,
`fill_profile`, `read_datum` and `stream_datum` plan and read at once, in the caller's thread.
"""
from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

import h5py
import numpy as np
from event_model import unpack_datum_page

from .detector_files import (SUM_CHUNK_PIXELS, TIFF_MIMETYPES, ad_template, eiger_data_links,
                             eiger_expected_frames, eiger_master_path, frames_per_point, join_uri_path,
                             point_frame, read_cbf, read_tiff, stream_template)
from .errors import RejectedInput
from .frame_refs import FrameRef

log = logging.getLogger(__name__)

try:  # registers the HDF5 compression filters (bitshuffle, LZ4, blosc, zstd, ...) with libhdf5
    import hdf5plugin
    HDF5PLUGIN_VERSION: str | None = hdf5plugin.version
except ImportError:  # pragma: no cover - depends on the environment
    HDF5PLUGIN_VERSION = None

AD_HDF5_SPECS = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
NPY_SPECS = frozenset({"NPY_SEQ"})
AD_IMAGE_SPECS = frozenset({"AD_TIFF", "AD_CBF"})          # one file per frame, named by a template
EIGER_SPECS = frozenset({"AD_EIGER2", "AD_EIGER"})        # Dectris master file + linked data files
HDF5_MIMETYPES = frozenset({"application/x-hdf5"})
HDF5_STREAM_SPECS = frozenset({"AD_HDF5_SWMR_STREAM", "AD_HDF5_SWMR_SLICE"})   # event-model 1.19-1.21 style
NXCANSAS_SPECS = frozenset({"NXcanSAS", "NXCANSAS"})
NXCANSAS_MIMETYPES = frozenset({"application/x-nxcansas"})
AD_DATASET = "/entry/data/data"
#: Q units NXcanSAS files use, as factors to 1/nm
Q_UNITS_TO_NM = {"1/nm": 1.0, "nm^-1": 1.0, "1/angstrom": 10.0, "1/A": 10.0, "A^-1": 10.0, "1/Å": 10.0,
                 "Å^-1": 10.0, "angstrom^-1": 10.0, "1/m": 1e-9, "m^-1": 1e-9}
REOPEN_EVERY = 10          # re-open a file (not just refresh) every N waits: writers without SWMR
MAX_HUNG_READS = 16        # reader threads left blocked at once; past this, reads are refused at once


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
    kind: str                    # "AD_HDF5", "NPY_SEQ", "AD_IMAGES", "AD_EIGER", "HDF5_STREAM", "TIFF_STREAM",
                                 # "NXCANSAS", "NXCANSAS_STREAM", "unsupported"
    spec: str                    # the document's spec or mimetype, for messages
    path: str                    # local path (root_map applied); for NPY_SEQ the file stem
    run_start: str | None
    dataset: str = AD_DATASET
    dataset_entry: str | None = None     # NXcanSAS: SASentry named by the resource, None = first
    frame_per_point: int = 1
    file_name: Callable[[int], str] | None = None     # AD_IMAGES, TIFF_STREAM: the file of frame number k
    read_image: Callable[[str, int], np.ndarray] | None = None   # its reader: (path, max pixels) -> frame
    first_file: int = 0          # AD_CBF: the number of the first file (initial_number)
    data_key: str | None = None
    datums: set[str] = field(default_factory=set)
    file: h5py.File | None = None
    waits: int = 0               # waits since the file was last (re)opened
    filters_checked: bool = False
    root: str = "/"              # real local directory the path must stay inside
    real_path: str = ""          # the open file's real path (checked inside root), for FrameRefs
    refusal: RejectedInput | None = None      # path_outside_root: every frame of it refused so
    hung: threading.Thread | None = None      # a reader thread abandoned on this file, maybe still blocked


@dataclass
class FileRead:
    """Frames that one document points at, planned on the routing thread; ``read()`` does the
    I/O (with the waits for a file still being written) and returns ``[(seq_num, array)]``:
    frames ``(rows, cols)`` or profiles ``(3, N)``. ``locate()``, for HDF5 frames, does the same
    checks and waits without reading the pixels and returns ``[(seq_num, FrameRef)]`` (a worker
    on another node reads them: service/frame_refs.py); None where only a read is possible."""
    resource: _Resource
    read: Callable[[], list[tuple[int, np.ndarray]]]
    locate: Callable[[], list[tuple[int, FrameRef]]] | None = None


def probe_regular_file(path: str) -> None:
    """OSError when `path` is missing; RejectedInput ``file_unavailable`` unless it is a regular
    file (a FIFO or device would block libhdf5 with the GIL held). ``os.stat`` releases the GIL,
    so a hung mount blocks only the calling thread."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise RejectedInput("file_unavailable", f"{path}: not a regular file")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _lexical(path: str) -> str:
    """`path` absolute and normalized as text (``..`` and ``.`` resolved), without touching the file system."""
    return os.path.normpath(os.path.abspath(path))


class FrameResolver:
    """Per-run registry of resource/datum and stream_resource/stream_datum documents, reading their frames.

    `root_map` maps document roots (``resource['root']``, or a leading part of a stream
    resource's path) to local directories, as databroker's ``root_map`` does; `allowed_roots`
    are local directories that documents may name directly (default none). Frames are
    returned as read: ``(rows, cols)`` arrays of the detector's dtype, row-major; a point of
    several frames as their sum (`detector_files.FrameSum`).
    """

    def __init__(self, *, root_map: dict[str, str] | None = None, allowed_roots: list[str] | None = None,
                 retries: int = 50, retry_delay_s: float = 0.1, max_frame_pixels: int = 64 * 2**20):
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
        for root in allowed_roots or []:
            if not isinstance(root, str) or not os.path.isabs(root):
                raise ValueError(f"allowed_roots must be absolute paths, got {root!r}")
        self.root_map = root_map
        # (as written, normalized; real path) of every local root, resolved once, here
        self._real = {r: os.path.realpath(r) for r in [*root_map.values(), *(allowed_roots or [])]}
        self.allowed_roots = [(_lexical(r), self._real[r]) for r in allowed_roots or []]
        self.retries = retries
        self.retry_delay_s = float(retry_delay_s)
        self.max_frame_pixels = max_frame_pixels
        self._resources: dict[str, _Resource] = {}            # resource / stream_resource uid
        self._datums: dict[str, tuple[str, dict]] = {}        # datum_id -> (resource uid, datum_kwargs)
        self._frame_keys: dict[str, dict[str, tuple[int, int, int]]] = {}   # descriptor uid -> key -> shape
        self._runs: dict[str | None, set[str]] = {}           # run uid -> resource uids
        self._run_descriptors: dict[str, set[str]] = {}       # run uid -> descriptor uids
        self._hung: set[threading.Thread] = set()             # abandoned reader threads (any run)
        self._hung_lock = threading.Lock()
        if HDF5PLUGIN_VERSION is None:
            log.warning("hdf5plugin is not installed: compressed HDF5 frames (bitshuffle/LZ4, blosc) cannot be read")

    # ----------------------------------------------------------------------- paths
    def _local(self, path: str) -> tuple[str, str] | None:
        """Apply root_map to an absolute path: the longest matching leading directory is
        replaced. ``(local path, local root)``, or None when no root_map entry matches."""
        best = None
        for root in self.root_map:
            r = root.rstrip("/") or "/"
            if _within(path, r):
                if best is None or len(r) > len(best[0]):
                    best = (r, self.root_map[root])
        if best is None:
            return None
        rest = path[len(best[0]):].lstrip("/")
        return (os.path.join(best[1], rest) if rest else best[1]), best[1]

    def _path(self, doc: dict) -> tuple[str, str]:
        """``(local path, real root it must stay inside)`` of a resource or stream_resource;
        RejectedInput ``path_outside_root`` when it resolves outside every root it may use."""
        if doc.get("uri"):
            parsed = urlparse(doc["uri"])
            if parsed.scheme not in ("", "file"):
                raise RejectedInput("unsupported_uri", doc["uri"][:200])
            path = unquote(parsed.path)
            mapped = self._local(path)
        else:
            try:
                root, rel = doc.get("root") or "", doc["resource_path"]
            except KeyError:
                raise RejectedInput("malformed_document", "resource without uri or resource_path") from None
            if not isinstance(root, str) or not isinstance(rel, str):
                raise RejectedInput("malformed_document", "root and resource_path must be strings")
            path = os.path.join(root, rel)
            mapped = (os.path.join(self.root_map[root], rel), self.root_map[root]) if root in self.root_map \
                else self._local(path)
        if "\x00" in path:
            raise RejectedInput("path_outside_root", "NUL in path")
        local = path if mapped is None else mapped[0]
        lexical = _lexical(local)
        roots = self.allowed_roots if mapped is None else [(_lexical(mapped[1]), self._real[mapped[1]])]
        for root, real_root in roots:
            if _within(lexical, root):
                return local, real_root
        where = "ingest.allowed_roots" if mapped is None else f"root_map {mapped[1]!r}"
        raise RejectedInput("path_outside_root", f"{path[:200]!r} is {lexical[:200]!r}, outside {where}")

    def _confined(self, res: _Resource, path: str) -> str:
        """`path` resolved again at open time (a symlink may have been swapped in since the
        resource arrived), checked inside the resource's root and to be a regular file."""
        real = os.path.realpath(path)
        if not _within(real, res.root):
            raise RejectedInput("path_outside_root", f"{path[:200]!r} resolves to {real[:200]!r}, outside {res.root!r}")
        probe_regular_file(real)
        return real

    def _located(self, res: _Resource, doc: dict) -> _Resource:
        """`res` with its local path and root, or marked refused (path_outside_root): the refusal
        is raised by `_add_checked` after registering it, and again for each frame asked of it."""
        try:
            res.path, res.root = self._path(doc)
        except RejectedInput as exc:
            if exc.reason != "path_outside_root":
                raise
            res.refusal = exc
        return res

    def _add_checked(self, res: _Resource) -> None:
        self._add(res)
        if res.refusal is not None:
            raise res.refusal

    # ----------------------------------------------------------------------- v1 documents
    def resource(self, doc: dict) -> None:
        """Register an ophyd v1 resource. Unknown specs are kept and refused when a frame is asked of them."""
        spec = str(doc.get("spec", ""))
        kind = ("AD_HDF5" if spec in AD_HDF5_SPECS else "NPY_SEQ" if spec in NPY_SPECS
                else "AD_IMAGES" if spec in AD_IMAGE_SPECS else "AD_EIGER" if spec in EIGER_SPECS
                else "NXCANSAS" if spec in NXCANSAS_SPECS else "unsupported")
        kwargs = doc.get("resource_kwargs") or {}
        res = self._located(_Resource(uid=doc["uid"], kind=kind, spec=spec, path="", run_start=doc.get("run_start")),
                            doc)
        if kind in ("AD_HDF5", "AD_IMAGES"):
            res.frame_per_point = frames_per_point(kwargs)
        if kind == "AD_IMAGES":
            self._image_files(res, kwargs)
        if kind == "NXCANSAS":
            res.dataset_entry = _entry_name(kwargs)
        self._add_checked(res)

    @staticmethod
    def _image_files(res: _Resource, kwargs: dict) -> None:
        """File names and reader of an AD_TIFF / AD_CBF resource: ``template % (directory/,
        filename, k)``, k counted from 0 (TIFF, as ophyd sets the file number) or from
        ``initial_number`` (CBF, default 1 as the Pilatus camserver)."""
        name = ad_template(kwargs.get("template"))
        filename = kwargs.get("filename")
        if not isinstance(filename, str) or "\x00" in filename or len(filename) > 255:
            raise RejectedInput("bad_resource", f"filename {str(filename)[:80]!r}")
        if res.spec == "AD_CBF":
            first = kwargs.get("initial_number", 1)
            if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or first < 0:
                raise RejectedInput("bad_resource", f"initial_number {first!r}")
            res.first_file, res.read_image = int(first), read_cbf
        else:
            res.read_image = read_tiff
        directory = os.path.join(res.path, "")
        res.file_name = lambda k: name(directory, filename, k)

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
        return self.plan_event(event, descriptor, field).read()[0][1]

    def plan_event(self, event: dict, descriptor: dict, field: str) -> FileRead:
        """The read of the frame ``(rows, cols)`` that ``event["data"][field]`` (a datum_id) refers
        to: the point's only frame, or the sum of its frames (`point_frame`)."""
        datum_id = event["data"].get(field)
        if not isinstance(datum_id, str):
            raise RejectedInput("unknown_datum", f"{field} is not a datum_id")
        res, chunks = self._plan_datum(datum_id)
        expected = frame_shape(descriptor.get("data_keys", {}).get(field, {}))
        seq = event.get("seq_num")

        def read():
            frame = point_frame(chunks())
            if expected is not None and tuple(frame.shape) != expected[1:]:
                raise RejectedInput("wrong_shape", f"{frame.shape} != descriptor {expected[1:]}")
            return [(seq, frame)]
        locate = None
        if res.kind == "AD_HDF5" and res.frame_per_point == 1:
            n = _int_kwarg(self._datums[datum_id][1], "point_number")
            locate = lambda: self._locate_rows(res, n, n + 1, seq, expected[1:] if expected else None)  # noqa: E731
        return FileRead(res, read, locate)

    def read_datum(self, datum_id: str) -> np.ndarray:
        """All frames of one datum, ``(frames of the point, rows, cols)``, not summed."""
        return np.concatenate(list(self._plan_datum(datum_id)[1]()))

    def _plan_datum(self, datum_id: str) -> tuple[_Resource, Callable[[], Iterator[np.ndarray]]]:
        """The datum's resource and its frames, as chunks ``(k, rows, cols)`` read while iterated."""
        try:
            res_uid, kwargs = self._datums[datum_id]
        except KeyError:
            raise RejectedInput("unknown_datum", datum_id[:200]) from None
        res = self._usable(self._resources[res_uid])
        fpp = res.frame_per_point
        if res.kind == "AD_HDF5":
            n = _int_kwarg(kwargs, "point_number")
            if fpp == 1:                                       # the fast path: one slice
                return res, lambda: iter([self._read_rows(res, n, n + 1)])
            return res, lambda: self._row_chunks(res, n * fpp, (n + 1) * fpp)
        if res.kind == "NPY_SEQ":
            index = _int_kwarg(kwargs, "index")
            return res, lambda: iter([self._read_npy(res, index)[np.newaxis]])
        if res.kind == "AD_IMAGES":
            n = _int_kwarg(kwargs, "point_number")
            if n < 0:
                raise RejectedInput("frame_out_of_range", f"point_number {n}")
            first = res.first_file + n * fpp
            return res, lambda: (self._read_image(res, k)[np.newaxis] for k in range(first, first + fpp))
        if res.kind == "AD_EIGER":
            seq_id = _int_kwarg(kwargs, "seq_id")
            frame_num = None if kwargs.get("frame_num") is None else _int_kwarg(kwargs, "frame_num")
            if seq_id < 0 or (frame_num is not None and frame_num < 0):
                raise RejectedInput("frame_out_of_range", f"seq_id {seq_id}, frame_num {frame_num}")
            return res, lambda: self._eiger_frames(res, seq_id, frame_num)
        raise RejectedInput("unsupported_spec", f"{res.spec!r} (resource {res.uid})")

    @staticmethod
    def _usable(res: _Resource) -> _Resource:
        if res.refusal is not None:
            raise RejectedInput(res.refusal.reason, res.refusal.detail)
        return res

    def fill_profile(self, event: dict, field: str) -> np.ndarray:
        """The reduced profile ``(3, N)`` (q 1/nm, I, σ) that ``event["data"][field]`` (a datum_id of
        an NXcanSAS resource) refers to."""
        return self.plan_profile(event, field).read()[0][1]

    def plan_profile(self, event: dict, field: str) -> FileRead:
        """The read of the reduced profile that ``event["data"][field]`` refers to (`fill_profile`)."""
        datum_id = event["data"].get(field)
        if not isinstance(datum_id, str) or datum_id not in self._datums:
            raise RejectedInput("unknown_datum", f"{field} is not a known datum_id")
        res_uid, kwargs = self._datums[datum_id]
        res = self._usable(self._resources[res_uid])
        if res.kind != "NXCANSAS":
            raise RejectedInput("unsupported_spec", f"{res.spec!r} holds no 1D profiles (resource {res.uid})")
        entry = kwargs.get("entry")
        if entry is not None and not isinstance(entry, str):
            raise RejectedInput("bad_datum", f"datum_kwargs['entry'] = {entry!r}")
        row = _int_kwarg(kwargs, "frame") if "frame" in kwargs else None
        seq = event.get("seq_num")
        return FileRead(res, lambda: [(seq, self._read_profiles(res, entry, row, None)[0])])

    # ----------------------------------------------------------------------- stream documents
    def stream_resource(self, doc: dict) -> None:
        """Register a stream_resource (ophyd-async). Unsupported ones are refused when frames are asked of them."""
        spec = str(doc.get("mimetype") or doc.get("spec") or "")
        params = doc.get("parameters") or {}
        hdf5 = spec in HDF5_MIMETYPES or spec in HDF5_STREAM_SPECS
        kind = ("HDF5_STREAM" if hdf5 else "NXCANSAS_STREAM" if spec in NXCANSAS_MIMETYPES
                else "TIFF_STREAM" if spec in TIFF_MIMETYPES else "unsupported")
        res = self._located(_Resource(uid=doc["uid"], kind=kind, spec=spec, path="", run_start=doc.get("run_start"),
                                      data_key=doc.get("data_key"),
                                      dataset=str(params.get("dataset") or params.get("path") or AD_DATASET)), doc)
        if kind == "NXCANSAS_STREAM":
            res.dataset_entry = _entry_name(params)
        if kind == "TIFF_STREAM":
            self._stream_files(res, params)
        self._add_checked(res)

    @staticmethod
    def _stream_files(res: _Resource, params: dict) -> None:
        """File names of a multipart TIFF stream_resource: ``uri + template.format(k)``, one frame
        per file; ``multiplier`` (frames per index) when no descriptor says it."""
        name = stream_template(params.get("template"))
        base = res.path
        res.file_name = lambda k: join_uri_path(base, name(k))
        res.read_image = read_tiff
        if params.get("multiplier") is not None:
            res.frame_per_point = frames_per_point(params, "multiplier")
        chunk = params.get("chunk_shape")
        if isinstance(chunk, (list, tuple)) and chunk and isinstance(chunk[0], int) and chunk[0] > 1 \
                and res.refusal is None:
            res.refusal = RejectedInput("unsupported_spec", f"{res.spec}: {chunk[0]} frames per file (multi-page TIFF)")

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

    def stream_kind(self, doc: dict) -> str:
        """"profile" when a stream_datum points into an NXcanSAS stream_resource, else "frame"."""
        res = self._resources.get(doc.get("stream_resource", ""))
        return "profile" if res is not None and res.kind == "NXCANSAS_STREAM" else "frame"

    def stream_datum(self, doc: dict) -> list[tuple[int, np.ndarray]]:
        """``(seq_num, frame (rows, cols))`` for every frame the stream_datum covers; [] for non-frame keys.
        For an NXcanSAS stream_resource, ``(seq_num, profile (3, N))`` per row of I."""
        plan = self.plan_stream_datum(doc)
        return [] if plan is None else plan.read()

    def plan_stream_datum(self, doc: dict) -> FileRead | None:
        """The read of the frames a stream_datum covers (`stream_datum`); None when there is nothing to read."""
        res = self._resources.get(doc["stream_resource"])
        if res is None:
            raise RejectedInput("unknown_resource", f"stream_datum {doc['uid']} refers to {doc['stream_resource']}")
        self._usable(res)
        start, stop = _range(doc, "indices")
        seq_start, seq_stop = _range(doc, "seq_nums")
        if stop - start != seq_stop - seq_start:
            raise RejectedInput("bad_stream_datum", f"indices {start}:{stop} vs seq_nums {seq_start}:{seq_stop}")
        if res.kind == "NXCANSAS_STREAM":
            if stop == start:
                return None
            return FileRead(res, lambda: list(zip(range(seq_start, seq_stop),
                                                  self._read_profiles(res, None, start, stop))))
        known = self._frame_keys.get(doc.get("descriptor", ""))
        shape = None
        per_event = res.frame_per_point
        if known is not None:
            if res.data_key not in known:
                return None                                   # a scalar/1D key of the same detector
            per_event, *shape = known[res.data_key]
        if res.kind not in ("HDF5_STREAM", "TIFF_STREAM"):
            raise RejectedInput("unsupported_spec", f"{res.spec!r} (stream_resource {res.uid})")
        if stop == start:
            return None
        if res.kind == "TIFF_STREAM" or per_event > 1:        # index i: frames i*n ... (i+1)*n - 1, summed
            def frames_of(i: int) -> Iterator[np.ndarray]:
                first = i * per_event
                if res.kind == "HDF5_STREAM":
                    return self._row_chunks(res, first, first + per_event)
                return (self._read_image(res, k)[np.newaxis] for k in range(first, first + per_event))

            def read_points():
                out = []
                for i in range(start, stop):
                    frame = point_frame(frames_of(i))
                    if shape is not None and tuple(frame.shape) != tuple(shape):
                        raise RejectedInput("wrong_shape", f"{frame.shape} != descriptor {tuple(shape)}")
                    out.append((seq_start + i - start, frame))
                return out
            return FileRead(res, read_points)

        def read():
            if shape is None and not self._is_frame_dataset(res):
                return []
            frames = self._read_rows(res, start, stop)
            if shape is not None and tuple(frames.shape[1:]) != tuple(shape):
                raise RejectedInput("wrong_shape", f"{frames.shape[1:]} != descriptor {tuple(shape)}")
            return [(seq_start + i, frames[i]) for i in range(stop - start)]

        def locate():
            if shape is None and not self._is_frame_dataset(res):
                return []
            return self._locate_rows(res, start, stop, seq_start, tuple(shape) if shape is not None else None)
        return FileRead(res, read, locate)

    # ----------------------------------------------------------------------- per-run state
    def _add(self, res: _Resource) -> None:
        old = self._resources.get(res.uid)
        if old is not None:
            self._close(old)
        self._resources[res.uid] = res
        self._runs.setdefault(res.run_start, set()).add(res.uid)

    def forget_run(self, run_start_uid: str) -> None:
        """Drop resources, datums and descriptors of a run and close its files (at its stop document)."""
        self.close_files(self.detach_run(run_start_uid))

    def detach_run(self, run_start_uid: str) -> list[_Resource]:
        """Drop resources, datums and descriptors of a run; returns its resources, whose files
        the caller closes (`close_files`) once no read of them is pending."""
        detached = []
        for uid in self._runs.pop(run_start_uid, set()):
            res = self._resources.pop(uid, None)
            if res is None:
                continue
            for datum_id in res.datums:
                self._datums.pop(datum_id, None)
            detached.append(res)
        for d in self._run_descriptors.pop(run_start_uid, set()):
            self._frame_keys.pop(d, None)
        return detached

    def close_files(self, resources: list[_Resource]) -> None:
        for res in resources:
            if res.hung is None or not res.hung.is_alive():     # a blocked reader may still hold it
                self._close(res)

    def close(self) -> None:
        """Close every open file (service shutdown)."""
        self.close_files(list(self._resources.values()))

    def hung_reads(self) -> int:
        """Reader threads abandoned after their timeout and still blocked (for /health)."""
        with self._hung_lock:
            self._hung = {t for t in self._hung if t.is_alive()}
            return len(self._hung)

    @staticmethod
    def _close(res: _Resource) -> None:
        if res.file is not None:
            try:
                res.file.close()
            except Exception:  # a handle invalidated by the writer closing the file in this process
                pass
            res.file = None

    # ----------------------------------------------------------------------- reading
    def read(self, plan: FileRead, timeout_s: float) -> list[tuple[int, np.ndarray]]:
        """Run `plan` on a reader thread; RejectedInput ``file_unavailable`` when it has not
        returned after `timeout_s` seconds (the thread is abandoned, and later reads of the same
        file are refused at once while it stays blocked), or at once when MAX_HUNG_READS
        readers are blocked already or no time is left (`timeout_s` <= 0)."""
        res = plan.resource
        with self._hung_lock:
            self._hung = {t for t in self._hung if t.is_alive()}
            if res.hung is not None and res.hung.is_alive():
                raise RejectedInput("file_unavailable", f"{res.path}: an earlier read has not returned")
            if len(self._hung) >= MAX_HUNG_READS:
                raise RejectedInput("file_unavailable", f"{res.path}: {len(self._hung)} reads of files hung already")
        if timeout_s <= 0:
            raise RejectedInput("file_unavailable", f"{res.path}: no time left to read (service stopping)")
        outcome: list = []

        def target():
            try:
                outcome.append((True, plan.read()))
            except BaseException as exc:  # handed to the waiting thread, which raises it there
                outcome.append((False, exc))
        reader = threading.Thread(target=target, name=f"file-read-{res.uid[:8]}", daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive():
            with self._hung_lock:
                self._hung.add(reader)
                res.hung = reader
            log.warning("file %s: no answer after %.1f s; reader thread abandoned", res.path, timeout_s)
            raise RejectedInput("file_unavailable", f"{res.path}: no answer after {timeout_s:.1f} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

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

    def _open(self, res: _Resource) -> h5py.File:
        if res.file is None or not res.file.id.valid:
            res.real_path = self._confined(res, res.path)
            res.file = h5py.File(res.real_path, "r", swmr=True)
            res.waits = 0
        return res.file

    def _dataset(self, res: _Resource) -> h5py.Dataset:
        return self._open(res)[res.dataset]

    def _is_frame_dataset(self, res: _Resource) -> bool:
        return self._retry(res, lambda: _frame_rows(self._dataset(res)))

    def _locate_rows(self, res: _Resource, start: int, stop: int, first_seq: int,
                     shape: tuple[int, ...] | None) -> list[tuple[int, FrameRef]]:
        """``[(seq_num, FrameRef)]`` for rows ``start:stop`` (seq_nums from `first_seq`), once the
        file holds them: the checks and waits of `_read_rows`, without reading the pixels."""
        ds = self._read_rows(res, start, stop, pixels=False)
        if shape is not None and tuple(ds.shape[1:]) != tuple(shape):
            raise RejectedInput("wrong_shape", f"{tuple(ds.shape[1:])} != descriptor {tuple(shape)}")
        frame_shape_ = (int(ds.shape[1]), int(ds.shape[2]))
        return [(first_seq + i, FrameRef(res.real_path, res.dataset, row, frame_shape_, ds.dtype.str))
                for i, row in enumerate(range(start, stop))]

    def _read_rows(self, res: _Resource, start: int, stop: int, pixels: bool = True):
        """Rows ``start:stop`` of the resource's dataset, ``(stop - start, rows, cols)``, waiting for a
        growing file; with ``pixels=False`` the dataset itself, once it holds them (nothing read)."""
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
                return ds[start:stop] if pixels else ds
            if ds.maxshape[0] is not None and stop > ds.maxshape[0]:
                raise RejectedInput("frame_out_of_range", f"frames {start}:{stop} of at most {ds.maxshape[0]}")
            res.waits += 1
            if res.waits % REOPEN_EVERY == 0:
                self._close(res)                               # a writer without SWMR: refresh cannot see it
            return None

        return self._retry(res, attempt)

    def _row_chunks(self, res: _Resource, start: int, stop: int) -> Iterator[np.ndarray]:
        """Rows ``start:stop`` of the resource's dataset in chunks of at most SUM_CHUNK_PIXELS
        pixels, once the file holds them all (the waits and checks of `_read_rows`)."""
        ds = self._read_rows(res, start, stop, pixels=False)
        step = max(1, SUM_CHUNK_PIXELS // (int(ds.shape[1]) * int(ds.shape[2])))
        for a in range(start, stop, step):
            yield self._read_rows(res, a, min(a + step, stop))

    def _read_image(self, res: _Resource, number: int) -> np.ndarray:
        """Frame file `number` of an AD_TIFF / AD_CBF / TIFF stream resource, waiting for it to be written."""
        path = res.file_name(number)
        return self._retry(res, lambda: res.read_image(self._confined(res, path), self.max_frame_pixels))

    # ----------------------------------------------------------------------- Eiger
    def _eiger_frames(self, res: _Resource, seq_id: int, frame_num: int | None) -> Iterator[np.ndarray]:
        """Frames of Eiger series `seq_id` (all, or frame `frame_num` of it) as chunks, once the
        series holds them; each data file checked inside the root before it is opened."""
        master = eiger_master_path(res.path, seq_id)
        parts, (rows, cols) = self._retry(res, lambda: self._eiger_parts(res, master, frame_num))
        step = max(1, SUM_CHUNK_PIXELS // (rows * cols))
        chunks = []                       # (data file, dataset, first row, stop row) to read
        for path, dataset, n in parts:
            if frame_num is None:
                chunks += [(path, dataset, a, min(a + step, n)) for a in range(0, n, step)]
            elif frame_num < n:
                chunks.append((path, dataset, frame_num, frame_num + 1))
                break
            else:
                frame_num -= n
        for chunk in chunks:
            yield self._retry(res, lambda chunk=chunk: self._h5_rows(res, *chunk))

    def _eiger_parts(self, res: _Resource, master_path: str, frame_num: int | None):
        """``([(data file, dataset, frames)], (rows, cols))`` of a series once it holds frame
        `frame_num`, or ``nimages × ntrigger`` frames (at least one when the master does not
        say); None before."""
        real = self._confined(res, master_path)
        with h5py.File(real, "r") as master:
            links = eiger_data_links(master, real)
            expected = eiger_expected_frames(master)
            parts, shapes, total = [], set(), 0
            for path, dataset in links:
                if frame_num is not None and total > frame_num:
                    break                                        # later data files may not exist yet
                if path is None:                                 # frames in the master file itself
                    parts.append((master_path, dataset, self._eiger_part(master[dataset], real, shapes)))
                else:
                    with h5py.File(self._confined(res, path), "r") as f:
                        parts.append((path, dataset, self._eiger_part(f[dataset], path, shapes)))
                total += parts[-1][2]
        need = frame_num + 1 if frame_num is not None else (expected or 1)
        return (parts, shapes.pop()) if total >= need else None

    def _eiger_part(self, ds: h5py.Dataset, path: str, shapes: set) -> int:
        """Frames in one Eiger data dataset, its shape and filters checked."""
        if ds.ndim != 3:
            raise RejectedInput("wrong_shape", f"{path}: {ds.name} has shape {ds.shape}, not (frames, rows, cols)")
        if ds.shape[1] * ds.shape[2] > self.max_frame_pixels:
            raise RejectedInput("frame_too_large", f"{path}: {ds.shape[1:]} > {self.max_frame_pixels} pixels")
        shapes.add((int(ds.shape[1]), int(ds.shape[2])))
        if len(shapes) > 1:
            raise RejectedInput("wrong_shape", f"{path}: data files of one series differ: {sorted(shapes)}")
        _check_filters(ds, path)
        return int(ds.shape[0])

    def _h5_rows(self, res: _Resource, path: str, dataset: str, start: int, stop: int) -> np.ndarray:
        with h5py.File(self._confined(res, path), "r") as f:
            return f[dataset][start:stop]

    def _read_profiles(self, res: _Resource, entry: str | None, start: int | None, stop: int | None) -> np.ndarray:
        """Rows ``start:stop`` (or row ``start``; or the only profile when None) of an NXcanSAS
        file's I, as ``(n, 3, N)`` q (1/nm), I, σ; waits for a file still being written."""
        if start is not None and (start < 0 or (stop is not None and stop <= start)):
            raise RejectedInput("frame_out_of_range", f"rows {start}:{stop}")

        def attempt():
            q, i_ds, sigma_ds, mask = _nxcansas_data(self._open(res), entry or res.dataset_entry, res.path)
            if i_ds.ndim == 1:
                rows = [i_ds[()]], [sigma_ds[()] if sigma_ds is not None else None]
                if start not in (None, 0) or (stop is not None and stop != 1):
                    raise RejectedInput("frame_out_of_range", f"{res.path}: one profile, rows {start}:{stop} asked")
            else:
                lo = 0 if start is None else start
                hi = lo + 1 if stop is None else stop
                if i_ds.shape[0] < hi:
                    i_ds.refresh()
                    if i_ds.shape[0] < hi:
                        return None                          # rows not written yet
                rows = list(i_ds[lo:hi]), list(sigma_ds[lo:hi]) if sigma_ds is not None else [None] * (hi - lo)
            return np.stack([_profile_rows(q, i, s, mask, res.path) for i, s in zip(*rows)])

        return self._retry(res, attempt)

    def _read_npy(self, res: _Resource, index: int) -> np.ndarray:
        if index < 0:
            raise RejectedInput("frame_out_of_range", f"index {index}")
        path = f"{res.path}_{index}.npy"

        def attempt():
            frame = np.load(self._confined(res, path), allow_pickle=False)   # never unpickle network-named files
            if frame.ndim != 2:
                raise RejectedInput("wrong_shape", f"{path}: {frame.shape}")
            if frame.size > self.max_frame_pixels:
                raise RejectedInput("frame_too_large", f"{frame.shape} > {self.max_frame_pixels} pixels")
            return frame

        return self._retry(res, attempt)


def _nxcansas_data(f: h5py.File, entry: str | None, path: str):
    """(q 1/nm (N,), I dataset (N,) or (T, N), σ dataset or None, keep mask (N,)) of the first
    SASdata group of ``entry`` (default: the first SASentry). NXcanSAS: groups carry
    ``canSAS_class`` (or ``NX_class`` NXentry/NXdata); the data group's ``signal`` names I and
    ``I_axes`` its axes, Q last; ``I@uncertainties`` names σ; ``Q@units`` the unit; an optional
    boolean ``Mask`` (True = excluded) drops points (NeXus NXcanSAS definition)."""
    def has_class(g, cansas, nx):
        a = g.attrs
        return _attr(a, "canSAS_class") == cansas or _attr(a, "NX_class") == nx

    entries = sorted(k for k, g in f.items() if isinstance(g, h5py.Group) and has_class(g, "SASentry", "NXentry"))
    if entry is not None:
        if entry not in f or not isinstance(f[entry], h5py.Group):
            raise RejectedInput("bad_datum", f"{path}: no SASentry {entry!r} (has {entries})")
        group = f[entry]
    elif entries:
        group = f[entries[0]]
    else:
        raise RejectedInput("not_nxcansas", f"{path}: no SASentry group")
    datas = sorted(k for k, g in group.items() if isinstance(g, h5py.Group) and has_class(g, "SASdata", "NXdata"))
    if not datas:
        raise RejectedInput("not_nxcansas", f"{path}: {group.name} has no SASdata group")
    data = group[datas[0]]
    signal = _attr(data.attrs, "signal") or "I"
    axes = (_attr(data.attrs, "I_axes") or "Q").split(",")
    q_name = axes[-1].strip()
    if signal not in data or q_name not in data:
        raise RejectedInput("not_nxcansas", f"{path}: {data.name} lacks {signal!r} or {q_name!r}")
    i_ds, q_ds = data[signal], data[q_name]
    unit = _attr(q_ds.attrs, "units") or "1/angstrom"
    if unit not in Q_UNITS_TO_NM:
        raise RejectedInput("bad_units", f"{path}: Q units {unit!r} (known: {sorted(Q_UNITS_TO_NM)})")
    q = np.asarray(q_ds[()], np.float64) * Q_UNITS_TO_NM[unit]
    if q.ndim != 1 or i_ds.ndim not in (1, 2) or i_ds.shape[-1] != q.size:
        raise RejectedInput("wrong_shape", f"{path}: Q {q.shape}, {signal} {i_ds.shape}")
    err = _attr(i_ds.attrs, "uncertainties")
    sigma_ds = data[err] if err and err in data else None
    if sigma_ds is not None and sigma_ds.shape != i_ds.shape:
        raise RejectedInput("wrong_shape", f"{path}: {err} {sigma_ds.shape} != {signal} {i_ds.shape}")
    keep = ~np.asarray(data["Mask"][()], bool).reshape(-1)[:q.size] if "Mask" in data else np.ones(q.size, bool)
    return q, i_ds, sigma_ds, keep


def _profile_rows(q, intensity, sigma, keep, path: str) -> np.ndarray:
    """(3, N') q, I, σ of one profile, masked and non-finite points dropped; σ Poisson when absent."""
    intensity = np.asarray(intensity, np.float64)
    sigma = np.sqrt(np.maximum(intensity, 1.0)) if sigma is None else np.asarray(sigma, np.float64)
    ok = keep & np.isfinite(q) & np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0)
    if ok.sum() < 3:
        raise RejectedInput("bad_profile", f"{path}: fewer than 3 valid points")
    q, intensity, sigma = q[ok], intensity[ok], sigma[ok]
    order = np.argsort(q, kind="stable")
    return np.stack([q[order], intensity[order], sigma[order]])


def _entry_name(kwargs: dict) -> str | None:
    entry = kwargs.get("entry")
    if entry is not None and not isinstance(entry, str):
        raise RejectedInput("bad_resource", f"entry {entry!r}")
    return entry


def _attr(attrs, name: str) -> str | None:
    value = attrs.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None if value is None else str(value)


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
