"""``scatterflow train``: the small models the workers apply per frame, trained on simulated data.

    scatterflow train phase  [-o service/models/phase_classifier.pt]   (service/train/phase.py)
    scatterflow train saxs   [-o service/models/saxs_encoder.pt]       (service/train/inversion.py)
    scatterflow train gisaxs [-o service/models/gisaxs_encoder.pt]     (service/train/inversion.py)

Each writes a checkpoint that ``torch.load(weights_only=True)`` reads, with a PNG of its
training or its predictions beside it; `saxs` and `gisaxs` also print the held-out table
(encoder, encoder + LM, LM alone, XGBoost) against sasmodels / BornAgain data. They need the
`train` extra: ``pip install -e '.[train]'``.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..train import inversion, phase
    p = subparsers.add_parser("train", help="train the phase classifier or an inversion encoder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    ph = kinds.add_parser("phase", help="phase classifier on simulated azopolymer cycles",
                          description=phase.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    phase.add_arguments(ph)
    ph.set_defaults(func=phase.run)
    for kind in ("saxs", "gisaxs"):
        k = kinds.add_parser(kind, help=f"{kind.upper()} inversion encoder, with baselines",
                             description=inversion.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        inversion.add_arguments(k, kind)
        k.set_defaults(func=inversion.run)
    return p
