"""Loopback plumbing for commands that run the whole service on this machine (`scatterflow demo`,
`scatterflow bench`): free ports, bluesky's 0MQ proxy, the service, a RunEngine publishing to it."""
from __future__ import annotations

import socket
import threading


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it can be bound on 127.0.0.1, else a free port the system picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def start_proxy() -> tuple[int, int]:
    """bluesky's own 0MQ Proxy on two free ports (in, out), in a daemon thread."""
    from bluesky.callbacks.zmq import Proxy
    in_port, out_port = free_port(), free_port()
    proxy = Proxy(in_port, out_port)
    threading.Thread(target=proxy.start, name="0mq-proxy", daemon=True).start()
    return in_port, out_port


def start_service(console, settings, title: str):
    """The service started on ``settings``, its addresses printed; waits out 0MQ's slow joiner."""
    import time

    from ..server import Service
    console.print(f"[bold]{title}[/]: starting service ...")
    service = Service(settings).start()
    api = f"http://127.0.0.1:{service.api_port}"
    key = f" (API key in {service.tiled_key_file})" if service.tiled_key_file else ""
    console.print(f"REST {api}/api/v1  dashboard {api}/  metrics {api}/metrics  Tiled {service.tiled_uri}{key}")
    time.sleep(1.0)                                         # 0MQ slow joiner: let the SUB connect
    return service


def publishing_run_engine(in_port: int):
    """A bluesky RunEngine publishing msgpack documents to the proxy's ``in_port``, its
    Publisher (close it after the last run: flushed to the proxy), and the list its start
    documents' uids are appended to."""
    import functools

    import msgpack
    import msgpack_numpy
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher
    RE = RunEngine({})
    publisher = Publisher(f"127.0.0.1:{in_port}", serializer=functools.partial(msgpack.packb,
                                                                              default=msgpack_numpy.encode))
    RE.subscribe(publisher)
    uids: list[str] = []
    RE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
    return RE, publisher, uids


def start_demo_service(console, args, workdir, title: str, **overrides):
    """bluesky's proxy and the service for a demo: ingest from the proxy, embedded Tiled under
    ``workdir``, the API on ``args.port`` (or a free port), results on a free port, then
    ``overrides`` (settings sections) and ``args.config`` on top. Returns the service and the
    proxy's input port (where a RunEngine publishes)."""
    from ..config import load_settings
    in_port, out_port = start_proxy()
    settings = load_settings(args.config, **{
        "ingest": {"address": f"tcp://127.0.0.1:{out_port}"},
        "tiled": {"directory": str(workdir / "tiled"), "port": args.tiled_port},
        "api": {"port": free_port(args.port)},
        "results": {"address": f"tcp://127.0.0.1:{free_port()}"},
        **overrides})
    return start_service(console, settings, f"{title}: proxy in {in_port} -> out {out_port}"), in_port


def serve_until_interrupted(console, service) -> None:
    """Keep the service answering (REST, dashboard) until Ctrl-C."""
    import time
    console.print(f"serving http://127.0.0.1:{service.api_port} until Ctrl-C")
    while True:
        time.sleep(1)
