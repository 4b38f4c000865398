"""Ops waiting on disk while Tiled is unreachable, replayed in order once it answers.

One file per op, ``<n>-<kind>.parquet`` (table ops; the op header in the schema metadata) or
``<n>-<kind>.npz`` (the header in ``__op__``), ``n`` a 9-digit counter giving the order; files
are written to ``*.tmp`` and renamed, so a crash leaves no half file under a spool name.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from .ops import Op

_MERGEABLE = ("profiles", "table")


def save_op(op: Op, path_stem: pathlib.Path) -> pathlib.Path:
    """Write an op atomically as ``<stem>.parquet`` (tables) or ``<stem>.npz``."""
    header = json.dumps({"kind": op.kind, "uid": op.uid, "meta": op.meta})
    if op.kind == "table":
        import pyarrow.parquet as pq

        final = path_stem.with_suffix(".parquet")
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(op.table.replace_schema_metadata({"scatterflow_op": header}), tmp)
    else:
        final = path_stem.with_suffix(".npz")
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, __op__=np.array(header), **op.arrays)
    os.replace(tmp, final)
    return final


def load_op(path: pathlib.Path) -> Op:
    """The op a `save_op` file holds."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        header = json.loads(table.schema.metadata[b"scatterflow_op"])
        return Op(header["kind"], header["uid"], header["meta"],
                  table=table.replace_schema_metadata(None))
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["__op__"]))
        arrays = {k: z[k] for k in z.files if k != "__op__"}
    return Op(header["kind"], header["uid"], header["meta"], arrays=arrays)


def merge(a: Op, b: Op) -> Op | None:
    """One op writing what `a` then `b` write, when `b` continues `a` (same run, kind and
    table, `b` at the offset where `a` ends); None otherwise."""
    if a.kind != b.kind or a.uid != b.uid or a.kind not in _MERGEABLE:
        return None
    if a.kind == "table":
        if (a.meta["key"] != b.meta["key"] or b.meta["offset"] != a.meta["offset"] + a.table.num_rows
                or not a.table.schema.equals(b.table.schema)):
            return None
        return Op("table", a.uid, dict(a.meta), table=pa.concat_tables([a.table, b.table]))
    if (set(a.arrays) != set(b.arrays) or b.meta != {**a.meta, "offset": b.meta["offset"]}
            or b.meta["offset"] != a.meta["offset"] + len(a.arrays["seq_num"])
            or not np.array_equal(a.arrays["q"], b.arrays["q"])):
        return None
    arrays = {k: v if k == "q" else np.concatenate([v, b.arrays[k]]) for k, v in a.arrays.items()}
    return Op("profiles", a.uid, dict(a.meta), arrays=arrays)


def coalesce(items: list[tuple[pathlib.Path, Op]]) -> list[tuple[Op, list[pathlib.Path]]]:
    """Spooled ops (in spool order) as fewer ops, each with the files it replaces: writes that
    continue an earlier one to the same array or table are merged into it. Order is kept per
    array or table; any other op (start, stop, snapshots, ...) is a barrier: what came before
    it is written before it. Replaying a merged op stays idempotent (positions are explicit)."""
    out: list[tuple[Op, list[pathlib.Path]]] = []
    open_groups: dict[tuple, int] = {}          # (uid, kind, table key) -> index in out
    for path, op in items:
        if op.kind not in _MERGEABLE:
            open_groups.clear()
            out.append((op, [path]))
            continue
        target = (op.uid, op.kind, op.meta.get("key"))
        i = open_groups.get(target)
        merged = merge(out[i][0], op) if i is not None else None
        if merged is not None:
            out[i] = (merged, out[i][1] + [path])
        else:
            open_groups[target] = len(out)
            out.append((op, [path]))
    return out


def _index(path: pathlib.Path) -> int:
    return int(path.name.split("-", 1)[0])


class Spool:
    """The spool directory: ``pending`` files, numbered after those an earlier process left
    (which are drained first). ``directory`` None: a fresh temporary directory."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = pathlib.Path(directory or tempfile.mkdtemp(prefix="scatterflow-spool-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.files()
        self._counter = itertools.count(1 + max((_index(p) for p in existing), default=-1))
        self.pending = len(existing)

    def files(self) -> list[pathlib.Path]:
        """Spooled writes in order (``*.tmp`` leftovers of an interrupted write skipped)."""
        files = [p for p in self.directory.iterdir()
                 if p.suffix in (".npz", ".parquet") and p.name.split("-", 1)[0].isdigit()]
        return sorted(files, key=_index)

    def add(self, op: Op) -> None:
        """Append ``op`` after everything spooled so far."""
        save_op(op, self.directory / f"{next(self._counter):09d}-{op.kind}")
        self.pending += 1

    def replay(self, max_files: int, everything: bool) -> Iterator[tuple[Op, list[pathlib.Path]]]:
        """Spooled ops in drain order, coalesced, each with the files it replaces: from the
        first ``max_files`` files, or from all of them (``max_files`` at a time) if
        ``everything``. Call `remove` on a group's files once its op is in Tiled."""
        files = self.files()
        for first in range(0, len(files), max_files):
            if first and not everything:
                return
            yield from coalesce([(path, load_op(path)) for path in files[first:first + max_files]])

    def remove(self, paths: list[pathlib.Path]) -> None:
        for path in paths:
            path.unlink()
            self.pending -= 1
