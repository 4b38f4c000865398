"""bluesky plan stubs that steer an experiment from scatterflow's live fit results.

A plan gets its run's uid from ``uid = yield from bps.open_run(md)`` (bluesky >= 1.10 returns
it), and asks a follower (`service.plans.feedback.ResultsFollower` over 0MQ or `RestFollower`
over HTTP, created *before* the run so the 0MQ subscription is in place) about that uid:

* `wait_for_fit`: keep acquiring (or just wait) until ``condition(value, err)`` holds for a
  fitted peak parameter of a frame taken after ``after_seq``;
* `switch_on_change_point`: keep acquiring until the service flags a change point, then set
  a device (stop or change the stimulus);
* `adaptive_uv_cycle`: the simulated azopolymer experiment (`service.sim`) driven by them:
  UV until the lamellar peak area has faded below a threshold, then visible light until it
  has recovered above another.

Feedback is only as fresh as the pipeline: a result reaches the plan some frames after the
frame was taken. ``max_lag`` bounds that in frames: with detectors, the plan does not take a
new frame while more than ``max_lag`` of its frames are still unfitted (it sleeps ``poll`` s
instead), so a decision acts at most ``max_lag + 1`` frames after the frame that justified it.
Timeouts are in real (wall-clock) seconds.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from ..errors import ScatterflowError
from .feedback import TERMINAL, FitValue, canonical_param

log = logging.getLogger(__name__)


@dataclass
class WaitResult:
    """Outcome of a feedback wait. True when the condition was met.

    ``value``: the fitted value that met it (or, for change points, ``FitValue(seq, nan,
    nan)``); ``reads``: frames this stub acquired; ``reason``: "condition", "timeout",
    "max_reads" or "analysis_ended"; ``waited_s``: wall-clock seconds spent.
    """

    ok: bool
    value: FitValue | None
    reads: int
    reason: str
    waited_s: float

    def __bool__(self) -> bool:
        return self.ok


class FeedbackError(ScatterflowError, RuntimeError):
    """The awaited result cannot come (the analysis run ended); ``.result`` is the WaitResult."""

    def __init__(self, message: str, result: WaitResult):
        super().__init__(message)
        self.result = result


class FeedbackTimeout(FeedbackError, TimeoutError):
    """A feedback condition did not hold within the timeout or frame budget."""


def _checked(timeout, poll, delay, after_seq, max_lag, max_reads, consecutive=1) -> None:
    if not (isinstance(timeout, (int, float)) and timeout >= 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    if not (isinstance(poll, (int, float)) and poll > 0):
        raise ValueError(f"poll must be > 0 s, got {poll!r}")
    if not (isinstance(delay, (int, float)) and delay >= 0):
        raise ValueError(f"delay must be >= 0 s, got {delay!r}")
    if not (isinstance(after_seq, int) and after_seq >= 0):
        raise ValueError(f"after_seq must be an int >= 0, got {after_seq!r}")
    if max_lag is not None and not (isinstance(max_lag, int) and max_lag >= 0):
        raise ValueError(f"max_lag must be None or an int >= 0, got {max_lag!r}")
    if max_reads is not None and not (isinstance(max_reads, int) and max_reads >= 0):
        raise ValueError(f"max_reads must be None or an int >= 0, got {max_reads!r}")
    if not (isinstance(consecutive, int) and consecutive >= 1):
        raise ValueError(f"consecutive must be an int >= 1, got {consecutive!r}")


def wait_until(follower, source_uid: str, check: Callable[[], FitValue | None], *, timeout: float,
               what: str = "condition", poll: float = 0.1, detectors=None, stream: str = "primary",
               delay: float = 0.0, after_seq: int = 0, max_lag: int | None = None,
               max_reads: int | None = None, raise_on_timeout: bool = True):
    """Generic feedback loop: call ``check()`` (returns a FitValue when satisfied, else None)
    until it is satisfied, acquiring ``detectors`` with `bps.trigger_and_read` meanwhile
    (then sleeping ``delay`` s) or, without detectors, sleeping ``poll`` s. ``after_seq``:
    seq_num of the last event already in this run's ``stream`` (the plan's own frame count,
    used with ``max_lag``). Returns a `WaitResult`; on timeout or after ``max_reads`` frames
    raises `FeedbackTimeout` (or returns a false WaitResult if not ``raise_on_timeout``);
    raises `FeedbackError` when the analysis run has ended without the condition holding.
    """
    _checked(timeout, poll, delay, after_seq, max_lag, max_reads)
    detectors = list(detectors or [])
    t0 = time.monotonic()
    deadline = t0 + timeout
    reads = 0
    while True:
        status = follower.status(source_uid)        # before the values: a final status means all are in
        hit = check()
        if hit is not None:
            return WaitResult(True, hit, reads, "condition", time.monotonic() - t0)
        reason = None
        if status in TERMINAL:
            reason = "analysis_ended"
        elif time.monotonic() >= deadline:
            reason = "timeout"
        elif detectors and max_reads is not None and reads >= max_reads:
            reason = "max_reads"
        if reason is not None:
            res = WaitResult(False, None, reads, reason, time.monotonic() - t0)
            msg = (f"run {source_uid[:8]}: {what} not met ({reason}) after "
                   f"{res.waited_s:.1f} s and {reads} frame(s); analysis status {status!r}")
            if reason == "analysis_ended":
                raise FeedbackError(msg, res)
            if raise_on_timeout:
                raise FeedbackTimeout(msg, res)
            log.info(msg)
            return res
        if not detectors:
            yield from bps.sleep(poll)
            continue
        if max_lag is not None and after_seq + reads - follower.last_seq(source_uid) > max_lag:
            yield from bps.sleep(poll)                # let the analysis catch up
            continue
        yield from bps.trigger_and_read(detectors, name=stream)
        reads += 1
        if delay:
            yield from bps.sleep(delay)


def wait_for_fit(follower, source_uid: str, peak: str, param: str,
                 condition: Callable[[float, float], bool], *, timeout: float, poll: float = 0.1,
                 final: bool = False, detectors=None, stream: str = "primary", delay: float = 0.0,
                 after_seq: int = 0, max_lag: int | None = None, max_reads: int | None = None,
                 consecutive: int = 1, raise_on_timeout: bool = True):
    """Wait until ``condition(value, err)`` holds for ``param`` ("center", "fwhm" in 1/nm,
    "amplitude" or "area", "chi2") of ``peak`` in the run ``source_uid``, for ``consecutive``
    successive fitted frames with seq_num > ``after_seq`` (provisional fits, or with ``final``
    the regularized final ones, which come a window later). Every new value is tested in
    seq_num order, so a brief excursion between two polls is not missed.

    With ``detectors`` the experiment goes on meanwhile: one `bps.trigger_and_read(detectors)`
    per loop (plus ``delay`` s), throttled by ``max_lag`` (see module docstring), at most
    ``max_reads`` frames. Without, it sleeps ``poll`` s per loop. Returns a `WaitResult`
    (``.value`` the FitValue that met the condition, ``.reads`` frames taken); timeout:
    see `wait_until`.
    """
    param = canonical_param(param)
    _checked(timeout, poll, delay, after_seq, max_lag, max_reads, consecutive)
    state = {"checked": after_seq, "streak": 0}

    def check() -> FitValue | None:
        new = sorted(fv for fv in follower.history(source_uid, peak, param, final)
                     if fv.seq_num > state["checked"])
        for fv in new:
            ok = bool(condition(fv.value, fv.err)) if math.isfinite(fv.value) else False
            state["streak"] = state["streak"] + 1 if ok else 0
            state["checked"] = fv.seq_num
            if state["streak"] >= consecutive:
                return fv
        return None

    what = f"{peak} {param} condition"
    return (yield from wait_until(follower, source_uid, check, timeout=timeout, what=what, poll=poll,
                                  detectors=detectors, stream=stream, delay=delay, after_seq=after_seq,
                                  max_lag=max_lag, max_reads=max_reads, raise_on_timeout=raise_on_timeout))


def switch_on_change_point(follower, source_uid: str, device=None, value: Any = None, *,
                           timeout: float, poll: float = 0.1, detectors=None, stream: str = "primary",
                           delay: float = 0.0, after_seq: int = 0, max_lag: int | None = None,
                           max_reads: int | None = None, raise_on_timeout: bool = True):
    """Acquire ``detectors`` (or wait) until the service flags a change point at a frame with
    seq_num > ``after_seq``, then ``bps.mv(device, value)`` (e.g. the light to "dark" or
    "visible"); with ``device=None`` just return (the caller stops). Returns a `WaitResult`
    whose ``value.seq_num`` is the change point; timeout: see `wait_until`."""
    def check() -> FitValue | None:
        cps = [s for s in follower.change_points(source_uid) if s > after_seq]
        return FitValue(min(cps), math.nan, math.nan) if cps else None

    res = yield from wait_until(follower, source_uid, check, timeout=timeout, what="change point",
                                poll=poll, detectors=detectors, stream=stream, delay=delay,
                                after_seq=after_seq, max_lag=max_lag, max_reads=max_reads,
                                raise_on_timeout=raise_on_timeout)
    if res and device is not None:
        yield from bps.mv(device, value)
    return res


# ----------------------------------------------------------------------------- example plan
@dataclass
class AdaptiveResult:
    """What `adaptive_uv_cycle` did: run ``uid``, frames read, and per phase ("fade",
    "recover") the WaitResult and the number of frames read when the light was switched."""

    uid: str
    frames: int = 0
    phases: dict[str, WaitResult] = field(default_factory=dict)
    switched_after: dict[str, int] = field(default_factory=dict)


def _cycle_metadata(det, light, plan_name: str, plan_args: dict) -> dict:
    """Start-document metadata of the simulated beamline, the keys `service.sim.operando_cycle`
    writes (geometry as a PONI dict, ``simulation`` hints), minus its fixed light schedule."""
    from service.sim.azopolymer import PEAKS
    from service.sim.frames import poni_dict

    sim = det.simulator
    return {
        "detectors": [det.name], "motors": [], "plan_name": plan_name, "plan_args": plan_args,
        "sample": "azopolymer film (simulated)", "modality": "WAXS", "simulated": True,
        "frame_interval": float(det.frame_interval.get()),
        "geometry": poni_dict(sim.ai),
        "simulation": {                  # what the simulator did (descriptive; the service reads start["scatterflow"])
            "detector_field": det.image.name, "unit": "q_nm^-1",
            "polarization_factor": sim.polarization_factor, "dummy": -1,
            "time_field": det.time_offset.name,
            "truth_fields": {f"{peak}_{key}": getattr(det, f"{peak}_{key}_truth").name
                             for peak in PEAKS for key in ("center", "fwhm", "area")},
        },
        "hints": {"dimensions": [([det.time_offset.name], "primary")]},
    }


def adaptive_uv_cycle(det, light, follower, *, fade_threshold: float, recover_threshold: float,
                      max_frames: int, peak: str = "lamellar", param: str = "amplitude",
                      dark_frames: int = 3, timeout: float = 120.0, final: bool = False,
                      consecutive: int = 1, max_lag: int | None = None, poll: float = 0.05,
                      delay: float = 0.0, md: dict | None = None):
    """Photo-switching cycle steered by the live fits (simulated azopolymer, `service.sim`).

    ``dark_frames`` frames in the dark, then UV on and frames until the fitted ``param`` of
    ``peak`` (default the lamellar peak's area, integrated intensity) is below
    ``fade_threshold``; then visible light and frames until it is above
    ``recover_threshold``; then dark, and the run closes. At most ``max_frames`` frames in all
    (FeedbackTimeout beyond, as after ``timeout`` s per phase). Each event reads ``det`` and
    ``light``, so the light state of every frame is in the data. The start document carries
    the geometry and hints as `service.sim.operando_cycle`'s does, plus ``adaptive`` (the
    thresholds). Returns an `AdaptiveResult` (the plan's return value:
    ``RunEngine(call_returns_result=True)`` gives it as ``.plan_result``).
    """
    param = canonical_param(param)
    if not (isinstance(max_frames, int) and isinstance(dark_frames, int) and 0 <= dark_frames < max_frames):
        raise ValueError(f"need ints 0 <= dark_frames < max_frames, got dark_frames={dark_frames!r}, "
                         f"max_frames={max_frames!r}")
    if not fade_threshold < recover_threshold:
        raise ValueError(f"fade_threshold must be below recover_threshold, got {fade_threshold!r} "
                         f">= {recover_threshold!r}")
    _checked(timeout, poll, delay, 0, max_lag, None, consecutive)
    feedback = {"peak": peak, "param": param, "fade_threshold": fade_threshold,
                "recover_threshold": recover_threshold, "final": final, "consecutive": consecutive,
                "max_lag": max_lag, "max_frames": max_frames, "dark_frames": dark_frames}
    _md = _cycle_metadata(det, light, "adaptive_uv_cycle",
                          {"detectors": [repr(det)], "light": repr(light), **feedback,
                           "timeout": timeout, "delay": delay})
    _md["adaptive"] = feedback
    _md.update(md or {})
    devices = [det, light]

    def body(result: AdaptiveResult):
        yield from bps.mv(light, "dark")
        for _ in range(dark_frames):
            yield from bps.trigger_and_read(devices)
            result.frames += 1
            if delay:
                yield from bps.sleep(delay)
        phases = (("fade", "uv", lambda v, e: v < fade_threshold),
                  ("recover", "visible", lambda v, e: v > recover_threshold))
        for name, lamp, condition in phases:
            yield from bps.mv(light, lamp)
            res = yield from wait_for_fit(
                follower, result.uid, peak, param, condition, timeout=timeout, poll=poll,
                final=final, detectors=devices, delay=delay, after_seq=result.frames,
                max_lag=max_lag, max_reads=max_frames - result.frames, consecutive=consecutive)
            result.frames += res.reads
            result.phases[name] = res
            result.switched_after[name] = result.frames
            log.info("run %s: %s done at frame %d: %s %s = %.4g ± %.2g (frame %d)", result.uid[:8],
                     name, result.frames, peak, param, res.value.value, res.value.err, res.value.seq_num)
        yield from bps.mv(light, "dark")

    @bpp.stage_decorator(devices)
    def staged():
        from bluesky.utils import RunEngineControlException

        result = AdaptiveResult(uid=(yield from bps.open_run(_md)))

        def except_plan(e):
            if isinstance(e, RunEngineControlException):
                yield from bps.close_run(exit_status=e.exit_status)
            else:
                yield from bps.close_run(exit_status="fail", reason=str(e))

        yield from bpp.contingency_wrapper(body(result), except_plan=except_plan,
                                           else_plan=bps.close_run)
        return result

    return (yield from staged())
