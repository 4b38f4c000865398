"""Bounded columnar tables of result rows, and the paging of their rows.

A `RowTable` holds rows in arrival order. A row's *row index* is its position in that order since
the run started (0, 1, ...; never reused). Rows live in numpy chunks of ``chunk_rows`` rows, one
array per column; once more than ``max_rows`` rows are held, whole chunks of the oldest rows are
dropped and `base` (the row index of the oldest row held) moves on. So a table costs at most
``(max_rows + chunk_rows) x row size`` bytes however long the run (peak rows: 87 B each, text
columns stored as int32 codes into a vocabulary).

Reads (`RowTable.select`) copy out the rows they return; what they cost is the rows they look at,
counted in ``scanned``: a poll from a row index touches the chunks from that row on, a poll from a
seq_num only the chunks whose seq_num range reaches it. `paginate` orders, limits and sets the
cursors of the rows a poll gets (held rows, and rows read back from Tiled before them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXT = np.dtype(np.int32)           # storage of a text column: codes into the table's vocabulary


@dataclass(frozen=True)
class RowQuery:
    """The rows a poll asks for.

    since : row index (arrival order, provisional and final rows counted together) to start at.
    since_seq : lowest seq_num; rows come ordered by seq_num. At most one of since, since_seq.
    final : only final (True) or provisional (False) rows; None: both.
    limit : at most this many rows (in seq_num order: rounded up to the end of the last frame).
    """
    since: int | None = None
    since_seq: int | None = None
    final: bool | None = None
    limit: int | None = None

    def __post_init__(self):
        if self.since is not None and self.since_seq is not None:
            raise ValueError("give since (a row index) or since_seq (a seq_num), not both")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit!r}")

    @property
    def by_seq(self) -> bool:
        return self.since_seq is not None


@dataclass
class Selection:
    """Rows of one table: ``columns`` (name -> array, text decoded to str) and ``rows`` (their
    row indices, int64), in row order."""
    columns: dict[str, np.ndarray]
    rows: np.ndarray


@dataclass
class Page:
    """What a poll returns: ``columns`` and their row indices ``rows``, the cursors to poll on
    with (``next_since``: row index; ``next_seq``: seq_num, None when no row came and no
    since_seq was asked), and ``truncated``: the limit cut it."""
    columns: dict[str, np.ndarray]
    rows: np.ndarray
    next_since: int
    next_seq: int | None
    truncated: bool


class _Chunk:
    """``size`` preallocated rows of every column, ``fill`` of them written; the seq_num range
    and the count of final rows of those written."""
    __slots__ = ("cols", "fill", "n_final", "seq_max", "seq_min")

    def __init__(self, dtypes: dict[str, np.dtype], size: int):
        self.cols = {c: np.empty(size, t) for c, t in dtypes.items()}
        self.fill = 0
        self.seq_min = np.iinfo(np.int64).max
        self.seq_max = np.iinfo(np.int64).min
        self.n_final = 0


class RowTable:
    """Rows of one result table of one run, the newest ``max_rows`` (at least) held.

    dtypes : column -> numpy dtype (str: a text column); must include ``seq_num``. None: the
        columns come with the first rows (float, int, bool or text by their dtype), and later
        new names are added (earlier rows NaN / 0 / False / "").
    max_rows : rows held at least once reached (>= 1); older whole chunks are dropped.
    chunk_rows : rows per chunk (default max_rows / 16, within [16, 8192]).
    Not thread-safe: the caller locks (service.publish.state.RunStore).
    """

    def __init__(self, dtypes: dict | None, max_rows: int, chunk_rows: int | None = None):
        if not (isinstance(max_rows, int) and max_rows >= 1):
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.chunk_rows = chunk_rows or min(8192, max(16, max_rows // 16))
        self.dynamic = dtypes is None
        self.dtypes: dict[str, np.dtype] = {}
        self.vocab: dict[str, list[str]] = {}
        self._codes: dict[str, dict[str, int]] = {}
        self._chunks: list[_Chunk] = []
        self.base = 0                     # row index of the oldest row held
        self.n = 0                        # rows appended since the start
        self.evicted_max_seq: int | None = None    # greatest seq_num of the dropped rows
        self.scanned = 0                  # rows looked at by reads (their cost)
        for c, t in (dtypes or {}).items():
            self._add_column(c, np.dtype(t))

    # --- writing --------------------------------------------------------------------------

    @property
    def held(self) -> int:
        return self.n - self.base

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.dtypes)

    @property
    def nbytes(self) -> int:
        """Bytes of the chunks held (allocated, written or not)."""
        return sum(a.nbytes for ch in self._chunks for a in ch.cols.values())

    def _add_column(self, name: str, dtype: np.dtype) -> None:
        text = dtype.kind in "USO"
        self.dtypes[name] = TEXT if text else _storage(dtype)
        if text:
            self.vocab[name], self._codes[name] = [""], {"": 0}
        for ch in self._chunks:           # a column new to a dynamic table: earlier rows empty
            ch.cols[name] = np.full(self.chunk_rows, _empty(self.dtypes[name]), self.dtypes[name])

    def append(self, rows: dict) -> None:
        """Rows (name -> equal-length array-like; NaN stays NaN). Columns not given are empty."""
        m = len(rows["seq_num"])
        if m == 0:
            return
        if self.dynamic:
            for c, v in rows.items():
                if c not in self.dtypes:
                    self._add_column(c, np.asarray(v).dtype)
        elif set(rows) - set(self.dtypes):
            raise ValueError(f"unknown columns {sorted(set(rows) - set(self.dtypes))}")
        values = {c: self._encode(c, rows[c], m) if c in rows else np.full(m, _empty(t), t)
                  for c, t in self.dtypes.items()}
        done = 0
        while done < m:
            if not self._chunks or self._chunks[-1].fill == self.chunk_rows:
                self._chunks.append(_Chunk(self.dtypes, self.chunk_rows))
            ch = self._chunks[-1]
            k = min(m - done, self.chunk_rows - ch.fill)
            for c, v in values.items():
                ch.cols[c][ch.fill:ch.fill + k] = v[done:done + k]
            seq = values["seq_num"][done:done + k]
            ch.seq_min, ch.seq_max = min(ch.seq_min, int(seq.min())), max(ch.seq_max, int(seq.max()))
            if "final" in values:
                ch.n_final += int(np.count_nonzero(values["final"][done:done + k]))
            ch.fill += k
            done += k
        self.n += m
        while len(self._chunks) > 1 and self.held - self._chunks[0].fill >= self.max_rows:
            old = self._chunks.pop(0)
            self.base += old.fill
            self.evicted_max_seq = max(old.seq_max, self.evicted_max_seq if self.evicted_max_seq is not None
                                       else old.seq_max)

    def _encode(self, c: str, v, m: int) -> np.ndarray:
        v = np.asarray(v)
        if len(v) != m:
            raise ValueError(f"column {c!r} has {len(v)} rows, seq_num {m}")
        if self.dtypes[c] is not TEXT:
            return v.astype(self.dtypes[c], copy=False)
        uniq, inverse = np.unique(v.astype(str), return_inverse=True)
        codes = self._codes[c]
        for u in uniq.tolist():
            if u not in codes:
                codes[u] = len(self.vocab[c])
                self.vocab[c].append(u)
        return np.array([codes[u] for u in uniq.tolist()], TEXT)[inverse.reshape(-1)]

    # --- reading --------------------------------------------------------------------------

    def select(self, q: RowQuery, until: int | None = None) -> Selection:
        """The held rows ``q`` asks for below row index ``until`` (None: all), in row order; in
        row-index mode at most ``q.limit + 1`` of them (seq_num mode takes all: `paginate` limits)."""
        until = self.n if until is None else min(until, self.n)
        pieces: list[tuple[_Chunk, np.ndarray]] = []
        start = self.base if q.by_seq else max(self.base, q.since or 0)
        got = 0
        k = (start - self.base) // self.chunk_rows if self._chunks else 0
        first = self.base + k * self.chunk_rows       # row index of chunk k's first row (all but the last are full)
        for ch in self._chunks[k:]:
            if first >= until or (not q.by_seq and q.limit is not None and got > q.limit):
                break
            lo, hi = max(start - first, 0), min(ch.fill, until - first)
            first += ch.fill
            if hi <= lo or (q.by_seq and (ch.seq_max < q.since_seq or _no_kind(ch, q.final))):
                continue
            self.scanned += hi - lo
            keep = np.ones(hi - lo, bool)
            if q.by_seq:
                keep &= ch.cols["seq_num"][lo:hi] >= q.since_seq
            if q.final is not None:
                keep &= ch.cols["final"][lo:hi] == q.final
            idx = lo + np.flatnonzero(keep)
            if not q.by_seq and q.limit is not None:
                idx = idx[:q.limit + 1 - got]         # one more than the limit: paginate sees the cut
            got += len(idx)
            if len(idx):
                pieces.append((ch, idx, first - ch.fill))
        return self._gather(pieces)

    def _gather(self, pieces) -> Selection:
        rows = np.concatenate([f + idx for _, idx, f in pieces]) if pieces else np.zeros(0, np.int64)
        cols = {}
        for c, t in self.dtypes.items():
            v = np.concatenate([ch.cols[c][idx] for ch, idx, _ in pieces]) if pieces else np.zeros(0, t)
            cols[c] = np.asarray(self.vocab[c])[v] if t is TEXT else v
        return Selection(cols, rows.astype(np.int64))

    def frame(self, seq: int, newest: int = 4096) -> Selection:
        """The rows of frame ``seq`` among the newest ``newest`` rows held."""
        pieces, first = [], self.n
        for ch in reversed(self._chunks):
            first -= ch.fill
            if first + ch.fill <= self.n - newest:
                break
            if ch.seq_min <= seq <= ch.seq_max:
                self.scanned += ch.fill
                pieces.append((ch, np.flatnonzero(ch.cols["seq_num"][:ch.fill] == seq), first))
        return self._gather(pieces[::-1])


def paginate(parts: list[Selection], q: RowQuery, n: int) -> Page:
    """One page from ``parts`` (in row order, e.g. rows read back from Tiled, then held rows) of a
    table of ``n`` rows so far: ordered by seq_num (then row index) in seq_num mode, cut at
    ``q.limit``, with the cursors to go on from."""
    names = parts[0].columns.keys() if parts else ()
    cols = {c: np.concatenate([p.columns[c] for p in parts]) for c in names}
    rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
    if q.by_seq and len(rows):
        order = np.lexsort((rows, cols["seq_num"]))
        cols, rows = {c: v[order] for c, v in cols.items()}, rows[order]
    cut = len(rows)
    if q.limit is not None and cut > q.limit:
        cut = q.limit
        if q.by_seq:                      # whole frames: up to the last row of the limit-th row's frame
            cut = int(np.searchsorted(cols["seq_num"], cols["seq_num"][q.limit - 1], side="right"))
    truncated = cut < len(rows)
    cols, rows = {c: v[:cut] for c, v in cols.items()}, rows[:cut]
    seq = cols.get("seq_num", np.zeros(0, np.int64))
    next_since = int(rows[-1]) + 1 if truncated and not q.by_seq else n
    if len(seq):
        next_seq = int(seq[-1] if q.by_seq else seq.max()) + 1
    else:
        next_seq = q.since_seq
    return Page(cols, rows, next_since, next_seq, truncated)


def match(sel: Selection, q: RowQuery, until: int | None = None) -> Selection:
    """The rows of ``sel`` that ``q`` asks for (its filters, not its limit), below row ``until``."""
    keep = np.ones(len(sel.rows), bool)
    if until is not None:
        keep &= sel.rows < until
    if q.since is not None:
        keep &= sel.rows >= q.since
    if q.by_seq:
        keep &= sel.columns["seq_num"] >= q.since_seq
    if q.final is not None and "final" in sel.columns:
        keep &= sel.columns["final"] == q.final
    return Selection({c: v[keep] for c, v in sel.columns.items()}, sel.rows[keep])


def _no_kind(ch: _Chunk, final: bool | None) -> bool:
    """True when chunk ``ch`` has no row of the kind ``final`` asks for."""
    if final is None or "final" not in ch.cols:
        return False
    return ch.n_final == 0 if final else ch.n_final == ch.fill


def _storage(dtype: np.dtype) -> np.dtype:
    """How a numeric column is held: bool, int64 or float64."""
    return {"b": np.dtype(bool), "i": np.dtype(np.int64), "u": np.dtype(np.int64)}.get(dtype.kind, np.dtype(np.float64))


def _empty(dtype: np.dtype):
    """The value of a row that did not give a column."""
    return {"f": np.nan, "b": False}.get(dtype.kind, 0)
