"""`scatterflow report RUN_UID -o DIR`: write the HTML report (PDF too with weasyprint) of a
finished run, read back from Tiled.

The Tiled server is `--tiled-uri` (with `--api-key`), else `tiled.uri` of `--config` or the
environment (SCATTERFLOW_TILED__URI, SCATTERFLOW_TILED__API_KEY), else the embedded catalog in
`--tiled-directory` (default: `tiled.directory` of the configuration), opened here read-back
only, e.g. `--tiled-directory var/demo/tiled` after `scatterflow demo`.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write the HTML/PDF report of a run stored in Tiled",
                       description=__doc__)
    p.add_argument("uid", metavar="RUN_UID", help="the run's uid (a unique prefix is enough)")
    p.add_argument("-o", "--output", required=True, help="directory for index.html, figures/ and report.pdf")
    p.add_argument("--tiled-uri", help="Tiled server, e.g. http://127.0.0.1:8000/api/v1")
    p.add_argument("--api-key", help="Tiled API key")
    p.add_argument("--tiled-directory", help="open the embedded Tiled catalog in this directory instead")
    p.add_argument("--config", help="YAML configuration to take the Tiled settings from")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_settings, secret
    from ..report import find_run, write_report

    settings = load_settings(args.config)
    uri = args.tiled_uri or (None if args.tiled_directory else settings.tiled.uri)
    api_key = args.api_key if args.api_key is not None else secret(settings.tiled.api_key)
    server = None
    if uri is None:
        from ..publish.tiled_server import EmbeddedTiled
        directory = Path(args.tiled_directory or settings.tiled.directory)
        if not (directory / "catalog.db").exists():
            print(f"scatterflow report: no Tiled catalog in {directory}: give --tiled-uri or --tiled-directory")
            return 2
        server = EmbeddedTiled(directory)
        uri, api_key = server.uri, server.api_key
    try:
        from ..publish.tiled_server import connect
        try:
            node = find_run(connect(uri, api_key), args.uid)
        except ValueError as exc:
            print(f"scatterflow report: {exc}")
            return 2
        index = write_report(node, args.output)
    finally:
        if server is not None:
            server.close()
    print(f"report: {index}" + (f" (and {index.parent / 'report.pdf'})" if (index.parent / "report.pdf").exists() else ""))
    return 0
