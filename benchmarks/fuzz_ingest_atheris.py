"""Coverage-guided fuzzing of the ingest path with atheris (libFuzzer for Python). Not in the test suite.

Each input is one received 0MQ message, handed to `ZmqSubscriber.handle` (decode, validate,
route) as the routing thread does, with the real decoder, router, resolver and metrics and a
sink that drops frames. service/decode.py, service/ingest.py and service/resolve.py are instrumented
coverage; the corpus starts from valid Bluesky runs (inline frames, event_page, reduced
profiles) framed as bluesky's Publisher sends them. A crash is: an exception escaping
`handle`, a message that is neither accepted nor counted as rejected, or one that reaches the
catch-all ``internal_error``. At the end it prints inputs run, accepted, rejected by reason.

    pip install atheris
    python benchmarks/fuzz_ingest_atheris.py [--seconds 20] [libFuzzer options, e.g. -max_len=8192]
"""
from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import atheris
import msgpack
import msgpack_numpy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
with atheris.instrument_imports(include=["service.decode", "service.ingest", "service.resolve"]):
    from service.config import IngestConfig
    from service.ingest import DocumentRouter, ZmqSubscriber
    from service.metrics import Metrics

pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)


class DropSink:
    def start_run(self, uid, start): pass
    def submit(self, frame): pass
    def stop_run(self, uid, stop): pass


def seed_corpus(directory: Path) -> None:
    """Valid runs, one message per file, framed as ``b" " + name + b" " + msgpack``."""
    from event_model import compose_run, pack_event_page
    b = compose_run(metadata={"plan_name": "seed", "sample": {"name": "film"}})
    img = np.arange(12, dtype=np.uint16).reshape(4, 3)
    d = b.compose_descriptor(name="primary", data_keys={
        "img": {"source": "sim", "dtype": "array", "shape": [4, 3], "dtype_numpy": "<u2"},
        "temp": {"source": "sim", "dtype": "number", "shape": []}})
    events = [d.compose_event(data={"img": img + i, "temp": 1.0 * i}, timestamps={"img": 0.0, "temp": 0.0},
                              seq_num=i + 1) for i in range(2)]
    b2 = compose_run(metadata={"plan_name": "profiles"})
    q = np.linspace(1.0, 5.0, 8)
    d2 = b2.compose_descriptor(name="primary", data_keys={
        k: {"source": "sim", "dtype": "array", "shape": [8]} for k in ("q", "intensity", "sigma")})
    docs = [("start", b.start_doc), ("descriptor", d.descriptor_doc), *[("event", e) for e in events],
            ("event_page", pack_event_page(*events)), ("stop", b.compose_stop()),
            ("start", b2.start_doc), ("descriptor", d2.descriptor_doc),
            ("event", d2.compose_event(data={"q": q, "intensity": q, "sigma": q},
                                       timestamps={k: 0.0 for k in ("q", "intensity", "sigma")}, seq_num=1))]
    for i, (name, doc) in enumerate(docs):
        (directory / f"seed{i:02d}").write_bytes(b" " + name.encode() + b" " + pack(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget (s)")
    args, libfuzzer_args = parser.parse_known_args()
    if not args.seconds > 0:
        raise SystemExit(f"--seconds must be > 0, got {args.seconds!r}")
    logging.basicConfig(level=logging.ERROR)
    config = IngestConfig(file_retries=0, max_open_runs=8, max_frame_pixels=4096, max_message_bytes=1 << 20,
                          max_objects=20_000, max_depth=32)
    metrics = Metrics()
    router = DocumentRouter(DropSink(), metrics, config)
    subscriber = ZmqSubscriber(config, router, metrics)
    stats = {"inputs": 0, "accepted": 0, "start": time.monotonic()}

    def totals():
        acc = sum(s.value for f in metrics.documents.collect() for s in f.samples if s.name.endswith("_total"))
        rej = collections.Counter({s.labels["reason"]: int(s.value) for f in metrics.rejected.collect()
                                   for s in f.samples if s.name.endswith("_total")})
        return int(acc), rej

    def finish():
        acc, rej = totals()
        elapsed = time.monotonic() - stats["start"]
        print(f"\natheris: {stats['inputs']} inputs in {elapsed:.1f} s ({stats['inputs'] / elapsed:.0f}/s), "
              f"{acc} accepted, {sum(rej.values())} rejected; by reason: {dict(rej.most_common())}; "
              f"open runs {len(router.runs)}", flush=True)
        os._exit(0)     # libFuzzer's own exit skips Python's atexit

    def one_input(data: bytes) -> None:
        before = totals()
        subscriber.handle(data, time.monotonic())
        after = totals()
        stats["inputs"] += 1
        rejected = after[1] - before[1]
        if rejected["internal_error"] or (after[0] - before[0]) + sum(rejected.values()) != 1:
            raise AssertionError(f"message neither accepted nor counted once: {data[:80]!r}")
        if stats["inputs"] % 256 == 0:
            router.expire(-1.0)                 # housekeeping's run timeout, so new runs keep being accepted
        if time.monotonic() - stats["start"] > args.seconds:
            finish()

    corpus = Path(tempfile.mkdtemp(prefix="scatterflow-atheris-"))
    seed_corpus(corpus)
    print(f"corpus and crash artifacts in {corpus}", flush=True)
    atheris.Setup([sys.argv[0], *libfuzzer_args, f"-max_total_time={int(args.seconds) + 30}",
                   f"-artifact_prefix={corpus}/", str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
