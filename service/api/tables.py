"""The pages of a run's row tables (peaks, phases, inversion) that the results routes return.

A run held in memory serves its newest rows (`RunStore.select`); rows older than those it holds
come from Tiled's ``scatterflow/<uid>/<table>`` (whose rows are in the same arrival order), a run
only in Tiled from there alone. Rows neither holds are named in the page's ``missing``
(row indices and why), never left out silently. Bodies are written by orjson straight from the
numpy columns (NaN as null).
"""
from __future__ import annotations

import numpy as np
import orjson
from fastapi import HTTPException
from fastapi.responses import Response

from workers.columns import PEAK_DTYPES, PHASE_DTYPES, empty_columns

from ..publish.rowtable import Page, RowQuery, Selection, paginate
from .dependencies import ApiContext, RunRef

HAS_FINAL = {"peaks": True, "phases": True, "inversion": False}
EMPTY = {"peaks": PEAK_DTYPES, "phases": PHASE_DTYPES, "inversion": {}}


def table_page(ctx: ApiContext, ref: RunRef, key: str, q: RowQuery) -> tuple[Page, dict | None]:
    """The page of table ``key`` of run ``ref`` that ``q`` asks for, and what is missing from
    it (None: nothing) as {first_row, end_row, reason}."""
    if q.final is not None and not HAS_FINAL[key]:
        raise HTTPException(status_code=422, detail=f"{key} rows have no final flag: leave out final")
    if q.by_seq and q.final is None and HAS_FINAL[key]:
        raise HTTPException(status_code=422, detail="since_seq pages one kind of rows: give final=true or final=false")
    held = ctx.store.select(ref.uid, key, q) if ref.record is not None else None
    if held is None:                       # only in Tiled (or forgotten since the lookup)
        (parts, n), missing = _all_archived(ctx, ref.uid, key, q), None
    else:
        n, parts, missing = held.n, [held.selection], None
        lo = _not_held_from(held, q)
        if lo is not None:
            got, _, missing = _archived(ctx, ref.uid, key, q, lo, held.base)
            if got is not None:
                parts.insert(0, got)
    parts = [p for p in parts if len(p.rows)] or parts[:1]
    if not parts or not parts[0].columns:
        parts = [Selection(empty_columns(EMPTY[key]), np.zeros(0, np.int64))] if EMPTY[key] else parts
    page = paginate(parts, q, n)
    if missing is not None and not q.by_seq and missing["first_row"] >= page.next_since:
        missing = None                     # after this page: the next poll meets it
    return page, missing


def _not_held_from(held, q: RowQuery) -> int | None:
    """The first row index ``q`` may ask for that the store no longer holds (rows below
    ``held.base``); None when none."""
    if q.by_seq:
        dropped = held.evicted_max_seq
        return 0 if dropped is not None and dropped >= q.since_seq else None
    since = q.since or 0
    return since if since < held.base else None


def _all_archived(ctx: ApiContext, uid: str, key: str, q: RowQuery) -> tuple[list[Selection], int]:
    """([rows of Tiled's table for ``q``], rows Tiled has) of a run not in memory; 503 when Tiled
    does not answer."""
    from ..publish.archive_reader import ArchiveUnavailable

    if ctx.archive is None:
        return [], 0
    try:
        got = ctx.archive.select(uid, key, q)
    except ArchiveUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    return ([got[0]], got[1]) if got is not None else ([], 0)


def _archived(ctx: ApiContext, uid: str, key: str, q: RowQuery, lo: int, hi: int):
    """(rows of Tiled's table for ``q`` in rows [lo, hi) or None, rows Tiled has, missing or None)."""
    from ..publish.archive_reader import ArchiveUnavailable

    if ctx.archive is None:
        return None, 0, _missing(lo, hi, "no longer held in memory (the newest api.held_rows rows of each "
                                         "table are) and no Tiled archive is configured")
    try:
        got = ctx.archive.select(uid, key, q, until=hi)
    except ArchiveUnavailable as exc:
        return None, 0, _missing(lo, hi, f"no longer held in memory, and {exc}")
    if got is None:
        return None, 0, _missing(lo, hi, f"no longer held in memory, and Tiled has no table scatterflow/{uid}/{key}")
    sel, n = got
    if n < hi:
        return sel, n, _missing(max(lo, n), hi, f"no longer held in memory, and not (yet) in Tiled, which holds "
                                                f"{n} rows of scatterflow/{uid}/{key}")
    return sel, n, None


def _missing(lo: int, hi: int, reason: str) -> dict | None:
    return {"first_row": lo, "end_row": hi, "reason": reason} if hi > lo else None


def table_response(page: Page, missing: dict | None, **extra) -> Response:
    """The JSON body of a table page: columns, next_since, next_seq, missing and ``extra``."""
    columns = {c: v.tolist() if v.dtype.kind in "USO" else v for c, v in page.columns.items()}
    body = {"columns": columns, "next_since": page.next_since, "next_seq": page.next_seq, "missing": missing, **extra}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
