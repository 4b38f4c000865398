"""A run whose start document names a calibrant recalibrates the service (in a worker process,
from its first frame), and the runs after it use the new geometry. Truth: pyFAI's
fake_calibration_image for a known tilted geometry; the configured PONI starts 8 % off in
distance and a few pixels off in beam centre."""
import functools
import time

import msgpack
import msgpack_numpy
import numpy as np
import pyFAI
import pytest
import zmq
from event_model import compose_run
from pyFAI.calibrant import get_calibrant
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from service.config import load_settings
from service.server import Service
from workers.geometry import Geometry

pytestmark = pytest.mark.slow
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
WAVELENGTH = 0.7e-10


def ai_at(dist, centre, rot1=0.0, rot2=0.0):
    ai = AzimuthalIntegrator(detector=pyFAI.detector_factory("Pilatus300k"), wavelength=WAVELENGTH)
    ai.setFit2D(dist * 1e3, centerX=centre[1] + 0.5, centerY=centre[0] + 0.5)
    ai.rot1, ai.rot2 = rot1, rot2
    return ai


def beam(ai):
    f = ai.getFit2D()
    return np.array([f["centerY"] - 0.5, f["centerX"] - 0.5]), f["directDist"] * 1e-3


def test_calibrant_run_sets_geometry_for_later_runs(tmp_path, free_port):
    truth = ai_at(0.15, (300.4, 240.8), rot1=-0.03, rot2=0.04)
    rows, cols = np.indices(truth.detector.shape)
    (br, bc), _ = beam(truth)
    beamstop = (np.hypot(rows - br, cols - bc) < 25) | ((np.abs(rows - br) < 6) & (cols > bc))
    np.save(tmp_path / "mask.npy", beamstop)
    (br0, bc0), d_direct = beam(truth)
    nominal = ai_at(d_direct * 1.08, (br0 - 4, bc0 + 3))          # what the beamline thought: no tilt
    Geometry.from_pyfai(nominal).to_poni(tmp_path / "nominal.poni")

    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"},
                             geometry={"poni": str(tmp_path / "nominal.poni"), "mask": str(tmp_path / "mask.npy")},
                             tiled={"enabled": False, "directory": str(tmp_path)}, results={"address": None},
                             api={"port": free_port()})
    service = Service(settings).start()
    try:
        joined = time.monotonic() + 1.0                             # slow joiner; the frame is made meanwhile
        cal = get_calibrant("CeO2")
        cal.wavelength = WAVELENGTH
        img = cal.fake_calibration_image(truth, Imax=500.0, Imin=10.0, resolution=0.08)
        frame = np.random.default_rng(7).poisson(np.clip(img, 0, None)).astype(np.int32)
        frame[truth.detector.mask.astype(bool)] = -1
        time.sleep(max(0.0, joined - time.monotonic()))
        send = lambda name, doc: pub.send(b" " + name.encode() + b" " + pack(doc))
        bundle = compose_run(metadata={"plan_name": "count", "calibrant": "CeO2"})
        desc = bundle.compose_descriptor(name="primary", data_keys={
            "det_image": {"source": "x", "dtype": "array", "shape": list(frame.shape), "dtype_numpy": "<i4"}})
        send("start", bundle.start_doc)
        send("descriptor", desc.descriptor_doc)
        send("event", desc.compose_event(data={"det_image": frame}, timestamps={"det_image": 0.0}, seq_num=1))
        send("stop", bundle.compose_stop())
        deadline = time.monotonic() + 120
        while service.calibrated_geometry is None and time.monotonic() < deadline:
            time.sleep(0.2)
        g = service.calibrated_geometry
        assert g is not None, "no calibration"
        (r, c), d = beam(g.to_pyfai())
        (r0, c0), d0 = beam(truth)
        assert np.hypot(r - r0, c - c0) < 0.05                      # pixels
        assert abs(d / d0 - 1) < 5e-4                                # 0.05 %
        assert service.status()["calibration"]["run"] == bundle.start_doc["uid"]
        assert pyFAI.load(service.calibration_info["poni_file"]).dist == pytest.approx(g.dist)
        # the next run is reduced with the calibrated geometry, not the configured PONI
        later = service.spec_for_run({"uid": "next", "time": 0.0})
        assert later.geometry == g and later.calibrant is None
    finally:
        service.close()
        pub.close(linger=0)
