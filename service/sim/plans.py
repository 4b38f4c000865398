"""bluesky plans for the simulated operando experiment."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from service.sim.azopolymer import DEFAULT_DURATION_S, DEFAULT_SCHEDULE, LIGHTS, PEAKS
from service.sim.frames import poni_dict


def default_frame_schedule(frame_interval: float = 1.0) -> tuple[tuple[int, str], ...]:
    """The cycle's default light schedule (seconds) as (frame index, light) at ``frame_interval`` s."""
    if not frame_interval > 0:
        raise ValueError(f"frame_interval must be positive, got {frame_interval!r}")
    return tuple((int(round(t / frame_interval)), light) for t, light in DEFAULT_SCHEDULE)


def _checked_schedule(schedule, n_frames: int) -> dict[int, str]:
    changes: dict[int, str] = {}
    last = -1
    for item in schedule:
        try:
            index, light = item
        except (TypeError, ValueError):
            raise ValueError(f"schedule entries must be (frame_index, light), got {item!r}") from None
        if light not in LIGHTS:
            raise ValueError(f"unknown light {light!r}; expected one of {LIGHTS}")
        if not isinstance(index, int) or index < 0 or index <= last:
            raise ValueError(f"schedule frame indices must be increasing ints >= 0, got {index!r}")
        if index >= n_frames:
            raise ValueError(f"schedule frame index {index} is beyond n_frames={n_frames}")
        changes[index] = light
        last = index
    return changes


def operando_cycle(det, light, *, n_frames: int | None = None, schedule=None,
                   md: dict[str, Any] | None = None, delay: float = 0.0, extra_detectors=()):
    """Count ``n_frames`` frames of ``det`` while switching ``light`` per ``schedule``.

    ``extra_detectors``: more detectors read in the same events (e.g. WAXS beside SAXS), each
    on its own clock advancing by the same frame interval; ``geometry`` and the hints below
    describe ``det`` (per-detector settings go in ``md``, service/detectors.py).

    ``schedule``: (frame index, "uv" | "visible" | "dark") pairs, light set just before that
    frame is triggered; default :func:`default_frame_schedule` for the detector's frame
    interval, with ``n_frames`` covering the default 90 s. ``delay``: real seconds to sleep
    after each frame (pacing for live demos; the simulated clock is unaffected).
    Each event reads the detector (image + truth) and the light state. The start document
    carries ``detectors``, ``plan_name``, ``sample``, ``modality``, ``light_schedule``
    (frame index, light), ``light_schedule_s`` (s, light), ``geometry`` (PONI dict) and
    ``scatterflow`` hints (detector field, unit, polarization factor, dummy value,
    peak guesses, truth fields).
    """
    frame_interval = float(det.frame_interval.get())
    if n_frames is None:
        n_frames = int(round(DEFAULT_DURATION_S / frame_interval))
    if not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay!r}")
    if schedule is None:
        schedule = [(i, lt) for i, lt in default_frame_schedule(frame_interval) if i < n_frames]
    changes = _checked_schedule(schedule, n_frames)

    sim = det.simulator
    _md = {
        "detectors": [d.name for d in (det, *extra_detectors)],
        "motors": [],
        "plan_name": "operando_cycle",
        "plan_args": {"detectors": [repr(det)], "light": repr(light), "n_frames": n_frames,
                      "schedule": [[i, lt] for i, lt in changes.items()], "delay": delay},
        "num_points": n_frames,
        "num_intervals": n_frames - 1,
        "sample": "azopolymer film (simulated)",
        "modality": "WAXS",
        "simulated": True,
        "light_schedule": [[i, lt] for i, lt in changes.items()],
        "light_schedule_s": [[i * frame_interval, lt] for i, lt in changes.items()],
        "frame_interval": frame_interval,
        "geometry": poni_dict(sim.ai),
        "simulation": {                  # what the simulator did (descriptive; the service reads start["scatterflow"])
            "detector_field": det.image.name,
            "unit": "q_nm^-1",
            "polarization_factor": sim.polarization_factor,
            "dummy": -1,
            "time_field": det.time_offset.name,
            "truth_fields": {f"{peak}_{key}": getattr(det, f"{peak}_{key}_truth").name
                             for peak in PEAKS for key in ("center", "fwhm", "area")},
            "peaks": [
                {"name": "lamellar", "shape": "pseudo_voigt", "center": 3.2, "fwhm": 0.2,
                 "center_min": 2.7, "center_max": 3.6},
                {"name": "pi_pi", "shape": "pseudo_voigt", "center": 17.5, "fwhm": 1.0,
                 "center_min": 16.5, "center_max": 18.5},
            ],
        },
        "hints": {"dimensions": [([det.time_offset.name], "primary")]},
    }
    _md.update(md or {})

    @bpp.stage_decorator([det, *extra_detectors, light])
    @bpp.run_decorator(md=_md)
    def inner():
        for i in range(n_frames):
            if i in changes:
                yield from bps.mv(light, changes[i])
            yield from bps.trigger_and_read([det, *extra_detectors, light])
            if delay:
                yield from bps.sleep(delay)

    return (yield from inner())
