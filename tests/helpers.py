"""Test helpers: polls with a deadline that raise TimeoutError naming what did not happen, a
Tiled client that gives up at once, and a Tiled server in a process of its own."""
import contextlib
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest


class RecordingSink:
    """The router's sink (a dispatcher's part of ``service.ingest.Sink``) for ingest tests: records
    the runs started, the frames submitted and the stops (uid, stop document).
    ``takes_file_refs``: frames in files come as FrameRefs (as the Ray engine takes them)."""

    def __init__(self, takes_file_refs: bool = False):
        self.takes_file_refs = takes_file_refs
        self.started, self.frames, self.stops = [], [], []

    def start_run(self, uid, start):
        self.started.append(uid)

    def submit(self, frame):
        self.frames.append(frame)

    def stop_run(self, uid, stop):
        self.stops.append((uid, stop))

    @property
    def stopped(self) -> list[str]:
        return [uid for uid, _ in self.stops]


def wait_for(predicate, timeout: float, what: str):
    """The first truthy value of ``predicate()`` (exceptions count as not yet), polled every 0.1 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def wait_stopped(service, uid: str, timeout: float = 60):
    """The REST record of run ``uid`` of an in-process Service once it is no longer running."""
    return wait_for(lambda: (r := service.store.get(uid)) is not None and r.status != "running" and r,
                    timeout, f"run {uid[:8]} did not stop")


def stream_events(sub, source_uid: str | None, stream: str) -> list[dict]:
    """The events of ``stream`` that a results-stream subscriber ``sub`` (0MQ SUB, msgpack) holds,
    of the analysis run of source run ``source_uid`` (None: of any run), once it falls quiet."""
    import msgpack
    import msgpack_numpy
    docs = []
    while sub.poll(500):
        _, name, payload = sub.recv().split(b" ", 2)
        docs.append((name.decode(), msgpack.unpackb(payload, object_hook=msgpack_numpy.decode)))
    runs = {d["uid"] for n, d in docs if n == "start" and source_uid in (None, d.get("source_run_uid"))}
    descs = {d["uid"]: d["name"] for n, d in docs if n == "descriptor" and d["run_start"] in runs}
    return [d for n, d in docs if n == "event" and descs.get(d["descriptor"]) == stream]


def analysis_table(uri: str, api_key: str, source_uid: str, stream: str, rows: int, timeout: float = 30):
    """The ``stream`` table of the analysis BlueskyRun of source run ``source_uid`` in Tiled, once
    it holds ``rows`` rows, sorted by ``source_seq_num`` (a dict of numpy arrays by variable)."""
    from tiled.client import from_uri
    from tiled.queries import Key
    client = from_uri(uri, api_key=api_key)

    def read():
        (run,) = client.search(Key("start.source_run_uid") == source_uid).values()
        table = run[stream].read()
        return table if len(table["source_seq_num"]) == rows else None
    table = wait_for(read, timeout, f"no {stream} table of {rows} rows in Tiled for {source_uid[:8]}")
    order = np.argsort(np.asarray(table["source_seq_num"]))
    return {c: np.asarray(table[c])[order] for c in table.variables}


@contextlib.contextmanager
def one_tiled_attempt():
    """tiled's client retries a refused connection for up to 45 s before the writer sees it
    (then spools); one attempt within 2 s here, so that a few seconds of outage reach the spool."""
    import tiled.client.utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
        mp.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
        yield


class TiledProcess:
    """A real embedded Tiled server (`service.publish.tiled_server.EmbeddedTiled`) in a process
    of its own, for a server shared by several test modules: tiled allows one SimpleTiledServer
    per process at a time (its settings, the API key among them, are process-wide), and the
    modules that start their own in-process server must not clobber it. Same attributes as
    EmbeddedTiled: ``uri``, ``api_key``, ``port``, ``directory``; it starts in the background,
    and ``uri`` and ``port`` wait (up to ``timeout`` s) until it answers. It exits when `close`
    (or the end of this process) closes its stdin."""

    CODE = ("import os, sys\n"
            "from service.publish.tiled_server import EmbeddedTiled\n"
            "server = EmbeddedTiled(sys.argv[1], api_key=sys.argv[2])\n"
            "print(server.port, flush=True)\n"
            "os.dup2(2, 1)\n"                    # the rest of its output to the log: nobody reads the pipe
            "sys.stdin.read()\n"
            "server.close()\n")

    def __init__(self, directory, api_key: str, timeout: float = 120):
        self.directory, self.api_key, self.timeout = pathlib.Path(directory).resolve(), api_key, timeout
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.directory / "process.log", "w")
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.directory), api_key],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._line: list[str] = []
        self._reader = threading.Thread(target=lambda: self._line.append(self.process.stdout.readline()),
                                        daemon=True)
        self._reader.start()

    @property
    def port(self) -> int:
        self._reader.join(self.timeout)
        if not (self._line and self._line[0].strip().isdigit()):
            raise RuntimeError(f"Tiled server process did not start: see {self.directory / 'process.log'}")
        return int(self._line[0])

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(5)
        self._log.close()
