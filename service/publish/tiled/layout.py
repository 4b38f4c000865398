"""The writers of the ``scatterflow/<uid>`` layout: one op creates, patches or appends nodes.

Every op carries its position, so a repeated op (a retry, a spool replay) neither loses nor
duplicates: array patches at an offset overwrite; with ``check``, a table append first reads
the table's ``seq_num`` column and appends only the rows not there yet.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from workers.columns import PEAK_COLUMNS, PEAK_DTYPES

from .errors import RowCountMismatch, TiledWriteError, is_conflict
from .ops import Op
from .stats import WriterStats

log = logging.getLogger(__name__)

ROOT_KEY = "scatterflow"
PEAK_SCHEMA = pa.schema([(c, pa.from_numpy_dtype(PEAK_DTYPES[c])) for c in PEAK_COLUMNS])
FRAME_SCHEMA = pa.schema([("seq_num", pa.int64()), ("time", pa.float64())])
SNAPSHOT_SCHEMA = FRAME_SCHEMA          # snapshot_frames: one row per snapshot
ARRAY_KEYS = ("q", "profiles", "sigma", "snapshots")                  # written by the layout
TABLE_KEYS = ("peaks", "change_points", "frames", "snapshot_frames")  # itself; taken for others
MAX_RECHECKS = 5        # row-count mismatches of one append before it is dropped


def rows_to_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """PeakRows (dict of equal-length arrays keyed by PEAK_COLUMNS) -> pyarrow Table."""
    missing = set(PEAK_COLUMNS) - set(rows)
    extra = set(rows) - set(PEAK_COLUMNS)
    if missing or extra:
        raise ValueError(f"peak rows need exactly PEAK_COLUMNS; missing {sorted(missing)}, "
                         f"unexpected {sorted(extra)}")
    lengths = {c: len(rows[c]) for c in PEAK_COLUMNS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"peak row columns have different lengths: {lengths}")
    arrays = [pa.array([str(v) for v in rows[f.name]] if pa.types.is_string(f.type)
                       else np.asarray(rows[f.name]).astype(PEAK_DTYPES[f.name]), type=f.type)
              for f in PEAK_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=PEAK_SCHEMA)


class TiledLayout:
    """Ops written into Tiled: a client (or a uri connected on first use, with ``api_key``)
    and a cache of the nodes of each run; requests and rows counted in ``stats``. One thread."""

    def __init__(self, client_or_uri, api_key: str | None, stats: WriterStats):
        if isinstance(client_or_uri, str):
            self.uri, self.client = client_or_uri, None
        else:
            self.uri, self.client = str(client_or_uri.uri), client_or_uri
        self._api_key = api_key
        self.stats = stats
        self._nodes: dict[str, dict] = {}             # uid -> {"run": node, key: child node}
        self._rechecks: dict[tuple, int] = {}         # row-count mismatches per append

    def root(self):
        """The root node, connecting on first use."""
        if self.client is None:
            from ..tiled_server import connect

            self.stats.requests += 1
            self.client = connect(self.uri, self._api_key)
        return self.client

    def forget(self, uid: str) -> None:
        """Drop the cached nodes of run ``uid`` (after a failure they may be stale)."""
        self._nodes.pop(uid, None)

    def execute(self, op: Op, check: bool) -> None:
        """One op; ``check``: it may have been (partly) applied before, stay idempotent."""
        log.debug("execute %s %s %s check=%s", op.kind, op.uid, op.meta.get("offset"), check)
        if op.kind == "start":
            self._start(op)
        elif op.kind == "profiles":
            self._profiles(op, check)
        elif op.kind == "stack":
            self._stack(op, check)
        elif op.kind == "snapshots":
            self._snapshots(op, check)
        elif op.kind == "table":
            if op.meta.get("create"):
                self._ensure_table(op.uid, op.meta["key"], op.table.schema)
            self._append(op.uid, op.meta["key"], op.meta["offset"], op.table, check)
            if op.meta["key"] == "peaks":
                self.stats.rows_written += op.table.num_rows
        elif op.kind == "stop":
            self.stats.requests += 1
            self._run_node(op.uid)["run"].update_metadata(metadata=op.meta["metadata"])
            self.forget(op.uid)
        else:
            raise TiledWriteError(f"unknown op kind {op.kind!r}")

    # --- nodes ------------------------------------------------------------------------

    def _run_node(self, uid: str) -> dict:
        nodes = self._nodes.get(uid)
        if nodes is None:
            self.stats.requests += 2
            nodes = self._nodes[uid] = {"run": self.root()[ROOT_KEY][uid]}
        return nodes

    def _child(self, uid: str, key: str):
        nodes = self._run_node(uid)
        if key not in nodes:
            self.stats.requests += 1
            nodes[key] = nodes["run"][key]
        return nodes[key]

    def _create(self, make, fetch):
        """``make()``; on 409 (exists, e.g. a retried request had succeeded) ``fetch()``.
        Returns (node, created)."""
        self.stats.requests += 1
        try:
            return make(), True
        except Exception as exc:
            if not is_conflict(exc):
                raise
            self.stats.requests += 1
            return fetch(), False

    def _ensure_table(self, uid: str, key: str, schema: pa.Schema) -> None:
        """The appendable table ``key`` of run ``uid``, created with ``schema`` if missing."""
        nodes = self._run_node(uid)
        if key not in nodes:
            nodes[key], _ = self._create(lambda: nodes["run"].create_appendable_table(schema, key=key),
                                         lambda: nodes["run"][key])

    def _array_once(self, uid: str, key: str, data: np.ndarray, metadata: dict | None = None) -> None:
        """Array ``key`` written whole (a 409: an earlier attempt wrote it; kept)."""
        nodes = self._run_node(uid)
        run = nodes["run"]
        nodes[key], _ = self._create(lambda: run.write_array(data, key=key, metadata=metadata),
                                     lambda: run[key])

    def _array_at(self, uid: str, key: str, data: np.ndarray, offset: int, metadata: dict | None) -> None:
        """Rows ``data`` of array ``key`` at row ``offset``: created at offset 0 (patched if it
        exists: a retried create), else patched with extend (a patch overwrites: repeatable)."""
        nodes = self._run_node(uid)
        if offset == 0:
            run = nodes["run"]
            node, new = self._create(lambda: run.write_array(data, key=key, metadata=metadata),
                                     lambda: run[key])
            nodes[key] = node
            if new:
                return
        else:
            node = self._child(uid, key)
        self.stats.requests += 1
        node.patch(data, offset=offset, extend=True)

    # --- the op kinds -----------------------------------------------------------------

    def _start(self, op: Op) -> None:
        """The containers ``scatterflow`` and ``scatterflow/<uid>`` (its metadata updated if it
        exists) and the tables frames, peaks, change_points."""
        root = self.root()
        metadata = op.meta["metadata"]
        self._create(lambda: root.create_container(ROOT_KEY), lambda: None)
        # tiled 0.2.20: the client that create_container returns at the root addresses its
        # children as '//scatterflow/<uid>', which the server files where a fresh client does
        # not find them; fetch the container by key instead.
        self.stats.requests += 1
        top = root[ROOT_KEY]
        run, new = self._create(lambda: top.create_container(op.uid, metadata=metadata),
                                lambda: top[op.uid])
        if not new:
            self.stats.requests += 1
            run.update_metadata(metadata=metadata)
        self._nodes[op.uid] = {"run": run}
        for key, schema in (("frames", FRAME_SCHEMA), ("peaks", PEAK_SCHEMA),
                            ("change_points", PEAK_SCHEMA)):
            self._ensure_table(op.uid, key, schema)

    def _profiles(self, op: Op, check: bool) -> None:
        """Profiles at their frame offset: arrays ``profiles``, ``sigma`` (and ``q`` with the
        first), then their rows in ``frames``."""
        a, offset, unit = op.arrays, int(op.meta["offset"]), op.meta["unit"]
        for key, data, what in (("profiles", a["intensity"], "mean intensity per bin"),
                                ("sigma", a["sigma"], "standard error of the mean intensity")):
            meta = {"unit": unit, "dims": ["frame", "radial"], "description": what}
            self._array_at(op.uid, key, data, offset, meta)
        if offset == 0:
            self._array_once(op.uid, "q", a["q"], {"unit": unit})
        frames = pa.table({"seq_num": a["seq_num"], "time": a["time"]}, schema=FRAME_SCHEMA)
        self._append(op.uid, "frames", offset, frames, check)
        self.stats.frames_written += len(a["seq_num"])

    def _snapshots(self, op: Op, check: bool) -> None:
        """Snapshots at their offset: array ``snapshots`` (k, h, w), then their rows in
        ``snapshot_frames`` (created with the first)."""
        a, offset = op.arrays, int(op.meta["offset"])
        meta = {"dims": ["snapshot", "row", "col"],
                "description": "corrected 2D frames (raw - dark) / (flat * solid angle * "
                               "polarization), block-averaged; NaN = masked; frames in "
                               "snapshot_frames"}
        self._array_at(op.uid, "snapshots", a["images"], offset, meta)
        if offset == 0:
            self._ensure_table(op.uid, "snapshot_frames", SNAPSHOT_SCHEMA)
        rows = pa.table({"seq_num": a["seq_num"], "time": a["time"]}, schema=SNAPSHOT_SCHEMA)
        self._append(op.uid, "snapshot_frames", offset, rows, check)
        self.stats.snapshots_written += len(a["seq_num"])

    def _stack(self, op: Op, check: bool) -> None:
        """add_stack rows at their offset: arrays ``d_<key>`` (with the axes ``a_<key>`` and
        the table ``<name>_frames`` created with the first rows), then their rows in
        ``<name>_frames``."""
        a, offset, name = op.arrays, int(op.meta["offset"]), op.meta["name"]
        for key, data in ((k[2:], v) for k, v in a.items() if k.startswith("d_")):
            self._array_at(op.uid, key, data, offset, op.meta["metadata"])
        frames_key = f"{name}_frames"
        if offset == 0:
            for key, axis in ((k[2:], v) for k, v in a.items() if k.startswith("a_")):
                self._array_once(op.uid, key, axis)
            self._ensure_table(op.uid, frames_key, FRAME_SCHEMA)
        rows = pa.table({"seq_num": a["seq_num"], "time": a["time"]}, schema=FRAME_SCHEMA)
        self._append(op.uid, frames_key, offset, rows, check)

    def _append(self, uid: str, key: str, offset: int, table: pa.Table, check: bool) -> None:
        """Rows ``table`` into table ``key`` at row ``offset``; with ``check``, only the rows
        not there yet (all of them may be: an earlier attempt got through; or the first ones:
        a merged replay after a crash, spool.coalesce)."""
        node = self._child(uid, key)
        where = (uid, key, offset)
        if check:
            self.stats.requests += 1
            held = node.read(columns=["seq_num"])["seq_num"].to_numpy()
            n = len(held)
            there = min(max(n - offset, 0), table.num_rows)
            if n >= offset and np.array_equal(held[offset:offset + there], table["seq_num"].to_numpy()[:there]):
                if there == table.num_rows:
                    return
                table, offset = table.slice(there), offset + there
            else:
                self._rechecks[where] = tries = self._rechecks.get(where, 0) + 1
                msg = (f"{key} of run {uid} has {n} rows, expected {offset} before "
                       f"appending {table.num_rows} (check {tries}/{MAX_RECHECKS})")
                if tries < MAX_RECHECKS:
                    raise RowCountMismatch(msg)
                raise TiledWriteError(msg)
        self.stats.requests += 1
        node.append_partition(0, table)
        self._rechecks.pop(where, None)
