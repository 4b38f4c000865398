"""Soak benchmark: the service for --minutes at a set frame rate, memory and queues sampled.

`scatterflow serve` (its own process, real worker processes) subscribes to a 0MQ PUB that this
script feeds with simulated Pilatus 300k frames (inline int32, 619 x 487) at --rate frames/s, in
back-to-back runs of --run-frames frames; results go to a real Tiled server in this process
(`EmbeddedTiled`). Every --sample-s seconds: resident memory (RSS, from /proc) of the service
process and of its children (workers), queue depths and open runs (REST /api/v1/status), files
in the Tiled spool. With --tiled-outage S, Tiled is stopped for S seconds at --outage-at (a
fraction of the time) and restarted on the same port and directory (the issue's fault: "Tiled
unreachable for a minute"; tiled's client retries a write for up to ~45 s before the service
spools it, see service/publish/tiled/).

Output: one table row per sample on stdout, soak.csv and soak.png (memory, queues, spool over
time) in --out, and at the end: the RSS slope over the last half of the time (MB/min, "flat"
below --flat-mb-per-min), and the accounting: frames sent == received + lost upstream,
received == final + failed, and the frames each run has in Tiled.

    .venv/bin/python benchmarks/soak.py --minutes 30 --rate 5           # the issue's soak
    .venv/bin/python benchmarks/soak.py --minutes 4 --tiled-outage 60   # shorter, with the outage
"""
from __future__ import annotations

import argparse
import csv
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
log = logging.getLogger("soak")
COLUMNS = ("t_s", "sent", "received", "final", "failed", "lost", "runs", "runs_active", "ingest_q",
           "pending_frames", "inflight_batches", "spool_files", "rss_service_mb", "rss_workers_mb",
           "rss_total_mb", "tiled_up")


# ------------------------------------------------------------------------------------ /proc
def descendants(pid: int) -> list[int]:
    """All processes below `pid` (children, grandchildren...), from /proc/*/stat ppid fields."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of one process, MB (VmRSS in /proc/PID/status; 0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------------------------ feeding
class Feeder(threading.Thread):
    """Back-to-back runs of `run_frames` inline frames at `rate` frames/s on a bound PUB socket;
    the pace is kept on an absolute schedule over all frames. `sent` counts events, `uids` the runs."""

    def __init__(self, address: str, pool: np.ndarray, poni: dict, rate: float, run_frames: int):
        super().__init__(name="feeder", daemon=True)
        import msgpack
        import msgpack_numpy
        import zmq
        self.pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.bind(address)
        self.pool, self.poni, self.rate, self.run_frames = pool, poni, rate, run_frames
        self.sent, self.uids = 0, []
        self.stop_event = threading.Event()

    def send(self, name: str, doc: dict) -> None:
        self.socket.send(b" " + name.encode() + b" " + self.pack(doc))

    def run(self) -> None:
        from event_model import compose_run
        rows, cols = self.pool.shape[1:]
        key = {"source": "soak", "dtype": "array", "shape": [1, rows, cols], "dtype_numpy": self.pool.dtype.str}
        t0, k = time.perf_counter(), 0
        while not self.stop_event.is_set():
            bundle = compose_run(metadata={"plan_name": "soak", "geometry": self.poni, "detectors": ["det"]})
            self.send("start", bundle.start_doc)
            desc = bundle.compose_descriptor(name="primary", data_keys={"det_image": key})
            self.send("descriptor", desc.descriptor_doc)
            self.uids.append(bundle.start_doc["uid"])
            for seq in range(1, self.run_frames + 1):
                delay = t0 + k / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                frame = self.pool[k % len(self.pool)]
                self.send("event", desc.compose_event(data={"det_image": frame}, timestamps={"det_image": time.time()},
                                                      seq_num=seq))
                self.sent += 1
                k += 1
                if self.stop_event.is_set():
                    break
            self.send("stop", bundle.compose_stop())

    def close(self) -> None:
        self.stop_event.set()
        self.join(30)
        time.sleep(0.5)
        self.socket.close(linger=2000)


# ------------------------------------------------------------------------------------ service
def write_config(work: Path, address: str, tiled, api_port: int, results_port: int) -> Path:
    import yaml
    config = {"ingest": {"address": address}, "geometry": {"mask": str(work / "mask.npy")},
              "tiled": {"uri": tiled.uri, "api_key": tiled.api_key, "directory": str(work / "service")},
              "api": {"port": api_port}, "results": {"address": f"tcp://127.0.0.1:{results_port}"}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def metric_total(text: str, name: str) -> float:
    """Sum of a Prometheus counter's samples in /metrics text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


class Sampler:
    """One row of COLUMNS from the service's REST API, /proc and the spool directory."""

    def __init__(self, serve_pid: int, api: str, spool: Path, feeder: Feeder, t0: float):
        self.pid, self.api, self.spool, self.feeder, self.t0 = serve_pid, api, spool, feeder, t0
        self.tiled_up = True

    def sample(self) -> dict:
        import httpx
        status = httpx.get(f"{self.api}/api/v1/status", timeout=10).json()
        metrics = httpx.get(f"{self.api}/metrics", timeout=10).text
        kids = descendants(self.pid)
        rss_service, rss_workers = rss_mb(self.pid), sum(rss_mb(p) for p in kids)
        spool = len([p for p in self.spool.iterdir() if p.suffix in (".npz", ".parquet")]) if self.spool.exists() else 0
        q = status["queues"]
        return {"t_s": round(time.monotonic() - self.t0, 1), "sent": self.feeder.sent,
                "received": int(status["frames_received"]), "final": int(status["frames_final"]),
                "failed": int(status["frames_failed"]),
                "lost": int(metric_total(metrics, "scatterflow_lost_upstream_total")),
                "runs": len(self.feeder.uids), "runs_active": status["runs_active"], "ingest_q": q.get("ingest", 0),
                "pending_frames": q.get("pending_frames", 0), "inflight_batches": q.get("inflight_batches", 0),
                "spool_files": spool, "rss_service_mb": round(rss_service, 1),
                "rss_workers_mb": round(rss_workers, 1), "rss_total_mb": round(rss_service + rss_workers, 1),
                "tiled_up": int(self.tiled_up)}


def slope_mb_per_min(rows: list[dict], key: str = "rss_total_mb") -> float:
    """Least-squares slope of `key` over the last half of the samples, MB/min."""
    half = rows[len(rows) // 2:]
    if len(half) < 3:
        return float("nan")
    t = np.array([r["t_s"] for r in half]) / 60
    return float(np.polyfit(t, np.array([r[key] for r in half]), 1)[0])


def plot(rows: list[dict], path: Path, outage: tuple[float, float] | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = np.array([r["t_s"] for r in rows]) / 60
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for key, label in (("rss_total_mb", "service + workers"), ("rss_service_mb", "service"),
                       ("rss_workers_mb", "workers")):
        axes[0].plot(t, [r[key] for r in rows], label=label)
    axes[0].set_ylabel("RSS (MB)")
    for key in ("ingest_q", "pending_frames", "inflight_batches", "runs_active"):
        axes[1].plot(t, [r[key] for r in rows], label=key)
    axes[1].set_ylabel("queue depth")
    axes[2].plot(t, [r["spool_files"] for r in rows], label="Tiled spool files")
    axes[2].plot(t, [r["sent"] - r["final"] - r["failed"] - r["lost"] for r in rows], label="frames in flight")
    axes[2].set_ylabel("count")
    axes[2].set_xlabel("time (min)")
    for ax in axes:
        if outage is not None:
            ax.axvspan(outage[0] / 60, outage[1] / 60, color="0.85", label="Tiled down")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    axes[0].set_title("scatterflow soak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def outage(holder: dict, at_s: float, seconds: float, sampler: Sampler, t0: float, marks: list) -> None:
    """Stop Tiled at `at_s` (since t0) for `seconds`, then restart it on the same port and directory."""
    from service.publish.tiled_server import EmbeddedTiled
    time.sleep(max(0.0, t0 + at_s - time.monotonic()))
    old = holder["tiled"]
    log.info("Tiled down for %.0f s", seconds)
    old.close()
    sampler.tiled_up = False
    start = time.monotonic() - t0
    time.sleep(seconds)
    holder["tiled"] = EmbeddedTiled(old.directory, api_key=old.api_key, port=old.port)
    sampler.tiled_up = True
    marks.append((start, time.monotonic() - t0))
    log.info("Tiled up again (%.0f s after it went down)", marks[-1][1] - start)


def tiled_status(tiled, uid: str) -> str | None:
    """The run's status in Tiled, None if it is not there (yet) or Tiled does not answer."""
    from tiled.client import from_uri
    try:
        return from_uri(tiled.uri, api_key=tiled.api_key)["scatterflow"][uid].metadata["status"]
    except Exception:
        return None


def check_tiled(tiled, uids: list[str]) -> dict:
    """Per run in Tiled: status and frames rows (each frame once)."""
    from tiled.client import from_uri
    top = from_uri(tiled.uri, api_key=tiled.api_key)["scatterflow"]
    statuses: dict[str, int] = {}
    rows = dup = 0
    for uid in uids:
        try:
            node = top[uid]
        except KeyError:
            statuses["missing"] = statuses.get("missing", 0) + 1
            continue
        statuses[node.metadata["status"]] = statuses.get(node.metadata["status"], 0) + 1
        seq = node["frames"].read()["seq_num"].to_numpy() if "frames" in node else np.zeros(0)
        rows += len(seq)
        dup += len(seq) - len(np.unique(seq))
    return {"runs": len(uids), "statuses": statuses, "frames_rows": rows, "duplicates": dup}


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="feeding time (default 30)")
    p.add_argument("--rate", type=float, default=5.0, help="frames/s (default 5, Pilatus 300k on 2 cores)")
    p.add_argument("--run-frames", type=int, default=25, help="frames per run (default 25: 100 runs fill the "
                   "REST store's bound within the first 10 minutes at 5 frames/s)")
    p.add_argument("--sample-s", type=float, default=10.0, help="sampling interval, s (default 10)")
    p.add_argument("--tiled-outage", type=float, default=0.0, help="Tiled stopped this many s (default 0: none)")
    p.add_argument("--outage-at", type=float, default=0.4, help="when, as a fraction of --minutes (default 0.4)")
    p.add_argument("--flat-mb-per-min", type=float, default=1.0, help="flat if the last half's RSS slope is "
                   "below this, MB/min (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "soak" / time.strftime("%Y%m%d-%H%M%S"),
                   help="output directory, new (default var/soak/<date-time>)")
    args = p.parse_args(argv)
    for name in ("minutes", "rate", "sample_s"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.run_frames < 1 or args.tiled_outage < 0 or not 0 <= args.outage_at < 1:
        raise SystemExit(f"bad --run-frames {args.run_frames}, --tiled-outage {args.tiled_outage} "
                         f"or --outage-at {args.outage_at}")
    return args


def wait_healthy(serve: subprocess.Popen, api: str, log_path: Path, timeout: float = 180) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if serve.poll() is not None:
            raise SystemExit(f"scatterflow serve exited ({serve.returncode}); see {log_path}")
        time.sleep(0.5)
    raise SystemExit(f"scatterflow serve did not answer in {timeout:.0f} s; see {log_path}")


def soak(args, serve_pid: int, api: str, feeder: Feeder, holder: dict, work: Path) -> tuple[list[dict], list]:
    """Feed for args.minutes, sampling; then wait (up to 5 min) until every frame is final or
    counted and Tiled has the last run. Returns the samples and the outage's (start, end) s."""
    t0 = time.monotonic()
    sampler = Sampler(serve_pid, api, work / "service" / "spool", feeder, t0)
    rows: list[dict] = []
    marks: list[tuple[float, float]] = []
    feeder.start()
    if args.tiled_outage:
        threading.Thread(target=outage, args=(holder, args.outage_at * args.minutes * 60, args.tiled_outage,
                                              sampler, t0, marks), daemon=True).start()
    print("  ".join(f"{c:>9}" for c in COLUMNS), flush=True)
    end = t0 + args.minutes * 60
    while time.monotonic() < end:
        time.sleep(max(0.0, min(args.sample_s, end - time.monotonic())))
        rows.append(sampler.sample())
        print("  ".join(f"{rows[-1][c]:>9}" for c in COLUMNS), flush=True)
    feeder.close()
    log.info("feeding stopped after %d frames in %d runs; waiting for the service to finish", feeder.sent,
             len(feeder.uids))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = sampler.sample()
        if (r["runs_active"] == 0 and r["final"] + r["failed"] + r["lost"] >= r["sent"] and not r["spool_files"]
                and (not feeder.uids or tiled_status(holder["tiled"], feeder.uids[-1]) not in (None, "running"))):
            break                                      # Tiled writes are in order: the last run's stop is last
        time.sleep(2)
    rows.append(sampler.sample())
    print("  ".join(f"{rows[-1][c]:>9}" for c in COLUMNS), flush=True)
    return rows, marks


def summarize(args, rows: list[dict], feeder: Feeder, marks: list, tiled: dict, work: Path) -> bool:
    """Print the figures; True if every frame is accounted for and Tiled has each run's frames once."""
    during, last = rows[:-1], rows[-1]                 # the last row: after the service finished
    slopes = {k: slope_mb_per_min(during, f"rss_{k}_mb") for k in ("total", "service", "workers")}
    flat = abs(slopes["total"]) < args.flat_mb_per_min
    print(f"\nsoak: {args.minutes:g} min at {args.rate:g} frames/s (Pilatus 300k), {feeder.sent} frames in "
          f"{len(feeder.uids)} runs of {args.run_frames}"
          + (f"; Tiled down {marks[0][1] - marks[0][0]:.0f} s from t = {marks[0][0]:.0f} s" if marks else ""))
    print(f"memory: RSS service + workers {during[0]['rss_total_mb']:.0f} MB at the first sample, "
          f"{during[len(during) // 2]['rss_total_mb']:.0f} MB at half time, {during[-1]['rss_total_mb']:.0f} MB at "
          f"the end; slope over the last half {slopes['total']:+.2f} MB/min (service {slopes['service']:+.2f}, "
          f"workers {slopes['workers']:+.2f}): {'flat' if flat else 'NOT flat'} "
          f"(threshold {args.flat_mb_per_min:g} MB/min)")
    print("queues: max " + ", ".join(f"{k} {max(r[k] for r in rows)}" for k in
                                     ("ingest_q", "pending_frames", "inflight_batches", "spool_files"))
          + "; at the end " + ", ".join(str(last[k]) for k in
                                        ("ingest_q", "pending_frames", "inflight_batches", "spool_files")))
    accounted = last["sent"] == last["received"] + last["lost"] and last["received"] == last["final"] + last["failed"]
    print(f"accounting: sent {last['sent']}, received {last['received']}, final {last['final']}, failed "
          f"{last['failed']}, lost upstream {last['lost']}: {'every frame accounted for' if accounted else 'MISMATCH'}")
    print(f"Tiled: {tiled['runs']} runs {tiled['statuses']}, {tiled['frames_rows']} frame rows "
          f"({tiled['duplicates']} duplicates)")
    print(f"written: {work / 'soak.csv'}, {work / 'soak.png'}, {work / 'serve.log'}")
    return accounted and tiled["duplicates"] == 0 and not tiled["statuses"].get("missing")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    from service.bench.frames import bench_geometry, frame_pool
    from service.commands.loopback import free_port
    from service.publish.tiled_server import EmbeddedTiled
    from service.sim import poni_dict

    work = args.out
    for sub in ("tiled", "service"):
        if (work / sub).exists():
            raise SystemExit(f"{work / sub} exists: choose a fresh --out")
    work.mkdir(parents=True, exist_ok=True)
    ai = bench_geometry("Pilatus300k")
    pool, mask = frame_pool(ai, 24)
    np.save(work / "mask.npy", mask)
    holder = {"tiled": EmbeddedTiled(work / "tiled")}
    port, api_port = free_port(), free_port()
    config = write_config(work, f"tcp://127.0.0.1:{port}", holder["tiled"], api_port, free_port())
    feeder = Feeder(f"tcp://127.0.0.1:{port}", pool, poni_dict(ai), args.rate, args.run_frames)
    serve_log = open(work / "serve.log", "w")
    serve = subprocess.Popen([str(BIN / "scatterflow"), "serve", "--config", str(config)], stdout=serve_log,
                             stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_healthy(serve, api, work / "serve.log")
        time.sleep(1.0)                                # slow joiner
        rows, marks = soak(args, serve.pid, api, feeder, holder, work)
    finally:
        serve.send_signal(signal.SIGTERM)              # graceful: the service drains its Tiled writes
        try:
            serve.wait(90)
        except subprocess.TimeoutExpired:
            serve.kill()
        serve_log.close()
        if feeder.is_alive():
            feeder.close()
    tiled = check_tiled(holder["tiled"], feeder.uids)
    holder["tiled"].close()
    with open(work / "soak.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plot(rows[:-1] if len(rows) > 2 else rows, work / "soak.png", marks[0] if marks else None)
    return 0 if summarize(args, rows, feeder, marks, tiled, work) else 1


if __name__ == "__main__":
    sys.exit(main())
