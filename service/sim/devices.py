"""ophyd (v1) devices of the simulated operando beamline: an area detector and a light source.

Both share one :class:`~service.sim.azopolymer.AzoCycle` and one clock. Setting the light
records the switch in the cycle's history at the clock's time, so the film follows the light it
actually received (first-order kinetics solved exactly between switches). Each detector
trigger renders a frame at the clock's time, publishes the ground truth as scalar signals (so it
travels in the event documents) and advances the simulated clock by ``frame_interval``;
triggers complete synchronously (a finished Status), like ``ophyd.sim.SynAxis``.
Staging the detector restarts the clock at 0 and the film at its initial state: times are
seconds since the plan started.

Frames travel inline in the events (:class:`OperandoDetector`, the default) or, as ophyd-async
area detectors write them, in an HDF5 file per run (:class:`HDF5OperandoDetector`,
``make_beamline(hdf5_directory=...)``): the events then carry only the scalars, and the frames
are announced by a ``stream_resource`` and one ``stream_datum`` per frame.
"""

from __future__ import annotations

import pathlib
import time
import uuid
from collections.abc import Iterator

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


class HDF5FrameWriter:
    """Frames appended to ``/entry/data/data`` of one HDF5 file per run, as ophyd-async's
    area-detector writers (and its ``SimBlobDetector``) lay them out, with the documents that
    announce them (event-model's ``ComposeStreamResource``).

    Dataset ``(frames, rows, cols)`` of the frames' dtype, chunks of one frame, resizable along
    the frames; the file is in SWMR mode and each frame flushed once written, so readers
    (``h5py.File(path, "r", swmr=True)``, refreshing the dataset) see rows as they come.
    `collect_asset_docs` yields, like ophyd-async's ``StreamResourceDataProvider``, the
    ``stream_resource`` once the first frame is written, then a ``stream_datum`` for the frames
    written since the last call: ``indices`` {start, stop} are rows of the file, ``seq_nums``
    {0, 0} and ``descriptor`` "" are filled in by the RunEngine.
    """

    DATASET = "/entry/data/data"
    MIMETYPE = "application/x-hdf5"

    def __init__(self, directory, data_key: str, frame_shape: tuple[int, int], dtype):
        self.directory = pathlib.Path(directory).resolve()
        self.data_key = data_key
        self.frame_shape = tuple(int(n) for n in frame_shape)
        self.dtype = np.dtype(dtype)
        self.path: pathlib.Path | None = None
        self._file = None
        self._dataset = None
        self._bundle = None           # event_model ComposeStreamResourceBundle of the open file
        self._written = 0
        self._emitted = 0             # frames announced by stream_datum documents
        self._resource_sent = False

    @property
    def uri(self) -> str | None:
        """``file://localhost/<absolute path>`` of the open (or last) file."""
        return None if self.path is None else f"file://localhost{self.path.as_posix()}"

    def open(self, stem: str) -> pathlib.Path:
        """A new file ``<directory>/<stem>_<uuid>.h5`` (closing the previous one)."""
        import h5py
        from event_model import ComposeStreamResource

        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{stem}_{uuid.uuid4().hex}.h5"
        self._file = h5py.File(self.path, "w", libver="latest")
        rows, cols = self.frame_shape
        self._dataset = self._file.create_dataset(self.DATASET, shape=(0, rows, cols), dtype=self.dtype,
                                                  maxshape=(None, rows, cols), chunks=(1, rows, cols))
        self._file.swmr_mode = True               # datasets made: readers may open it from now on
        self._bundle = ComposeStreamResource()(
            mimetype=self.MIMETYPE, uri=self.uri, data_key=self.data_key,
            parameters={"dataset": self.DATASET, "chunk_shape": [1, rows, cols]})
        self._written = self._emitted = 0
        self._resource_sent = False
        return self.path

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def append(self, frame: np.ndarray) -> None:
        """Write one frame ``(rows, cols)`` as the next row and flush it."""
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} != the file's {self.frame_shape}")
        if self._dataset is None:
            raise RuntimeError("no HDF5 file open (stage the detector first)")
        self._dataset.resize(self._written + 1, axis=0)
        self._dataset[self._written] = frame
        self._dataset.flush()
        self._written += 1

    def get_index(self) -> int:
        """Frames written to the open file."""
        return self._written

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict]]:
        """``stream_resource`` (first frame), then one ``stream_datum`` for the frames written
        since the last call, up to `index` (default: all written)."""
        upto = self._written if index is None else min(int(index), self._written)
        if self._bundle is None or upto <= self._emitted:
            return
        if not self._resource_sent:
            self._resource_sent = True
            yield "stream_resource", self._bundle.stream_resource_doc
        yield "stream_datum", self._bundle.compose_stream_datum({"start": self._emitted, "stop": upto})
        self._emitted = upto

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._dataset = None


class HDF5OperandoDetector(OperandoDetector):
    """:class:`OperandoDetector` writing its frames to HDF5 (:class:`HDF5FrameWriter`) instead of
    sending them in the events, as an ophyd-async area detector does (bluesky's
    ``WritesStreamAssets``).

    The frames are the ones the inline detector sends (same simulator: same seed, same frames).
    ``image`` is described as ``external: "STREAM:"``, shape ``[1, rows, cols]`` (frames per
    event first), ``dtype_numpy`` of the frames, ``source`` the file's uri, and left out of
    `read`; the other signals (time, truth) stay in the events. Staging opens a new file under
    ``hdf5_directory`` (``det_<uuid>.h5``), unstaging closes it; one ``stream_datum`` per frame,
    ``indices`` its row in the file.
    """

    def __init__(self, prefix: str = "", *, name: str, simulator: FrameSimulator, hdf5_directory,
                 **kwargs):
        super().__init__(prefix, name=name, simulator=simulator, **kwargs)
        self.writer = HDF5FrameWriter(hdf5_directory, self.image.name, simulator.shape,
                                      np.asarray(self.image.get()).dtype)

    def stage(self):
        staged = super().stage()
        self.writer.open(self.name)
        return staged

    def unstage(self):
        self.writer.close()
        return super().unstage()

    def trigger(self) -> Status:
        status = super().trigger()
        if not self.writer.is_open:               # triggered without staging: a file all the same
            self.writer.open(self.name)
        self.writer.append(self.image.get())
        return status

    def describe(self):
        desc = super().describe()
        key = self.image.name
        if key in desc:
            rows, cols = self.writer.frame_shape
            desc[key] = {**desc[key], "shape": [1, rows, cols], "dtype": "array",
                         "dtype_numpy": self.writer.dtype.str, "external": "STREAM:",
                         "source": self.writer.uri or f"file://localhost{self.writer.directory.as_posix()}"}
        return desc

    def read(self):
        reading = super().read()
        reading.pop(self.image.name, None)
        return reading

    def get_index(self) -> int:
        return self.writer.get_index()

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict]]:
        yield from self.writer.collect_asset_docs(index)


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
                  hdf5_directory=None, **simulator_kwargs) -> tuple[OperandoDetector, LightSource]:
    """Detector and light source sharing one cycle and one clock.

    ``geometry``: pyFAI AzimuthalIntegrator, PONI path, ``Geometry`` or None (demo geometry);
    ``cycle``: kinetics (default :class:`AzoCycle` with its light history replaced by the
    light the plan sets); ``simulator_kwargs`` go to :class:`FrameSimulator` (flux, exposure,
    seed, beamstop_radius_m, polarization_factor, ...). ``hdf5_directory``: the detector writes
    its frames to an HDF5 file per run there (:class:`HDF5OperandoDetector`, stream_resource and
    stream_datum documents) instead of sending them inline in the events (None, the default).
    """
    cycle = cycle if cycle is not None else AzoCycle()
    cycle.restart("dark", 0.0)
    sim = FrameSimulator(geometry, cycle, **simulator_kwargs)
    clock = WallClock() if wall_clock else SimClock()
    if hdf5_directory is None:
        det = OperandoDetector(name=name, simulator=sim, clock=clock, frame_interval=frame_interval)
    else:
        det = HDF5OperandoDetector(name=name, simulator=sim, clock=clock, frame_interval=frame_interval,
                                   hdf5_directory=hdf5_directory)
    light = LightSource(name=light_name, cycle=cycle, clock=clock)
    return det, light


class ParticleDetector(Device):
    """Simulated GISAXS detector looking at spheres growing on a substrate
    (service/sim/gisaxs_particles.py: frames rendered in the DWBA by BornAgain).

    Signals read per frame: ``image`` (int32 (rows, cols), Poisson counts), ``time_offset`` (s
    since staging on the simulated clock) and the ground truth ``radius_truth``,
    ``distance_truth`` (nm), ``pd_truth``, ``disorder_truth``. Configuration: ``frame_interval`` s.
    """

    image = Cpt(ArraySignal, value=np.zeros((1, 1), np.int32), kind="normal")
    time_offset = Cpt(Signal, value=0.0, kind="hinted")
    radius_truth = Cpt(Signal, value=0.0, kind="normal")
    distance_truth = Cpt(Signal, value=0.0, kind="normal")
    pd_truth = Cpt(Signal, value=0.0, kind="normal")
    disorder_truth = Cpt(Signal, value=0.0, kind="normal")
    frame_interval = Cpt(Signal, value=1.0, kind="config")

    def __init__(self, prefix: str = "", *, name: str, simulator, frame_interval: float = 1.0, **kwargs):
        if not frame_interval > 0:
            raise ValueError(f"frame_interval must be positive, got {frame_interval!r}")
        super().__init__(prefix, name=name, **kwargs)
        self.simulator = simulator
        self.clock = SimClock()
        self.image.put(np.zeros(simulator.shape, np.int32))
        self.frame_interval.put(float(frame_interval))

    def stage(self):
        self.clock.reset()
        return super().stage()

    def trigger(self) -> Status:
        t = self.clock.now()
        self.image.put(self.simulator.frame(t))
        self.time_offset.put(float(t))
        for key, value in self.simulator.truth(t).items():
            getattr(self, f"{key}_truth").put(float(value))
        self.clock.advance(self.frame_interval.get())
        status = DeviceStatus(self)
        status.set_finished()
        return status
