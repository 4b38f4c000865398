"""`scatterflow reprocess UID [UID ...] [--search KEY=VALUE] [--catalog URI] [--config FILE]`:
past runs of the catalogue analysed again (service/replay.py)."""
from __future__ import annotations

import os
import sys
import tempfile


def add_parser(sub) -> None:
    p = sub.add_parser("reprocess", help="analyse past runs of the catalogue again (new analysis runs)",
                       description="Read raw runs written by bluesky's TiledWriter from the catalogue (frames inline "
                                   "or in HDF5 files, which Tiled serves), replay them through the service's pipeline "
                                   "as fast as the workers allow (several runs side by side over the worker pool, "
                                   "local or Ray), and write one new analysis run per source run, linked to it by "
                                   "source_run. Prints each new uid.")
    p.add_argument("uids", nargs="*", help="raw run uids (or unique prefixes)")
    p.add_argument("--search", action="append", default=[], metavar="KEY=VALUE",
                   help="also every run whose start document has KEY equal to VALUE (numbers compared as numbers); "
                        "repeat to narrow, e.g. --search proposal_id=314159 --search plan_name=count")
    p.add_argument("--catalog", help="Tiled URI of the catalogue (default: catalog.uri, SCATTERFLOW_CATALOG__URI)")
    p.add_argument("--config", "-c", help="YAML configuration of the analysis (SCATTERFLOW_* variables override it)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the runs to finish")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from ..catalog import CatalogError, connect
    from ..config import load_settings, secret
    from ..replay import replay_runs
    console = Console(stderr=True)
    settings = reprocess_settings(load_settings(args.config), args.catalog)
    if not settings.catalog.uri:
        print("scatterflow reprocess: no catalogue (--catalog URI or catalog.uri)", file=sys.stderr)
        return 2
    uids = list(args.uids)
    if args.search:
        client = connect(settings.catalog.uri, secret(settings.catalog.api_key))
        uids += [u for u in search_uids(client, args.search) if u not in uids]
    if not uids:
        print("scatterflow reprocess: no runs given or found", file=sys.stderr)
        return 2
    with Progress(console=console) as bar:
        tasks = {}

        def progress(uid, frames, fitted, final):
            if uid not in tasks:
                tasks[uid] = bar.add_task(f"{uid[:8]} final", total=frames)
            bar.update(tasks[uid], completed=final)
        try:
            outcomes = replay_runs(settings, uids, timeout_s=args.timeout, progress=progress)
        except CatalogError as exc:
            print(f"scatterflow reprocess: {exc}", file=sys.stderr)
            return 2
    for o in outcomes:
        print(f"{o.source_uid} -> {o.analysis_uid} {o.status} {o.frames_final}/{o.frames} frames final"
              + (f" ({o.detail})" if o.detail else ""), flush=True)
    return 0 if all(o.status == "complete" for o in outcomes) else 1


def reprocess_settings(settings, catalog: str | None):
    """`settings` for a replay: the catalogue from `catalog` if given; results to the catalogue's
    Tiled when no other Tiled is configured; no 0MQ ingest (documents are routed in-process: the
    subscriber listens on a private IPC path nobody publishes to), no results stream, the REST
    API on a free port (a `scatterflow serve` may hold the configured ones)."""
    from .loopback import free_port
    cat = settings.catalog.model_copy(update={"uri": catalog}) if catalog else settings.catalog
    tiled = settings.tiled
    if tiled.enabled and tiled.uri is None and cat.uri:
        tiled = tiled.model_copy(update={"uri": cat.uri, "api_key": cat.api_key})
    inert = f"ipc://{tempfile.gettempdir()}/scatterflow-reprocess-{os.getpid()}"
    return settings.model_copy(update={
        "catalog": cat, "tiled": tiled, "ingest": settings.ingest.model_copy(update={"address": inert}),
        "results": settings.results.model_copy(update={"address": None}),
        "api": settings.api.model_copy(update={"port": free_port()})})


def search_uids(client, terms: list[str]) -> list[str]:
    """Uids of the runs whose start documents match every ``KEY=VALUE`` of `terms`."""
    from tiled.queries import Key
    results = client
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep or not key:
            raise SystemExit(f"scatterflow reprocess: --search wants KEY=VALUE, got {term!r}")
        try:
            parsed = int(value)
        except ValueError:
            try:
                parsed = float(value)
            except ValueError:
                parsed = value
        results = results.search(Key(f"start.{key}") == parsed)
    return list(results)
