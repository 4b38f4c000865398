"""ophyd (v1) devices of the simulated operando beamline: an area detector and a light source.

Both share one :class:`~service.sim.azopolymer.AzoCycle` and one clock. Setting the light
records the switch in the cycle's history at the clock's time, so the film follows the light it
actually received (first-order kinetics solved exactly between switches). Each detector
trigger renders a frame at the clock's time, publishes the ground truth as scalar signals (so it
travels in the event documents) and advances the simulated clock by ``frame_interval``;
triggers complete synchronously (a finished Status), like ``ophyd.sim.SynAxis``.
Staging the detector restarts the clock at 0 and the film at its initial state: times are
seconds since the plan started.
"""

from __future__ import annotations

import time

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import DeviceStatus, Status

from service.sim.azopolymer import LIGHTS, PEAKS, AzoCycle
from service.sim.frames import FrameSimulator


class SimClock:
    """Simulated time in s: advances only when told (deterministic, fast)."""

    def __init__(self, t0: float = 0.0):
        self._t = float(t0)

    def now(self) -> float:
        return self._t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"cannot advance the clock by a negative time, got {dt!r}")
        self._t += float(dt)

    def reset(self, t0: float = 0.0) -> None:
        self._t = float(t0)


class WallClock:
    """Real time in s since the last :meth:`reset` (``advance`` does nothing)."""

    def __init__(self):
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def advance(self, dt: float) -> None:
        pass

    def reset(self, t0: float = 0.0) -> None:
        self._t0 = time.monotonic() - float(t0)


class ArraySignal(Signal):
    """Signal holding an ndarray; describe() gives shape [rows, cols], dtype "array" and
    dtype_numpy (e.g. "<i4")."""

    def describe(self):
        desc = super().describe()
        value = np.asarray(self.get())
        desc[self.name].update(dtype="array", shape=list(value.shape), dtype_numpy=value.dtype.str)
        return desc


class OperandoDetector(Device):
    """Simulated 2D detector looking at the azopolymer film.

    Signals read per frame: ``image`` (int32 (rows, cols), Poisson counts, gaps -1),
    ``time_offset`` (s since staging, simulated or wall clock), and the ground truth
    ``<peak>_{center,fwhm,area,eta}_truth`` (1/nm; areas in integrated-profile units, i.e.
    cycle areas x flux x exposure), ``crystallinity_truth``, ``phase_truth``.
    Configuration: ``exposure_time`` s, ``frame_interval`` s, ``flux``.
    """

    image = Cpt(ArraySignal, value=np.zeros((1, 1), np.int32), kind="normal")
    time_offset = Cpt(Signal, value=0.0, kind="hinted")
    lamellar_center_truth = Cpt(Signal, value=0.0, kind="normal")
    lamellar_fwhm_truth = Cpt(Signal, value=0.0, kind="normal")
    lamellar_area_truth = Cpt(Signal, value=0.0, kind="normal")
    lamellar_eta_truth = Cpt(Signal, value=0.0, kind="normal")
    pi_pi_center_truth = Cpt(Signal, value=0.0, kind="normal")
    pi_pi_fwhm_truth = Cpt(Signal, value=0.0, kind="normal")
    pi_pi_area_truth = Cpt(Signal, value=0.0, kind="normal")
    pi_pi_eta_truth = Cpt(Signal, value=0.0, kind="normal")
    halo_center_truth = Cpt(Signal, value=0.0, kind="normal")
    halo_fwhm_truth = Cpt(Signal, value=0.0, kind="normal")
    halo_area_truth = Cpt(Signal, value=0.0, kind="normal")
    halo_eta_truth = Cpt(Signal, value=0.0, kind="normal")
    crystallinity_truth = Cpt(Signal, value=1.0, kind="normal")
    phase_truth = Cpt(Signal, value="crystalline", kind="normal")
    exposure_time = Cpt(Signal, value=1.0, kind="config")
    frame_interval = Cpt(Signal, value=1.0, kind="config")
    flux = Cpt(Signal, value=1.0, kind="config")

    def __init__(self, prefix: str = "", *, name: str, simulator: FrameSimulator,
                 clock: SimClock | WallClock | None = None, frame_interval: float = 1.0,
                 reset_on_stage: bool = True, **kwargs):
        if not frame_interval > 0:
            raise ValueError(f"frame_interval must be positive, got {frame_interval!r}")
        super().__init__(prefix, name=name, **kwargs)
        self.simulator = simulator
        self.cycle: AzoCycle = simulator.cycle
        self.clock = clock if clock is not None else SimClock()
        self.reset_on_stage = reset_on_stage
        self.image.put(np.zeros(simulator.shape, np.int32))
        self.exposure_time.put(simulator.exposure)
        self.frame_interval.put(float(frame_interval))
        self.flux.put(simulator.flux)

    def stage(self):
        if self.reset_on_stage:
            light = str(self.cycle.light(self.clock.now()))
            self.clock.reset()
            self.cycle.restart(light, 0.0)
        return super().stage()

    def trigger(self) -> Status:
        t = self.clock.now()
        frame = self.simulator.frame(t)
        truth = self.simulator.truth(t)
        self.image.put(frame)
        self.time_offset.put(float(t))
        for peak in PEAKS:
            for key in ("center", "fwhm", "area", "eta"):
                getattr(self, f"{peak}_{key}_truth").put(float(truth[f"{peak}_{key}"]))
        self.crystallinity_truth.put(float(truth["crystallinity"]))
        self.phase_truth.put(str(truth["phase"]))
        self.clock.advance(self.frame_interval.get())
        status = DeviceStatus(self)
        status.set_finished()
        return status


class LightSource(Device):
    """UV / visible lamp on the sample: ``set("uv" | "visible" | "dark")``; reads ``state``.

    Each set records the switch in the shared cycle at the clock's current time.
    """

    state = Cpt(Signal, value="dark", kind="hinted")

    def __init__(self, prefix: str = "", *, name: str, cycle: AzoCycle,
                 clock: SimClock | WallClock, **kwargs):
        super().__init__(prefix, name=name, **kwargs)
        self.cycle = cycle
        self.clock = clock
        self.state.put(str(cycle.light(clock.now())))

    def set(self, value: str) -> Status:
        if value not in LIGHTS:
            raise ValueError(f"unknown light {value!r}; expected one of {LIGHTS}")
        self.cycle.set_light(self.clock.now(), value)
        self.state.put(value)
        status = DeviceStatus(self)
        status.set_finished()
        return status


def make_beamline(geometry=None, cycle: AzoCycle | None = None, *, frame_interval: float = 1.0,
                  wall_clock: bool = False, name: str = "det", light_name: str = "light",
                  **simulator_kwargs) -> tuple[OperandoDetector, LightSource]:
    """Detector and light source sharing one cycle and one clock.

    ``geometry``: pyFAI AzimuthalIntegrator, PONI path, ``Geometry`` or None (demo geometry);
    ``cycle``: kinetics (default :class:`AzoCycle` with its light history replaced by the
    light the plan sets); ``simulator_kwargs`` go to :class:`FrameSimulator` (flux, exposure,
    seed, beamstop_radius_m, polarization_factor, ...).
    """
    cycle = cycle if cycle is not None else AzoCycle()
    cycle.restart("dark", 0.0)
    sim = FrameSimulator(geometry, cycle, **simulator_kwargs)
    clock = WallClock() if wall_clock else SimClock()
    det = OperandoDetector(name=name, simulator=sim, clock=clock, frame_interval=frame_interval)
    light = LightSource(name=light_name, cycle=cycle, clock=clock)
    return det, light
