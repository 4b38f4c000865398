"""Comparison methods for phase identification, not part of the service: the main peak's area
normalised to the first frames and thresholded. Used by the tests, benchmarks/bench_phase.py and
the training tables (``service.train.phase.evaluate_cycle``)."""
from __future__ import annotations

import numpy as np


def main_peak_baseline(area: np.ndarray, phases: tuple[str, ...], *, n_ref: int = 5,
                       bounds: tuple[float, float] = (0.19, 0.91)) -> np.ndarray:
    """Labels (F,) from the main crystalline peak's area (F,) (frames in time order) normalised
    to the mean of its first ``n_ref`` frames: r >= bounds[1] -> phases[0], r <= bounds[0] ->
    phases[-1], else phases[1]. Default bounds: the azopolymer truth's a = 0.1 and 0.9 at the
    default crystallinity floor 0.1 (x = 1 - a (1 - floor))."""
    if len(phases) != 3:
        raise ValueError(f"main_peak_baseline needs three phases, got {phases!r}")
    r = np.asarray(area, float) / np.nanmean(np.asarray(area, float)[:n_ref])
    return np.where(r >= bounds[1], phases[0], np.where(r <= bounds[0], phases[2], phases[1]))


def baseline_events(area: np.ndarray, times: np.ndarray, phases, *, n_ref: int = 5, min_frames: int = 2,
                    bounds: tuple[float, float] = (0.19, 0.91)) -> tuple[np.ndarray, list[dict]]:
    """Labels of `main_peak_baseline` and its events ``{"from", "to", "time"}`` (time in the unit
    of ``times``, s): label changes held for ``min_frames`` frames, timed by linear interpolation
    of the normalised area across the bound between the two frames around the change (midpoint
    if it does not cross there)."""
    from workers.phase import _label_changes

    labels = main_peak_baseline(area, tuple(phases), n_ref=n_ref, bounds=bounds)
    r = area / np.nanmean(area[:n_ref])
    idx = np.array([list(phases).index(p) for p in labels])
    events = []
    for k, a, b, _ in _label_changes(idx, min_frames)[0]:
        level = bounds[1] if min(a, b) == 0 else bounds[0]
        if b - a == 2 or a - b == 2:
            level = 0.5 * (bounds[0] + bounds[1])
        r0, r1 = r[k - 1], r[k]
        w = (level - r0) / (r1 - r0) if r1 != r0 else 0.5
        w = w if 0.0 <= w <= 1.0 else 0.5
        events.append({"from": phases[a], "to": phases[b], "time": float(times[k - 1] + w * (times[k] - times[k - 1]))})
    return labels, events
