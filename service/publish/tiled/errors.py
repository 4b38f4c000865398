"""Write failures: which are worth retrying (connection trouble) and which are final."""
from __future__ import annotations

from ...errors import ScatterflowError


class TiledWriteError(ScatterflowError, RuntimeError):
    """A write Tiled refused for good (not a connection problem); logged, counted, dropped."""


class RowCountMismatch(TiledWriteError):
    """A table holds neither the rows before an append nor those after it.

    Seen when concurrent requests hit tiled's DuckDB storage (one shared connection,
    SimpleTiledServer): a read can fail or return another query's rows. Re-checked later
    (transient) up to ``layout.MAX_RECHECKS`` times, then the write is dropped."""


def is_transient(exc: BaseException) -> bool:
    """Connection problems and 5xx/429 are worth retrying; anything else is permanent."""
    import httpx

    if isinstance(exc, RowCountMismatch):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code == 429
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError, OSError))


def is_conflict(exc: BaseException) -> bool:
    """HTTP 409: the node exists already (e.g. a retried create had gone through)."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 409
