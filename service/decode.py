"""The wire side of ingest: bluesky's 0MQ framing ``prefix SP name SP payload`` parsed once, the
payload decoded (msgpack with msgpack-numpy by default, pickle only with ``allow_pickle``),
hostile input bounded before it costs memory: message bytes, msgpack objects and nesting depth
(`check_msgpack_structure`), array dtypes (`decode_numpy`: no pickle, no object pointers).
Every refusal raises `RejectedInput(reason)`.
"""
from __future__ import annotations

import functools
import math
import pickle
from typing import Any

import msgpack
import numpy as np
from event_model import DocumentNames

from .errors import RejectedInput

DOCUMENT_NAMES = frozenset(n.name for n in DocumentNames)
ARRAY_KINDS = frozenset("biufcSU")      # numpy dtype kinds accepted from the wire: no object, void or datetime
MAX_NAME_BYTES = max(len(n) for n in DOCUMENT_NAMES)


def check_msgpack_structure(payload: bytes | memoryview, *, max_objects: int, max_depth: int) -> None:
    """Walk the msgpack headers of `payload` without building objects; RejectedInput
    "too_complex" when it holds more than `max_objects` objects or nests deeper than
    `max_depth` containers.

    Why: unpacking allocates about 60 bytes per object (an empty list or dict from a 1-byte
    header), so structure, not bytes, bounds memory; and documents nested deeper than Python's
    recursion limit break every recursive consumer (JSON, Tiled metadata). str/bin/ext payloads
    are skipped, so a frame of megabytes costs a few header reads. Truncated or invalid input is
    left to msgpack to report (format: github.com/msgpack/msgpack/blob/master/spec.md).
    """
    n, pos, objects = len(payload), 0, 0
    remaining = [1]                             # items still to read at each open container level
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        if pos >= n:
            return
        remaining[-1] -= 1
        objects += 1
        if objects > max_objects:
            raise RejectedInput("too_complex", f"more than {max_objects} msgpack objects")
        b = payload[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):     # fixint, nil, bool
            continue
        if b <= 0x8F:                                             # fixmap
            items = 2 * (b & 0x0F)
        elif b <= 0x9F:                                           # fixarray
            items = b & 0x0F
        elif b <= 0xBF:                                           # fixstr
            pos += b & 0x1F
            continue
        elif b in _MSGPACK_CONTAINERS:                            # array16/32, map16/32
            width, per_item = _MSGPACK_CONTAINERS[b]
            items = per_item * int.from_bytes(payload[pos:pos + width], "big")
            pos += width
        elif b in _MSGPACK_SIZED:                                 # str, bin, ext: length header, then bytes
            width, extra = _MSGPACK_SIZED[b]
            pos += width + extra + int.from_bytes(payload[pos:pos + width], "big")
            continue
        elif b in _MSGPACK_FIXED:                                 # numbers, fixext
            pos += _MSGPACK_FIXED[b]
            continue
        else:                                                     # 0xC1: never used; msgpack refuses it
            return
        if items:
            remaining.append(items)
            if len(remaining) - 1 > max_depth:
                raise RejectedInput("too_complex", f"nested deeper than {max_depth}")


# header byte -> (length bytes, items per entry)
_MSGPACK_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_MSGPACK_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
                  0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}                      # -> (length bytes, ext type byte)
_MSGPACK_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
                  0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}


def decode_numpy(obj: dict, *, allow_pickle: bool = False):
    """msgpack object_hook for msgpack-numpy's encoding, without its unsafe paths.

    msgpack_numpy.decode builds ``np.ndarray(buffer=data, dtype=type)`` for any dtype, so a
    message declaring dtype ``|O`` turns its bytes into object pointers (a segfault when
    touched), and it unpickles arrays of kind ``O`` whatever the decoder was told. Here only
    dtypes of kinds b, i, u, f, c, S, U are built, the data must be exactly shape x itemsize
    bytes, and kind ``O`` (pickle inside msgpack) is refused unless `allow_pickle`.
    """
    if b"nd" not in obj:
        if b"complex" in obj:                   # msgpack-numpy: {complex: True, data: repr(z)}
            data = obj.get(b"data")
            try:
                return complex(data.decode("ascii") if isinstance(data, bytes) else data)
            except (TypeError, ValueError, UnicodeDecodeError):
                raise RejectedInput("bad_array", "malformed complex number") from None
        if not all(isinstance(k, str) for k in obj):       # JSON documents; schema checks need str keys
            raise RejectedInput("non_string_key", repr(next(k for k in obj if not isinstance(k, str)))[:40])
        return obj
    if obj.get(b"kind") == b"O":
        if not allow_pickle:
            raise RejectedInput("pickle_refused", "msgpack-numpy object array (pickled) while allow_pickle is false")
        try:
            return pickle.loads(obj[b"data"])    # allow_pickle: the operator turned it on
        except Exception as exc:
            raise RejectedInput("undecodable", f"pickle: {type(exc).__name__}") from None
    try:
        descr, data = obj[b"type"], obj[b"data"]
        dtype = np.dtype(descr) if isinstance(descr, str) and len(descr) <= 16 else None
    except (KeyError, TypeError, ValueError, SyntaxError):
        dtype = None
    if dtype is None or dtype.kind not in ARRAY_KINDS or dtype.itemsize == 0 or dtype.shape != ():
        raise RejectedInput("bad_array", f"dtype {str(obj.get(b'type'))[:40]!r} not accepted")
    if not isinstance(data, bytes):
        raise RejectedInput("bad_array", "array data is not bytes")
    if obj[b"nd"] is not True:                  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise RejectedInput("bad_array", f"{len(data)} bytes for a {dtype} scalar")
        return np.frombuffer(data, dtype=dtype)[0]
    shape = obj.get(b"shape")
    if (not isinstance(shape, (list, tuple)) or len(shape) > 32
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise RejectedInput("bad_array", f"shape {str(shape)[:60]}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise RejectedInput("bad_array", f"shape {tuple(shape)} of {dtype} needs "
                                         f"{math.prod(shape) * dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)     # read-only, as msgpack-numpy's


class DocumentDecoder:
    """Turn one 0MQ message into ``(name, document)``, or raise RejectedInput.

    Limits, checked before anything is built: `max_message_bytes` (reason "message_too_large"),
    then for msgpack `max_objects` and `max_depth` (reason "too_complex", see
    `check_msgpack_structure`); msgpack's own limits keep every str, bin, array and map within
    the message's length. Arrays come from `decode_numpy`: plain numeric and string dtypes only.
    """

    def __init__(self, *, serializer: str = "msgpack", allow_pickle: bool = False,
                 prefix: bytes = b"", max_message_bytes: int = 256 * 2**20,
                 max_objects: int = 2**20, max_depth: int = 64):
        if serializer not in ("msgpack", "pickle"):
            raise ValueError(f"serializer must be 'msgpack' or 'pickle', got {serializer!r}")
        if serializer == "pickle" and not allow_pickle:
            raise ValueError("serializer 'pickle' needs allow_pickle: true (pickle runs code from the network)")
        for key, value in (("max_message_bytes", max_message_bytes), ("max_objects", max_objects),
                           ("max_depth", max_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        self.serializer = serializer
        self.allow_pickle = allow_pickle
        self.prefix = prefix
        self.max_message_bytes = max_message_bytes
        self.max_objects = max_objects
        self.max_depth = max_depth
        self._hook = functools.partial(decode_numpy, allow_pickle=allow_pickle)

    def decode(self, message) -> tuple[str, dict]:
        """`message`: bytes, or any buffer (a zmq.Frame received with ``copy=False``, a
        memoryview): the payload is read in place, so a frame's pixels are copied once, by
        msgpack, not by the socket and the framing split as well."""
        buf = message.buffer if hasattr(message, "buffer") else memoryview(message)
        if buf.nbytes > self.max_message_bytes:
            raise RejectedInput("message_too_large", f"{buf.nbytes} bytes > {self.max_message_bytes}")
        head = bytes(buf[:len(self.prefix) + MAX_NAME_BYTES + 2])     # 'prefix name ' without the payload
        first = head.find(b" ")
        second = head.find(b" ", first + 1) if first >= 0 else -1
        if second < 0:
            raise RejectedInput("bad_framing", "expected 'prefix name payload'")
        prefix, raw_name, payload = head[:first], head[first + 1:second], buf[second + 1:]
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

    def _deserialize(self, payload: memoryview) -> Any:
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
        check_msgpack_structure(payload, max_objects=self.max_objects, max_depth=self.max_depth)
        try:
            return msgpack.unpackb(payload, object_hook=self._hook, strict_map_key=False)
        except RejectedInput:
            raise
        except Exception as exc:
            raise RejectedInput("undecodable", f"msgpack: {type(exc).__name__}") from None


