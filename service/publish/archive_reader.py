"""Runs read back from Tiled's ``scatterflow/<uid>`` containers (service/publish/tiled/layout.py)
for the REST API: runs no longer in memory (forgotten, or analysed before a restart), and the
rows of a live run older than those the run store holds.

Every request goes under `TILED_LOCK` (one request at a time from this process). A Tiled table is
read whole (Tiled 0.2.20 serves no row ranges), a column or a few at a time so that what is in
flight stays near ``GROUP_VALUES`` values, into a compact `RowTable`; tables are cached (least
recently used first out) up to ``cache_rows`` rows in all, those of a run still running in Tiled
for ``live_ttl_s`` only. Summaries of finished runs are cached too (small).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from workers.columns import PEAK_DTYPES, PHASE_DTYPES

from ..errors import ScatterflowError
from ..jsonsafe import jsonable
from .rowtable import RowQuery, RowTable
from .tiled.layout import ROOT_KEY
from .tiled_server import TILED_LOCK, connect

log = logging.getLogger(__name__)

GROUP_VALUES = 4_000_000        # values per read request at most (beyond one column): ~32 MB of float64
APPEND_ROWS = 65_536            # rows per append into the cache's RowTable
TABLE_DTYPES = {"peaks": PEAK_DTYPES, "phases": PHASE_DTYPES, "inversion": None}
INFO_KEYS = ("modality", "source_run", "detector", "catalog")
MAX_SUMMARIES = 1024
TILED_PAGE = 300                # items per search request at most (Tiled's page limit)


class ArchiveUnavailable(ScatterflowError):
    """Tiled did not answer a read (the message says why)."""


@dataclass
class ArchivedTable:
    """One table of one run as read from Tiled: its rows, whether the run had finished then,
    and when it was read (time.monotonic())."""
    table: RowTable
    finished: bool
    read_at: float


class ArchiveReader:
    """Reads of ``scatterflow/<uid>`` for the REST API.

    client_or_uri : a tiled root client, or the server's uri (connected on first use, with ``api_key``).
    cache_rows : rows of tables kept in memory after a read, in all (about 87 B per peak row);
        a larger table is read again for each request.
    live_ttl_s : how long the tables of a run still running in Tiled, and the list of run keys
        (for uid prefixes), are reused, s.
    """

    def __init__(self, client_or_uri, api_key: str | None = None, *, cache_rows: int = 1_000_000,
                 live_ttl_s: float = 5.0):
        if isinstance(client_or_uri, str):
            self.uri, self._client = client_or_uri, None
        else:
            self.uri, self._client = str(client_or_uri.uri), client_or_uri
        self._api_key = api_key
        self.cache_rows = cache_rows
        self.live_ttl_s = live_ttl_s
        self._tables: OrderedDict[tuple[str, str], ArchivedTable] = OrderedDict()
        self._summaries: OrderedDict[str, dict] = OrderedDict()
        self._keys: tuple[float, list[str]] | None = None   # (time.monotonic(), all run keys)
        self._cache_lock = threading.Lock()         # the caches (routes run on a thread pool)
        self.reads = 0                  # table reads from Tiled (not from the cache)

    # --- runs -----------------------------------------------------------------------------

    def has(self, uid: str) -> bool:
        """True if ``scatterflow/<uid>`` exists."""
        return self._call(lambda top: top is not None and uid in top)

    def keys(self, prefix: str = "") -> list[str]:
        """The run keys under ``scatterflow/`` that start with ``prefix``. The list of all keys is
        read (paging through them) at most once per ``live_ttl_s``: unknown uids cost no listing
        per request."""
        with self._cache_lock:
            listed = self._keys
        if listed is None or time.monotonic() - listed[0] >= self.live_ttl_s:
            listed = (time.monotonic(), self._call(lambda top: [] if top is None else list(top)))
            with self._cache_lock:
                self._keys = listed
        return [k for k in listed[1] if k.startswith(prefix)]

    def list(self, offset: int = 0, limit: int = 100) -> list[dict]:
        """Summaries (from metadata; counts None) of the runs under ``scatterflow/``, newest start first."""
        def page(top):
            out = []
            if top is None:
                return out
            view = top.sort(("start.time", -1)).items()
            for first in range(offset, offset + limit, TILED_PAGE):
                items = list(view[first:min(first + TILED_PAGE, offset + limit)])
                out += [_summary(k, dict(node.metadata)) for k, node in items]
                if len(items) < TILED_PAGE:
                    break
            return out
        return self._call(page)

    def summary(self, uid: str) -> dict | None:
        """The run's summary with counts from its tables (frames, peak rows, final frames), and
        its start document; None if not in Tiled. Cached once the run has finished."""
        with self._cache_lock:
            if uid in self._summaries:
                self._summaries.move_to_end(uid)
                return self._summaries[uid]

        def read(top):
            if top is None or uid not in top:
                return None
            node = top[uid]
            md, keys = dict(node.metadata), set(node)
            out = _summary(uid, md)
            out["frames_fitted"] = len(_column(node["frames"], "seq_num")) if "frames" in keys else 0
            if "peaks" in keys:
                cols = _read(node["peaks"], ["seq_num", "final"])
                out["peak_rows"] = len(cols["seq_num"])
                out["frames_final"] = len(np.unique(cols["seq_num"][cols["final"].astype(bool)]))
            else:
                out["peak_rows"] = out["frames_final"] = 0
            out["unit"] = (node["q"].metadata or {}).get("unit", "") if "q" in keys else ""
            return {**out, "start": jsonable(md.get("start") or {})}
        got = self._call(read)
        if got is not None and got["status"] != "running":
            with self._cache_lock:
                self._summaries[uid] = got
                while len(self._summaries) > MAX_SUMMARIES:
                    self._summaries.popitem(last=False)
        return got

    def transitions(self, uid: str) -> list[dict]:
        """The run's confirmed phase transitions (table ``phase_transitions``), time order."""
        def read(top):
            node = top[uid]
            if "phase_transitions" not in node:
                return []
            df = node["phase_transitions"].read()
            return jsonable(df.to_dict("records"))
        return self._call(read)

    # --- tables ---------------------------------------------------------------------------

    def table(self, uid: str, key: str, need: int | None = None) -> ArchivedTable | None:
        """Table ``key`` (peaks, phases, inversion) of run ``uid``; None if it has none. A cached
        copy serves when its run had finished, when it holds row ``need - 1``, or when it is
        younger than ``live_ttl_s``."""
        with self._cache_lock:
            e = self._tables.get((uid, key))
            if e is not None and (e.finished or (need is not None and e.table.n >= need)
                                  or time.monotonic() - e.read_at < self.live_ttl_s):
                self._tables.move_to_end((uid, key))
                return e
        e = self._call(lambda top: self._read_table(top, uid, key))
        if e is None:
            return None
        if e.table.n <= self.cache_rows:
            with self._cache_lock:
                self._tables.pop((uid, key), None)
                self._tables[(uid, key)] = e
                while sum(t.table.n for t in self._tables.values()) > self.cache_rows:
                    self._tables.popitem(last=False)
        else:
            log.info("table %s of run %s has %d rows, more than api.archive_cache_rows: read again per request",
                     key, uid[:8], e.table.n)
        return e

    def _read_table(self, top, uid: str, key: str) -> ArchivedTable | None:
        if top is None or uid not in top:
            return None
        run = top[uid]
        if key not in run:
            return None
        node = run[key]
        names = list(node.structure().columns)
        self.reads += 1
        first = [c for c in ("seq_num", "final") if c in names]
        cols = _read(node, first)
        n = len(cols["seq_num"])
        rest = [c for c in names if c not in first]
        group = max(1, GROUP_VALUES // max(n, 1))
        for i in range(0, len(rest), group):
            cols.update(_read(node, rest[i:i + group]))
        table = RowTable(TABLE_DTYPES.get(key), max(n, 1), chunk_rows=max(16, min(n, APPEND_ROWS)))
        for i in range(0, n, APPEND_ROWS):
            table.append({c: v[i:i + APPEND_ROWS] for c, v in cols.items()})
        return ArchivedTable(table, dict(run.metadata).get("status") != "running", time.monotonic())

    def select(self, uid: str, key: str, q: RowQuery, until: int | None = None):
        """(Selection, rows in the archive) of table ``key`` of run ``uid`` for ``q`` below row
        ``until``; None when the run has no such table."""
        e = self.table(uid, key, need=until)
        if e is None:
            return None
        return e.table.select(q, until), e.table.n

    # --- plumbing -------------------------------------------------------------------------

    def _call(self, fn):
        """``fn(top)`` with the ``scatterflow`` container (None if absent), one request at a
        time; Tiled's failures as ArchiveUnavailable."""
        with TILED_LOCK:
            try:
                if self._client is None:
                    self._client = connect(self.uri, self._api_key)
                top = self._client.get(ROOT_KEY)
                return fn(top)
            except (KeyError, ArchiveUnavailable):
                raise
            except Exception as exc:
                raise ArchiveUnavailable(f"Tiled at {self.uri} did not answer: {exc}") from exc


def _read(node, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of a Tiled table as numpy arrays (text as str); an empty table (no partition yet)
    gives empty columns."""
    df = node.read(columns=columns)
    out = {}
    for c in columns:
        s = df.get(c, [])
        kind = getattr(getattr(s, "dtype", None), "kind", "O")
        out[c] = np.asarray(s, dtype=str) if kind in "OUS" else np.asarray(s)
    return out


def _column(node, name: str) -> np.ndarray:
    return _read(node, [name])[name]


def _summary(uid: str, md: dict) -> dict:
    """A run's summary from its container's metadata; counts None (not read)."""
    start = md.get("start") or {}
    return {"uid": uid, "status": md.get("status") or "unknown", "reason": md.get("reason") or "",
            "plan_name": start.get("plan_name"), "scan_id": start.get("scan_id"),
            "created": start.get("time"), "stopped": None, "frames_received": None, "frames_fitted": None,
            "frames_final": None, "frames_failed": None, "reseeds": None, "peak_rows": None,
            "peak_rows_held": 0, "source": "catalog", "unit": None,
            **{k: md[k] for k in INFO_KEYS if md.get(k) is not None}}
