"""Detector file formats beside the HDF5 fast path of `service/resolve.py`, and the frames of one point.

What the documents say and how it is read (bluesky/area-detector-handlers is the reference;
where it differs, said so):

- ``AD_TIFF`` (ophyd v1 ``FileStoreTIFF``): resource_path the directory, resource_kwargs
  ``{template, filename, frame_per_point}`` (template ``%s%s_%6.6d.tiff``), datum
  ``{point_number: n}``: the point's frames are the files ``template % (directory + "/",
  filename, k)`` for k = n·fpp … (n+1)·fpp − 1 (ophyd starts the file number at 0). Read with
  tifffile, the reference handler's reader: one page per file.
- ``AD_CBF`` (Pilatus camserver): the same, with resource_kwargs ``initial_number`` (default 1,
  the camserver's first file number): k = initial + n·fpp + j. The reference handler's upper
  bound ``(n + 2)·fpp`` gives fpp files only for fpp = 1; here every point has fpp files. Read
  with fabio (byte-offset CBF), once the file holds its whole binary section.
- ``AD_EIGER2`` / ``AD_EIGER`` (NSLS-II ophyd Eiger file plugin): resource_path the file prefix,
  resource_kwargs ``{images_per_file}`` (older: ``frame_per_point``; neither is needed to read),
  datum ``{seq_id, frame_num?}``: the Dectris master file ``<prefix>_<seq_id>_master.h5``, whose
  ``/entry/data/data_NNNNNN`` external links point at data files holding ``/entry/data/data``
  ``(frames, rows, cols)`` (bitshuffle/LZ4: hdf5plugin). The datum's frames are all the frames
  of the series, data files in number order (the handler's stack), or frame ``frame_num`` of
  that stack. The series is complete once it holds ``nimages × ntrigger`` frames
  (``/entry/instrument/detector/detectorSpecific``), or, without those, whatever is linked.
- ophyd-async TIFF writer (``ADWriterFactory.tiff``): stream_resource mimetype
  ``multipart/related;type=image/tiff``, uri the directory (``file://localhost/dir/``),
  parameters ``{template: "<name>_{:06d}.tiff", chunk_shape: [1, rows, cols]}``; stream_datum
  index i of a data key of shape ``[n, rows, cols]`` covers files k = i·n … (i+1)·n − 1, named
  ``uri + template.format(k)`` (bluesky-tiled-plugins' TIFFConsolidator).

Templates are document text, so they are parsed, not trusted: an areaDetector template must be
two ``%s`` then one integer conversion, a stream template one ``{…d}`` field, widths of at most
two digits; anything else is ``bad_resource``.

Several frames per point (frame_per_point, an Eiger series, ophyd-async ``[n, rows, cols]``):
the point's frames are summed into one frame (`point_frame`), as SAXS reduction does: counts
add, so the Poisson variance the integrator takes from the pixel values stays right (a mean
would understate it n-fold). Flags survive the sum: a pixel that any frame marks as Dectris
detectors do (negative in signed frames: -1 gap, -2 bad; the top two values of unsigned ones,
which are -1 and -2 read unsigned) is flagged in the sum too, with the first frame's flag, so
the detector's dummy still matches it. Integer sums keep the frames' dtype while they fit below
the flag values, else take a wider one (unsigned: up to uint32, then int64 with the flags
negative); float frames are summed in float64 and returned in their dtype.
"""
from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterable

import h5py
import numpy as np

from .errors import RejectedInput

#: pixels read at once when frames of a point are summed (bounds memory for long series)
SUM_CHUNK_PIXELS = 16 * 2**20
#: frames one point may ask for (frame_per_point): more is bad_resource
MAX_FRAMES_PER_POINT = 100_000
TIFF_MIMETYPES = frozenset({"multipart/related;type=image/tiff"})
EIGER_DATA_LINK = re.compile(r"data_(\d{6})")
EIGER_SPECIFIC = "/entry/instrument/detector/detectorSpecific"
_AD_DIRECTIVE = re.compile(r"%[^a-zA-Z%]*[a-zA-Z%]?")
_AD_STRING, _AD_INT = "%s", re.compile(r"%[-0]?\d{0,2}(?:\.\d{1,2})?[diu]")
_STREAM_FIELD = re.compile(r"\{0?(?::0?\d{0,2}d)?\}")
_CBF_BINARY = b"\x0c\x1a\x04\xd5"        # CBF: start of the binary section
_CBF_HEADER_BYTES = 1 << 16


class NotReadable(OSError):
    """A file that exists but cannot be read yet (still being written, truncated): retried."""


# --------------------------------------------------------------------------- templates
def ad_template(template: object) -> Callable[[str, str, int], str]:
    """``name(directory, filename, number)`` of an areaDetector file template
    (``%s%s_%6.6d.tif``: two ``%s`` then one integer conversion; ``%%`` allowed)."""
    if not isinstance(template, str) or not 0 < len(template) <= 255 or "\x00" in template:
        raise RejectedInput("bad_resource", f"template {str(template)[:80]!r}")
    kinds = []
    for directive in _AD_DIRECTIVE.findall(template):
        if directive == "%%":
            continue
        if directive == _AD_STRING:
            kinds.append("s")
        elif _AD_INT.fullmatch(directive):
            kinds.append("d")
        else:
            raise RejectedInput("bad_resource", f"template {template[:80]!r}: {directive!r} is not %s or %[0][w][.p]d")
    if kinds != ["s", "s", "d"]:
        raise RejectedInput("bad_resource", f"template {template[:80]!r}: want %s%s then one integer conversion")
    return lambda directory, filename, number: template % (directory, filename, number)


def stream_template(template: object) -> Callable[[int], str]:
    """``name(number)`` of a stream_resource template (``scan_{:06d}.tiff``: one ``{…d}`` field)."""
    if not isinstance(template, str) or not 0 < len(template) <= 255 or "\x00" in template:
        raise RejectedInput("bad_resource", f"template {str(template)[:80]!r}")
    fields = re.findall(r"\{[^{}]*\}", template)
    if len(fields) != 1 or template.count("{") != 1 or template.count("}") != 1 \
            or not _STREAM_FIELD.fullmatch(fields[0]):
        raise RejectedInput("bad_resource", f"template {template[:80]!r}: want one {{:0Nd}} field")
    return template.format


def join_uri_path(base: str, tail: str) -> str:
    """``base + tail`` as bluesky-tiled-plugins joins a stream_resource's uri and rendered
    template: verbatim, one ``/`` where both carry one."""
    if base.endswith("/") and tail.startswith("/"):
        tail = tail.lstrip("/")
    return base + tail


# --------------------------------------------------------------------------- TIFF and CBF
def read_tiff(path: str, max_pixels: int) -> np.ndarray:
    """The one frame ``(rows, cols)`` of a TIFF file, as written (dtype kept); NotReadable while
    it is incomplete."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover - depends on the environment
        raise RejectedInput("unsupported_spec", "TIFF frames need tifffile (pip install tifffile)") from None
    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            page = tif.pages[0]
            shape = tuple(page.shape)
            if pages != 1 or len(shape) != 2:
                raise RejectedInput("wrong_shape", f"{path}: {pages} page(s) of {shape}, not one 2D frame")
            _check_pixels(path, shape, max_pixels)
            return page.asarray()
    except (RejectedInput, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile: TiffFileError, zlib.error, struct.error, ... on a partial file
        raise NotReadable(f"{path}: {type(exc).__name__}: {str(exc)[:160]}") from None


def read_cbf(path: str, max_pixels: int) -> np.ndarray:
    """The frame ``(rows, cols)`` of a CBF file (fabio; Pilatus byte-offset int32); NotReadable
    until the file holds the whole binary section its header announces."""
    from fabio.cbfimage import CbfImage        # fabio: pyFAI's image I/O, imported when first needed

    with open(path, "rb") as f:
        head = f.read(_CBF_HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    dims = [_cbf_field(head, name) for name in
            (b"X-Binary-Size-Second-Dimension", b"X-Binary-Size-Fastest-Dimension", b"X-Binary-Size")]
    start = head.find(_CBF_BINARY)
    if None in dims or start < 0:
        raise NotReadable(f"{path}: no complete CBF binary header yet")
    rows, cols, nbytes = dims
    _check_pixels(path, (rows, cols), max_pixels)
    if start + len(_CBF_BINARY) + nbytes > size:
        raise NotReadable(f"{path}: {size} bytes, binary section not complete")
    try:
        data = CbfImage().read(path).data
    except Exception as exc:  # noqa: BLE001 - fabio raises AssertionError, AttributeError, ... on a bad file
        raise NotReadable(f"{path}: {type(exc).__name__}: {str(exc)[:160]}") from None
    if data is None or data.shape != (rows, cols):
        raise NotReadable(f"{path}: read {None if data is None else data.shape}, header says {(rows, cols)}")
    return data


def _cbf_field(head: bytes, name: bytes) -> int | None:
    m = re.search(rb"\n" + name + rb":\s*(\d{1,12})", head)
    return int(m.group(1)) if m else None


def _check_pixels(path: str, shape: tuple[int, ...], max_pixels: int) -> None:
    if int(np.prod(shape, dtype=np.int64)) > max_pixels:
        raise RejectedInput("frame_too_large", f"{path}: {shape} > {max_pixels} pixels")


# --------------------------------------------------------------------------- Eiger
def eiger_master_path(prefix: str, seq_id: int) -> str:
    return f"{prefix}_{seq_id}_master.h5"


def eiger_data_links(master: h5py.File, master_path: str) -> list[tuple[str | None, str]]:
    """``(data file path or None for the master itself, dataset)`` of each ``/entry/data/data_NNNNNN``
    of a master file, in number order. Paths are as the links name them, made absolute against
    the master's directory: the caller checks them before anything is opened."""
    group = master.get("/entry/data") if "/entry/data" in master else None
    if not isinstance(group, h5py.Group):
        raise KeyError(f"{master_path}: no /entry/data group (yet)")
    names = sorted((n for n in group if EIGER_DATA_LINK.fullmatch(n)), key=lambda n: int(n[5:]))
    out: list[tuple[str | None, str]] = []
    for name in names:
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            path = link.filename if os.path.isabs(link.filename) \
                else os.path.join(os.path.dirname(master_path), link.filename)
            out.append((path, link.path))
        else:                                    # a dataset in the master file itself (hard or soft link)
            out.append((None, f"/entry/data/{name}"))
    return out


def eiger_expected_frames(master: h5py.File) -> int | None:
    """``nimages × ntrigger`` of the series, when the master file records them."""
    try:
        spec = master[EIGER_SPECIFIC]
        n = int(np.asarray(spec["nimages"][()]).reshape(-1)[0])
        t = int(np.asarray(spec["ntrigger"][()]).reshape(-1)[0]) if "ntrigger" in spec else 1
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return n * max(t, 1) if n > 0 else None


# --------------------------------------------------------------------------- frames of one point
def frames_per_point(kwargs: dict, name: str = "frame_per_point") -> int:
    """A resource's frames per point (default 1), checked: an integer 1 … MAX_FRAMES_PER_POINT."""
    fpp = kwargs.get(name, 1)
    if isinstance(fpp, bool) or not isinstance(fpp, (int, np.integer)) or not 1 <= fpp <= MAX_FRAMES_PER_POINT:
        raise RejectedInput("bad_resource", f"{name} {fpp!r}")
    return int(fpp)


def point_frame(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The frame ``(rows, cols)`` of one point from its frames, given as chunks ``(k, rows, cols)``:
    the only frame as read (no copy), or the sum of all (`FrameSum`)."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or len(first) == 0:
        raise RejectedInput("frame_out_of_range", "the point has no frames")
    second = next(it, None)
    if second is None and len(first) == 1:
        return first[0]
    total = FrameSum()
    for chunk in itertools.chain([first], [] if second is None else [second], it):
        total.add(chunk)
    return total.result()


class FrameSum:
    """The sum of the frames of one point, added in chunks ``(k, rows, cols)`` (module docstring:
    flags and dtypes). `reference_sum` is the plain version the tests compare it with."""

    def __init__(self):
        self.dtype: np.dtype | None = None
        self.count = 0
        self._total: np.ndarray | None = None     # sum of the unflagged values, int64/uint64/float64
        self._flag: np.ndarray | None = None      # the first flag of each pixel, as read
        self._flagged: np.ndarray | None = None

    def add(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 3:
            raise RejectedInput("wrong_shape", f"frames of a point {frames.shape}, not (k, rows, cols)")
        if self.dtype is None:
            if frames.dtype.kind not in "uif":
                raise RejectedInput("bad_dtype", str(frames.dtype))
            self.dtype = frames.dtype
            acc = np.float64 if frames.dtype.kind == "f" else \
                np.uint64 if frames.dtype == np.uint64 else np.int64
            self._total = np.zeros(frames.shape[1:], acc)
            self._flag = np.zeros(frames.shape[1:], frames.dtype)
            self._flagged = np.zeros(frames.shape[1:], bool)
        elif frames.dtype != self.dtype or frames.shape[1:] != self._total.shape:
            raise RejectedInput("wrong_shape", f"frames of one point differ: {frames.dtype}{frames.shape[1:]} "
                                               f"after {self.dtype}{self._total.shape}")
        flags = _flags(frames)
        if flags is None or not flags.any():
            self._total += frames.sum(axis=0, dtype=self._total.dtype)
        else:
            self._total += np.where(flags, 0, frames).sum(axis=0, dtype=self._total.dtype)
            new = flags.any(axis=0) & ~self._flagged
            if new.any():
                first = np.take_along_axis(frames, flags.argmax(axis=0)[np.newaxis], axis=0)[0]
                self._flag[new] = first[new]
                self._flagged |= new
        self.count += len(frames)

    def result(self) -> np.ndarray:
        if self.dtype is None:
            raise RejectedInput("frame_out_of_range", "the point has no frames")
        if self.dtype.kind == "f":
            return self._total.astype(self.dtype)
        out_dtype = _sum_dtype(self.dtype, int(self._total.max(initial=0)))
        out = self._total.astype(out_dtype)
        if self._flagged.any():
            out[self._flagged] = _reflag(self._flag[self._flagged], self.dtype, out_dtype)
        return out


def reference_sum(stack: np.ndarray) -> np.ndarray:
    """`FrameSum` of a whole stack ``(n, rows, cols)``, pixel by pixel in Python integers: the
    plain version of the rules (tests compare the two)."""
    dtype = stack.dtype
    if dtype.kind == "f":
        return stack.astype(np.float64).sum(axis=0).astype(dtype)
    flagged_at = {}
    sums = np.zeros(stack.shape[1:], object)
    for idx in np.ndindex(*stack.shape[1:]):
        values = [int(v) for v in stack[(slice(None), *idx)]]
        flags = [v for v in values if _is_flag(v, dtype)]
        if flags:
            flagged_at[idx] = flags[0]
        sums[idx] = sum(v for v in values if not _is_flag(v, dtype))
    out_dtype = _sum_dtype(dtype, max([int(s) for s in sums.flat] or [0]))
    out = sums.astype(out_dtype)
    for idx, v in flagged_at.items():
        out[idx] = _reflag(np.array([v], dtype), dtype, out_dtype)[0]
    return out


def _is_flag(value: int, dtype: np.dtype) -> bool:
    return value < 0 if dtype.kind == "i" else value >= int(np.iinfo(dtype).max) - 1


def _flags(frames: np.ndarray) -> np.ndarray | None:
    """Pixels flagged as Dectris detectors flag them (module docstring); None for float frames."""
    if frames.dtype.kind == "i":
        return frames < 0
    if frames.dtype.kind == "u":
        return frames >= np.iinfo(frames.dtype).max - 1
    return None


def _sum_dtype(dtype: np.dtype, largest: int) -> np.dtype:
    """The narrowest dtype, from the frames' own, that holds sums up to `largest` below the flags."""
    if dtype.kind == "u":
        for cand in (dtype, np.dtype(np.uint16), np.dtype(np.uint32)):
            if cand.itemsize >= dtype.itemsize and largest <= int(np.iinfo(cand).max) - 2:
                return cand
        return np.dtype(np.int64) if dtype.itemsize <= 4 else dtype
    for cand in (dtype, np.dtype(np.int32), np.dtype(np.int64)):
        if cand.itemsize >= dtype.itemsize and largest <= int(np.iinfo(cand).max):
            return cand
    return np.dtype(np.int64)


def _reflag(flags: np.ndarray, src: np.dtype, dst: np.dtype) -> np.ndarray:
    """Flag values of `src` frames as the same flags in `dst`: signed stay as they are; unsigned
    max − d becomes dst's max − d, or −(d + 1) in a signed dst."""
    if src.kind == "i":
        return flags.astype(dst)
    below_top = int(np.iinfo(src).max) - flags.astype(np.int64)          # 0 or 1
    if dst.kind == "u":
        return (int(np.iinfo(dst).max) - below_top).astype(dst)
    return (-(below_top + 1)).astype(dst)
