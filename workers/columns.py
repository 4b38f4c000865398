"""The column sets of the row tables that leave a worker, with their dtypes: the one definition
read by the fitter, the phase tracker, the REST store, Tiled and the results stream.

Rows travel columnar: a dict of equal-length numpy arrays keyed by these names, one row per
frame (and per peak for peak rows), ``final`` False for provisional and True for final rows.

Peak rows (workers/temporal.py), one per frame and peak:
  center, fwhm, amplitude (the peak's area), eta and their ``*_err`` (1 sigma; NaN for a
    parameter the frame's data do not determine);
  chi2: the reduced chi2 of the frame's whole profile (all peaks and the background), so the
    same value in every peak row of a frame; final rows: the data part at the regularised
    parameters, without the penalty;
  converged: the solver that produced the row met its criteria for this frame (provisional:
    the per-frame LM; final: the window smoother, for this frame's block) and unidentified is 0;
  unidentified: how many of this peak's parameters and of the frame's background parameters
    the data do not determine (error above the span of its bounds, or a singular normal matrix;
    e.g. the centre and width of a peak of zero area);
  change_point: a sudden significant change at this frame; final: see above.
"""
from __future__ import annotations

import numpy as np

PEAK_COLUMNS = ("seq_num", "time", "peak", "center", "center_err", "fwhm", "fwhm_err",
                "amplitude", "amplitude_err", "eta", "chi2", "converged", "unidentified", "change_point", "final")
PEAK_DTYPES = {c: np.float64 for c in PEAK_COLUMNS} | {
    "seq_num": np.int64, "peak": np.str_, "converged": np.bool_, "unidentified": np.int64,
    "change_point": np.bool_, "final": np.bool_}

PHASE_COLUMNS = ("seq_num", "time", "phase", "probability", "crystallinity", "crystallinity_sigma", "final")
PHASE_DTYPES = {c: np.float64 for c in PHASE_COLUMNS} | {"seq_num": np.int64, "phase": np.str_, "final": np.bool_}


def empty_columns(dtypes: dict) -> dict[str, np.ndarray]:
    """A table of no rows with the columns of ``dtypes``."""
    return {c: np.zeros(0, dtype=t) for c, t in dtypes.items()}
