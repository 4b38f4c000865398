"""``scatterflow train``: the small models the workers apply per frame, trained on simulated data.

    scatterflow train phase  [-o service/models/phase_classifier.pt]   (service/train/phase.py)
    scatterflow train saxs   [-o service/models/saxs_encoder.pt]       (service/train/inversion.py)
    scatterflow train gisaxs [-o service/models/gisaxs_encoder.pt]     (service/train/inversion.py)
    scatterflow train gisaxs_dist [-o service/models/gisaxs_dwba_encoder.pt] [--born]
                                                                       (service/train/inversion.py)

Each writes a checkpoint that ``torch.load(weights_only=True)`` reads, with a PNG of its
training or its predictions beside it; `saxs` and `gisaxs` also print the held-out table
(encoder, encoder + LM, LM alone, XGBoost) against sasmodels / BornAgain data; `gisaxs_dist`
(the radius-histogram encoder of the `spheres_histogram_paracrystal_dwba` inversion, trained
on DWBA maps on Si) its held-out table on BornAgain maps of bimodal populations. They need the
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
    helps = {"saxs": "SAXS inversion encoder, with baselines", "gisaxs": "GISAXS inversion encoder, with baselines",
             "gisaxs_dist": "GISAXS radius-histogram encoder (DWBA on Si), with a held-out table"}
    for kind, text in helps.items():
        k = kinds.add_parser(kind, help=text,
                             description=inversion.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        inversion.add_arguments(k, kind)
        k.set_defaults(func=inversion.run)
    return p
