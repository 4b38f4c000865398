"""Follow the live fit results of a run, for plans that steer an experiment (adaptive feedback).

Two clients with one interface, both keyed by the *source* run uid (the uid a bluesky plan
gets from ``yield from bps.open_run()``):

* `ResultsFollower` subscribes to the service's results stream (`service.publish.results`:
  one analysis run of Bluesky documents per source run, 0MQ PUB, msgpack; final fits in stream
  ``primary``, provisional ones in ``provisional``) with a plain pyzmq SUB socket on a
  dedicated thread. Events do not name the source run: the follower maps event -> descriptor
  (``descriptor``) -> analysis start (``run_start``) -> ``source_run_uid``.
* `RestFollower` polls ``GET /api/v1/runs/{uid}/peaks?since=N`` (incremental, columnar JSON)
  and ``GET /api/v1/runs/{uid}`` (status) on a thread, for clients behind a firewall that
  lets HTTP through but not 0MQ.

Per source run both keep the latest provisional and final value of every peak parameter with
its standard error (``center``, ``fwhm`` in 1/nm; ``amplitude`` = ``area``, the integrated
intensity; ``chi2``, the reduced chi^2 of the frame's whole-profile fit, the same for every
peak of a frame, error NaN), a bounded history, the seq_nums flagged as
change points, and the analysis status ("unseen", "running", "complete", "abort", "fail").
"Latest" means the highest source ``seq_num`` seen, not the last message received.

0MQ PUB/SUB loses silently: a subscriber that connects late misses the first documents (slow
joiner), and one that falls behind past the high-water mark loses messages. So:
`ResultsFollower.wait_connected` waits for the 0MQ handshake (create the follower before the
run); gaps in the analysis events' ``seq_num`` are counted (``stats["lost"]``); events whose
start/descriptor were missed are counted (``stats["orphans"]``) and, when ``rest_url`` is
given, a run queried for ``rest_grace`` s without its start on the stream is followed over
REST instead (the REST API keeps every row of the run).
"""
from __future__ import annotations

import collections
import logging
import math
import pickle
import threading
import time
from typing import Callable, Literal, NamedTuple

from ..publish.results import stream_field

log = logging.getLogger(__name__)

PARAMS = ("center", "fwhm", "amplitude", "chi2")
_ALIASES = {"area": "amplitude"}
_ERR = {"center": "center_err", "fwhm": "fwhm_err", "amplitude": "amplitude_err", "chi2": None}
TERMINAL = ("complete", "abort", "fail")
_PEAK_STREAMS = {"primary": True, "provisional": False}     # stream -> its fits are final


class FitValue(NamedTuple):
    """One fitted value: source frame ``seq_num``, ``value`` and its standard error ``err``
    (NaN when none)."""

    seq_num: int
    value: float
    err: float


def canonical_param(param: str) -> str:
    """``center`` | ``fwhm`` | ``amplitude`` (alias ``area``) | ``chi2``; ValueError otherwise."""
    p = _ALIASES.get(param, param)
    if p not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS + tuple(_ALIASES)}, got {param!r}")
    return p


class RunResults:
    """What is known of one source run's analysis. Read it inside `wait_for` predicates or
    via the follower's methods (which lock); do not keep references across calls."""

    def __init__(self, source_uid: str, history: int):
        self.source_uid = source_uid
        self.analysis_uid: str | None = None
        self.status = "unseen"
        self.peaks: tuple[str, ...] = ()
        self._latest: dict[tuple[str, str, bool], FitValue] = {}
        self._history: dict[tuple[str, str, bool], collections.deque] = {}
        self._maxlen = history
        self.change_points: set[int] = set()
        self.last_seq = {False: 0, True: 0}
        self.events = 0

    def latest(self, peak: str, param: str, final: bool = False) -> FitValue | None:
        return self._latest.get((peak, canonical_param(param), bool(final)))

    def history(self, peak: str, param: str, final: bool = False) -> list[FitValue]:
        """Values in seq_num order, one per frame (bounded: the newest ``history`` kept)."""
        return list(self._history.get((peak, canonical_param(param), bool(final)), ()))

    def add(self, peak: str, param: str, final: bool, fv: FitValue) -> None:
        key = (peak, param, final)
        old = self._latest.get(key)
        if old is None or fv.seq_num >= old.seq_num:
            self._latest[key] = fv
        h = self._history.get(key)
        if h is None:
            h = self._history[key] = collections.deque(maxlen=self._maxlen)
        if not h or fv.seq_num > h[-1].seq_num:    # one value per frame, also with two feeds
            h.append(fv)

    def add_frame(self, seq: int, final: bool, change_point: bool) -> None:
        self.events += 1
        self.last_seq[final] = max(self.last_seq[final], seq)
        if change_point:
            self.change_points.add(seq)


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class _Follower:
    """Shared state and query methods; subclasses feed `_runs` under `_cond`."""

    def __init__(self, *, history: int = 1000, max_runs: int = 100, _owner: "_Follower | None" = None):
        if not (isinstance(history, int) and history >= 1):
            raise ValueError(f"history must be an int >= 1, got {history!r}")
        if not (isinstance(max_runs, int) and max_runs >= 1):
            raise ValueError(f"max_runs must be an int >= 1, got {max_runs!r}")
        self.history_len = history
        self.max_runs = max_runs
        self._owner = _owner                      # share its state (the REST fallback)
        self._cond = threading.Condition() if _owner is None else _owner._cond
        self._runs: collections.OrderedDict[str, RunResults] = (
            collections.OrderedDict() if _owner is None else _owner._runs)
        self._closed = False

    # -- state (call with _cond held)
    def _run(self, uid: str) -> RunResults:
        if self._owner is not None:
            return self._owner._run(uid)
        run = self._runs.get(uid)
        if run is None:
            run = self._runs[uid] = RunResults(uid, self.history_len)
            while len(self._runs) > self.max_runs:          # forget the oldest finished run
                old = next((u for u, r in self._runs.items() if r.status in TERMINAL), None)
                if old is None:
                    break
                del self._runs[old]
        return run

    def _add_columns(self, run: RunResults, peak: str, seq: int, final: bool, get) -> None:
        """One peak of one frame; ``get(field)`` returns a column value or None."""
        for p in PARAMS:
            v = get(p)
            if v is None:
                continue
            e = get(_ERR[p]) if _ERR[p] else None
            run.add(peak, p, final, FitValue(seq, _float(v), _float(e)))

    def _watch(self, uid: str) -> None:
        """Hook: a run was asked about (REST polling starts here)."""

    # -- public API
    def latest(self, source_uid: str, peak: str, param: str, final: bool = False) -> FitValue | None:
        """Latest (highest seq_num) provisional, or with ``final`` final, value of ``param``
        (center, fwhm in 1/nm; amplitude/area; chi2) of ``peak``; None if none yet."""
        param = canonical_param(param)
        self._watch(source_uid)
        with self._cond:
            run = self._runs.get(source_uid)
            return None if run is None else run.latest(peak, param, final)

    def history(self, source_uid: str, peak: str, param: str, final: bool = False) -> list[FitValue]:
        """Values of ``param`` of ``peak``, one per frame in seq_num order (the newest
        ``history``)."""
        param = canonical_param(param)
        self._watch(source_uid)
        with self._cond:
            run = self._runs.get(source_uid)
            return [] if run is None else run.history(peak, param, final)

    def change_points(self, source_uid: str) -> list[int]:
        """Sorted source seq_nums flagged as change points (provisional or final)."""
        self._watch(source_uid)
        with self._cond:
            run = self._runs.get(source_uid)
            return [] if run is None else sorted(run.change_points)

    def status(self, source_uid: str) -> str:
        """Analysis status: "unseen", "running", "complete", "abort" or "fail"."""
        self._watch(source_uid)
        with self._cond:
            run = self._runs.get(source_uid)
            return "unseen" if run is None else run.status

    def last_seq(self, source_uid: str, final: bool = False) -> int:
        """Highest source seq_num with a provisional (or final) result; 0 if none."""
        self._watch(source_uid)
        with self._cond:
            run = self._runs.get(source_uid)
            return 0 if run is None else run.last_seq[bool(final)]

    def wait_for(self, source_uid: str, predicate: Callable[[RunResults], bool],
                 timeout: float) -> bool:
        """Block until ``predicate(results)`` is true (checked now and after every update of
        this run; ``results`` is the run's `RunResults`, possibly empty with status
        "unseen"); False after ``timeout`` s."""
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 s, got {timeout!r}")
        self._watch(source_uid)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                run = self._runs.get(source_uid) or RunResults(source_uid, 1)
                if predicate(run):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- REST
class RestFollower(_Follower):
    """Follow runs by polling the service's REST API (``base_url`` like
    ``http://host:8000``, with or without ``/api/v1``) every ``interval`` s on a thread.

    A run is followed from the first time it is asked about (`latest`, `wait_for`, ...) or
    `watch`-ed, until its status is final and its rows are all read. ``api_key`` is sent as
    ``X-API-Key``.
    """

    def __init__(self, base_url: str, *, interval: float = 0.1, api_key: str | None = None,
                 timeout: float = 5.0, history: int = 1000, max_runs: int = 100,
                 _owner: _Follower | None = None):
        import httpx

        super().__init__(history=history, max_runs=max_runs, _owner=_owner)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 s, got {interval!r}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/api/v1") else base + "/api/v1"
        self.interval = float(interval)
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._since: dict[str, int] = {}
        self._done: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="rest-follower", daemon=True)
        self._thread.start()

    def watch(self, source_uid: str) -> None:
        """Start following ``source_uid`` (idempotent)."""
        self._watch(source_uid)

    def _watch(self, uid: str) -> None:
        with self._cond:
            if uid in self._since:
                return
            self._since[uid] = 0
            self._run(uid)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                uids = [u for u in self._since if u not in self._done]
            for uid in uids:
                if self._stop.is_set():
                    break
                try:
                    self.poll(uid)
                except Exception as exc:       # network trouble: count, keep polling
                    self.stats["errors"] += 1
                    log.debug("polling %s failed: %s", uid, exc)
            self._wake.wait(self.interval)
            self._wake.clear()

    def poll(self, uid: str) -> int:
        """Fetch new rows of ``uid`` once (the thread does this); returns the rows read."""
        r = self._http.get(f"/runs/{uid}")
        if r.status_code == 404:
            return 0
        r.raise_for_status()
        status = r.json().get("status", "running")
        with self._cond:
            since = self._since.get(uid, 0)
        r = self._http.get(f"/runs/{uid}/peaks", params={"since": since})
        r.raise_for_status()
        body = r.json()
        cols, nxt = body["columns"], int(body["next_since"])
        n = len(cols.get("seq_num", ()))
        self.stats["requests"] += 2
        self.stats["rows"] += n
        with self._cond:
            run = self._run(uid)
            frames = {}
            for i in range(n):
                seq, fin = int(cols["seq_num"][i]), bool(cols["final"][i])
                self._add_columns(run, str(cols["peak"][i]), seq, fin,
                                  lambda f: cols[f][i] if f in cols else None)
                key = (seq, fin)
                frames[key] = frames.get(key, False) or bool(cols["change_point"][i])
            for (seq, fin), cp in frames.items():
                run.add_frame(seq, fin, cp)
            if run.peaks == ():
                run.peaks = tuple(dict.fromkeys(str(p) for p in cols.get("peak", ())))
            self._since[uid] = nxt
            # the status is read before the rows: a final status means every row is in
            run.status = status
            if status in TERMINAL:
                self._done.add(uid)
            self._cond.notify_all()
        return n

    def close(self) -> None:
        """Stop polling and close the HTTP client."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._http.close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --------------------------------------------------------------------------- 0MQ
class ResultsFollower(_Follower):
    """Follow analysis runs on the service's 0MQ results stream (``results.address``).

    ``prefix``: the stream's prefix (bytes, no spaces; ``b""`` takes every message).
    ``deserializer``: "msgpack" (msgpack-numpy, the service default), "pickle" (only for a
    stream you trust: it runs code from the network) or a ``bytes -> dict`` callable.
    ``rcvhwm``: 0MQ receive high-water mark in messages, the bounded buffer between the socket
    and the receive thread (past it the publisher drops, counted here as ``lost`` from the
    events' seq_num gaps). ``rest_url``: the service's REST API, used for runs whose start
    document was missed (see module docstring) after ``rest_grace`` s.

    ``stats``: received, decode_errors, orphans (events of unknown descriptors), lost.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5579", prefix: bytes = b"",
                 deserializer: Literal["msgpack", "pickle"] | Callable[[bytes], dict] = "msgpack",
                 *, rcvhwm: int = 100_000, rest_url: str | None = None, rest_grace: float = 2.0,
                 history: int = 1000, max_runs: int = 100):
        import zmq

        super().__init__(history=history, max_runs=max_runs)
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"address must look like 'tcp://host:port', got {address!r}")
        if not isinstance(prefix, bytes) or b" " in prefix:
            raise ValueError(f"prefix must be bytes without b' ', got {prefix!r}")
        if deserializer == "msgpack":
            from ..publish.results import msgpack_deserializer
            self._loads = msgpack_deserializer()
        elif deserializer == "pickle":
            self._loads = pickle.loads
        elif callable(deserializer):
            self._loads = deserializer
        else:
            raise ValueError(f"deserializer must be 'msgpack', 'pickle' or a callable, got {deserializer!r}")
        if not rest_grace >= 0:
            raise ValueError(f"rest_grace must be >= 0 s, got {rest_grace!r}")
        self.address, self.prefix = address, prefix
        self.stats = collections.Counter()
        self._analysis: dict[str, str] = {}       # analysis start uid -> source uid
        self._descriptors: dict[str, tuple[str, str]] = {}   # descriptor uid -> (source uid, stream)
        self._other_descriptors: dict[str, str] = {}   # other streams of analysis runs: not orphans
        self._event_seq: dict[str, int] = {}      # descriptor uid -> last event seq_num
        self._asked: dict[str, float] = {}        # source uid -> first asked (monotonic)
        self._rest: RestFollower | None = None
        self._rest_url, self.rest_grace = rest_url, float(rest_grace)
        self._rest_uids: set[str] = set()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ctx = zmq.Context()
        self._rcvhwm = int(rcvhwm)
        self._thread = threading.Thread(target=self._loop, name="results-follower", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self._ctx.term()
            raise self._error

    def wait_connected(self, timeout: float = 5.0, settle: float = 0.2) -> bool:
        """Wait for the 0MQ handshake with the publisher, then ``settle`` s for the
        subscription to reach it (0MQ gives no signal for that). False on timeout."""
        ok = self.connected.wait(timeout)
        if ok and settle:
            time.sleep(settle)
        return ok

    # -- receive thread
    def _loop(self) -> None:
        import zmq

        try:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, self.prefix + b" " if self.prefix else b"")
            mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            sock.connect(self.address)
        except Exception as exc:             # bad address: raised in the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        from zmq.utils.monitor import recv_monitor_message
        try:
            while not self._stop.is_set():
                for s, _ in poller.poll(100):
                    if s is mon:
                        ev = recv_monitor_message(mon)["event"]
                        if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                            self.connected.set()
                        elif ev == zmq.EVENT_DISCONNECTED:
                            self.connected.clear()
                        continue
                    while True:                  # drain what is there
                        try:
                            msg = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(msg)
        finally:
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)

    def _handle(self, msg: bytes) -> None:
        self.stats["received"] += 1
        try:
            prefix, name, payload = msg.split(b" ", 2)
            if prefix != self.prefix:
                return
            doc = self._loads(payload)
            name = name.decode()
        except Exception:
            self.stats["decode_errors"] += 1
            return
        try:
            with self._cond:
                getattr(self, f"_on_{name}", self._on_other)(doc)
                self._cond.notify_all()
        except Exception:
            self.stats["decode_errors"] += 1
            log.exception("results follower: bad %s document", name)

    def _on_other(self, doc) -> None:
        pass

    def _on_start(self, doc: dict) -> None:
        src = doc.get("source_run_uid")
        if src is None:                            # not an analysis run
            return
        self._analysis[doc["uid"]] = src
        run = self._run(src)
        run.analysis_uid, run.status = doc["uid"], "running"
        run.peaks = tuple(doc.get("peaks", ()))

    def _on_descriptor(self, doc: dict) -> None:
        """Follow the analysis run's ``primary`` (final fits) and ``provisional`` streams; its
        other streams (phases, phase_transitions) are not peak fits and are left to other
        consumers."""
        src = self._analysis.get(doc["run_start"])
        name = doc.get("name", "primary")
        if src is not None and name in _PEAK_STREAMS:
            self._descriptors[doc["uid"]] = (src, name)
        elif src is not None:
            self._other_descriptors[doc["uid"]] = src

    def _on_event(self, doc: dict) -> None:
        desc = doc["descriptor"]
        if desc not in self._descriptors:
            if desc not in self._other_descriptors:
                self.stats["orphans"] += 1
            return
        src, stream = self._descriptors[desc]
        last = self._event_seq.get(desc, 0)
        if doc["seq_num"] > last + 1:
            self.stats["lost"] += doc["seq_num"] - last - 1
        self._event_seq[desc] = max(last, doc["seq_num"])
        self._add_event(self._runs.get(src) or self._run(src), doc["data"], _PEAK_STREAMS[stream])

    def _on_event_page(self, doc: dict) -> None:
        from event_model import unpack_event_page
        for ev in unpack_event_page(doc):
            self._on_event(ev)

    def _add_event(self, run: RunResults, data: dict, final: bool) -> None:
        seq = int(data["source_seq_num"])

        def get(peak, f):
            name = "chi2_red" if f == "chi2" else f"{peak}_{f}"     # chi2: the frame's
            return data.get(stream_field(name, final))
        for peak in run.peaks:
            self._add_columns(run, peak, seq, final, lambda f: get(peak, f))
        run.add_frame(seq, final, bool(data.get(stream_field("change_point", final), False)))

    def _on_stop(self, doc: dict) -> None:
        src = self._analysis.pop(doc["run_start"], None)
        if src is None:
            return
        run = self._run(src)
        es = doc.get("exit_status", "success")
        run.status = "complete" if es == "success" else es
        for d, s in list(self._other_descriptors.items()):
            if s == src:
                del self._other_descriptors[d]
        for d, (s, stream) in list(self._descriptors.items()):
            if s == src:
                del self._descriptors[d]
                got = self._event_seq.pop(d, 0)
                n = (doc.get("num_events") or {}).get(stream)
                if n is not None and n > got:
                    self.stats["lost"] += n - got

    # -- REST fallback for runs whose start was missed
    def _watch(self, uid: str) -> None:
        if self._rest_url is None or uid in self._rest_uids:
            return
        with self._cond:
            run = self._runs.get(uid)
            if run is not None and run.analysis_uid is not None:
                return
            first = self._asked.setdefault(uid, time.monotonic())
            if time.monotonic() - first < self.rest_grace:
                return
        log.info("results for run %s not on the stream: following it over REST", uid[:8])
        if self._rest is None:
            self._rest = RestFollower(self._rest_url, history=self.history_len, _owner=self)
        self._rest_uids.add(uid)
        self._rest.watch(uid)

    def wait_for(self, source_uid, predicate, timeout):
        # re-check for the REST fallback while waiting
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 s, got {timeout!r}")
        deadline = time.monotonic() + timeout
        while True:
            step = max(0.0, min(deadline - time.monotonic(), self.rest_grace + 0.05))
            if super().wait_for(source_uid, predicate, step):
                return True
            if time.monotonic() >= deadline or self._closed:
                return False

    def close(self) -> None:
        """Stop the receive thread, close the socket (and the REST fallback)."""
        if self._closed:
            return
        self._stop.set()
        self._thread.join(10)
        if self._rest is not None:
            self._rest.close()
        self._ctx.term()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
