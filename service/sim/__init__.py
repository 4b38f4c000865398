"""Simulated operando beamline: an azopolymer film switched by UV/visible light (ground truth,
``azopolymer``), 2D frames rendered with pyFAI conventions (``frames``), ophyd devices
(``devices``) and bluesky plans (``plans``). ophyd/bluesky are imported only when the devices
or plans are used.
"""

from service.sim.azopolymer import DEFAULT_SCHEDULE, AzoCycle, PeakStates, flatten_truth
from service.sim.frames import FrameSimulator, default_geometry, poni_dict, write_default_poni

_LAZY = {
    "OperandoDetector": "service.sim.devices", "LightSource": "service.sim.devices",
    "HDF5OperandoDetector": "service.sim.devices", "HDF5FrameWriter": "service.sim.devices",
    "SimClock": "service.sim.devices", "WallClock": "service.sim.devices",
    "make_beamline": "service.sim.devices",
    "operando_cycle": "service.sim.plans", "default_frame_schedule": "service.sim.plans",
}

__all__ = ["DEFAULT_SCHEDULE", "AzoCycle", "PeakStates", "flatten_truth", "FrameSimulator",
           "default_geometry", "poni_dict", "write_default_poni", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'service.sim' has no attribute {name!r}")
