"""One Tiled write (an op), carrying its own position so that repeating it is safe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

# start: create the run container (and its frames/peaks/change_points tables); profiles,
# snapshots, stack: arrays patched at a row offset plus their frame rows; table: rows appended
# at a row offset; stop: final status metadata; recover: mark an earlier process's runs
# interrupted (health.py).
OpKind = Literal["start", "profiles", "snapshots", "stack", "table", "stop", "recover"]


@dataclass
class Op:
    """One write. ``meta`` is JSON-able (offsets, table key, metadata) and goes into the spool
    file's header as it is; ``arrays`` hold numpy data (profiles, snapshots, stack); ``table``
    the rows of a table op."""
    kind: OpKind
    uid: str
    meta: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    table: pa.Table | None = None
