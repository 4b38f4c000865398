"""The column sets of the row tables that leave a worker, with their dtypes: the one definition
read by the fitter, the phase tracker, the REST store, Tiled and the results stream.

Rows travel columnar: a dict of equal-length numpy arrays keyed by these names, one row per
frame (and per peak for peak rows), ``final`` False for provisional and True for final rows.
"""
from __future__ import annotations

import numpy as np

PEAK_COLUMNS = ("seq_num", "time", "peak", "center", "center_err", "fwhm", "fwhm_err",
                "amplitude", "amplitude_err", "eta", "chi2", "converged", "change_point", "final")
PEAK_DTYPES = {c: np.float64 for c in PEAK_COLUMNS} | {
    "seq_num": np.int64, "peak": np.str_, "converged": np.bool_, "change_point": np.bool_, "final": np.bool_}

PHASE_COLUMNS = ("seq_num", "time", "phase", "probability", "crystallinity", "crystallinity_sigma", "final")
PHASE_DTYPES = {c: np.float64 for c in PHASE_COLUMNS} | {"seq_num": np.int64, "phase": np.str_, "final": np.bool_}


def empty_columns(dtypes: dict) -> dict[str, np.ndarray]:
    """A table of no rows with the columns of ``dtypes``."""
    return {c: np.zeros(0, dtype=t) for c, t in dtypes.items()}
