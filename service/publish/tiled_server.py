"""Embedded Tiled server for the demo and tests, and a client helper.

`EmbeddedTiled` wraps `tiled.server.SimpleTiledServer` (tiled >= 0.2.20): uvicorn on a
localhost port in a background thread, persisting under ``directory``:

- ``catalog.db``      SQLite catalog (metadata, structure)
- ``data/``           writable file storage (arrays as zarr)
- ``storage.duckdb``  SQL storage behind appendable tables
- ``access.log``, ``error.log``  server logs

Appendable tables (`create_appendable_table` + `append_partition`) and array
``patch(..., extend=True)`` both work on it (verified by tests/test_tiled_writer.py).
Tiled allows only one SimpleTiledServer per Python process at a time.
"""

from __future__ import annotations

import logging
import pathlib
import secrets
import threading

log = logging.getLogger(__name__)

#: One request at a time from this process to Tiled, for every writer and reader of the service
#: (the archive's writer thread, the BlueskyRun writer, `scatterflow reprocess`'s reads): Tiled
#: 0.2.20's DuckDB storage (the embedded server, `tiled serve catalog --temp`) fails under
#: concurrent requests on its tables ("No active transaction, cannot rollback", "closed pending
#: query result", then timeouts). Tiled on PostgreSQL storage does not need it.
TILED_LOCK = threading.RLock()


class EmbeddedTiled:
    """A Tiled server on 127.0.0.1 persisting under ``directory``.

    Parameters
    ----------
    directory : path; created if missing. Reusing a directory reopens its catalog.
    api_key : single-user API key; a 64-hex-digit `secrets.token_hex(32)` if None.
    port : TCP port, 0 for a free one chosen by the OS. Pass the old port to restart a
        server on the same directory at the same address (clients keep working).
    readable_storage : directories (a path or a list of them) whose files Tiled may serve
        as external data, e.g. the HDF5 files detectors write, registered by bluesky's
        TiledWriter from stream_resource documents; none by default (Tiled refuses them).

    Attributes: ``uri`` (``http://127.0.0.1:PORT/api/v1``, no key in it), ``api_key``,
    ``port``, ``directory``, ``readable_storage`` (resolved paths). Use as a context manager
    or call `close`.
    """

    def __init__(self, directory, *, api_key: str | None = None, port: int = 0, readable_storage=None):
        from tiled.server import SimpleTiledServer

        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.isalnum()):
            raise ValueError("tiled.api_key must be a non-empty string of letters and digits (Tiled refuses others)")
        self.directory = pathlib.Path(directory).resolve()
        self.api_key = api_key or secrets.token_hex(32)
        if isinstance(readable_storage, (str, pathlib.Path)):
            readable_storage = [readable_storage]
        self.readable_storage = [pathlib.Path(p).resolve() for p in readable_storage or []]
        self._server = SimpleTiledServer(
            directory=self.directory, api_key=self.api_key, port=port,
            readable_storage=self.readable_storage or None,
        )
        self.port: int = self._server.port
        self.uri = f"http://127.0.0.1:{self.port}/api/v1"
        self._closed = False
        log.info("embedded Tiled at %s, storage %s", self.uri, self.directory)

    def client(self):
        """A fresh tiled client for this server (see `connect`)."""
        return connect(self.uri, self.api_key)

    def close(self) -> None:
        """Stop the server thread; the data stay in ``directory``. Idempotent."""
        if not self._closed:
            self._closed = True
            self._server.close()

    def __enter__(self) -> "EmbeddedTiled":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EmbeddedTiled {self.uri} dir={str(self.directory)!r}>"


def connect(uri: str, api_key: str | None = None):
    """Connect to a Tiled server (embedded or external) and return its root client.

    ``uri`` like ``http://host:8000/api/v1`` (or a node below it); ``api_key`` may be
    None when the server is public or the key is in the uri. Uses tiled's own retries
    (env ``TILED_RETRY_ATTEMPTS``, ``TILED_RETRY_TIMEOUT``), no progress bars.
    """
    from tiled.client import from_uri

    if not isinstance(uri, str) or "://" not in uri:
        raise ValueError(f"uri must be an http(s) URL string, got {uri!r}")
    return from_uri(uri, api_key=api_key, show_progress=False)
