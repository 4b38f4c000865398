"""Detector file formats besides HDF5, through the real router: TIFF and CBF sequences named by
areaDetector templates (ophyd v1 AD_TIFF / AD_CBF), Dectris Eiger master/data files (AD_EIGER2),
ophyd-async's TIFF writer under a RunEngine, and several frames per point.

Files are written by real writers (tifffile, fabio's TIFF and CBF writers; h5py with hdf5plugin's
bitshuffle/LZ4 laid out as the Eiger DCU does), the documents by event-model's composers or by
ophyd-async's own TIFF data logic. Each frame handed on must equal what was written (exactly),
in seq_num order; a point's several frames equal their sum (`reference_sum`, the plain version).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from event_model import compose_run
from fabio.cbfimage import CbfImage
from fabio.tifimage import TifImage

from service.config import IngestConfig
from service.detector_files import FrameSum, ad_template, point_frame, reference_sum, stream_template
from service.errors import RejectedInput
from service.ingest import DocumentRouter
from service.metrics import Metrics

from helpers import RecordingSink

hdf5plugin = pytest.importorskip("hdf5plugin")
tifffile = pytest.importorskip("tifffile")

AD_TIFF_TEMPLATE = "%s%s_%6.6d.tiff"          # ophyd FileStoreTIFF's stage_sigs
SHAPE = (24, 17)


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("scatterflow_rejected_total", {"reason": reason}) or 0


def router_for(root: Path, **config) -> tuple[DocumentRouter, Collect, Metrics]:
    sink, metrics = RecordingSink(), Metrics()
    cfg = IngestConfig(**{"allowed_roots": [str(root)], "file_retries": 2, "file_retry_delay_s": 0.01, **config})
    return DocumentRouter(sink, metrics, cfg), sink, metrics


def routed(router: DocumentRouter, docs: list[tuple[str, dict]]) -> None:
    for name, doc in docs:
        router.route(name, doc)
    assert router.drain()


def v1_run(spec: str, root: str, resource_path: str, resource_kwargs: dict, datum_kwargs: list[dict],
           key_shape: list[int], dtype_numpy: str = "<u2") -> list[tuple[str, dict]]:
    """Documents of an ophyd v1 area detector writing files (event-model's composers): one datum
    and one event (the datum_id, filled False) per point."""
    run = compose_run(metadata={"plan_name": "count"})
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "PV:XF:DET{Det}", "dtype": "array", "shape": key_shape,
                      "external": "FILESTORE:", "dtype_numpy": dtype_numpy}})
    res = run.compose_resource(spec=spec, root=root, resource_path=resource_path, resource_kwargs=resource_kwargs)
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)]
    for i, kwargs in enumerate(datum_kwargs):
        datum = res.compose_datum(datum_kwargs=kwargs)
        docs += [("datum", datum), ("event", desc.compose_event(
            data={"det_image": datum["datum_id"]}, timestamps={"det_image": time.time()},
            filled={"det_image": False}, seq_num=i + 1))]
    return docs + [("stop", run.compose_stop())]


def frames(n: int, dtype, seed: int = 0, high: int = 5000, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (n, *shape)).astype(dtype)


def write_tiff(path: Path, frame: np.ndarray, writer: str) -> None:
    if writer == "tifffile":
        tifffile.imwrite(path, frame)
    else:
        TifImage(data=frame).write(str(path))


# --------------------------------------------------------------------------- AD_TIFF
@pytest.mark.parametrize("writer,dtype", [("tifffile", np.uint16), ("tifffile", np.float32),
                                          ("fabio", np.uint32), ("fabio", np.int32)])
def test_ad_tiff_one_file_per_frame(tmp_path, writer, dtype):
    """ophyd FileStoreTIFF: resource_path the directory, {template, filename, frame_per_point},
    datum {point_number}; the files as tifffile / fabio write them."""
    truth = frames(4, dtype, seed=1)
    directory = tmp_path / "2026" / "05" / "01"
    directory.mkdir(parents=True)
    for k, frame in enumerate(truth):
        write_tiff(directory / f"a1b2c3_{k:06d}.tiff", frame, writer)
    router, sink, metrics = router_for(tmp_path)
    routed(router, v1_run("AD_TIFF", str(tmp_path), "2026/05/01",
                          {"template": AD_TIFF_TEMPLATE, "filename": "a1b2c3", "frame_per_point": 1},
                          [{"point_number": i} for i in range(4)], [1, *SHAPE], np.dtype(dtype).str))
    assert [f.seq_num for f in sink.frames] == [1, 2, 3, 4]
    for f, frame in zip(sink.frames, truth):
        assert f.data.dtype == frame.dtype
        np.testing.assert_array_equal(f.data, frame)
    assert sink.stopped and not _rejections(metrics)


def test_ad_tiff_still_being_written_is_waited_for(tmp_path):
    """A TIFF that exists but is not complete (the IOC is writing it) is read once it is."""
    truth = frames(2, np.uint16, seed=2)
    for k, frame in enumerate(truth):
        tifffile.imwrite(tmp_path / f"scan_{k:06d}.tiff", frame)
    whole = (tmp_path / "scan_000001.tiff").read_bytes()
    (tmp_path / "scan_000001.tiff").write_bytes(whole[:len(whole) // 3])
    finish = threading.Timer(0.3, lambda: (tmp_path / "scan_000001.tiff").write_bytes(whole))
    router, sink, _ = router_for(tmp_path, file_retries=100, file_retry_delay_s=0.02)
    t0 = time.monotonic()
    finish.start()
    routed(router, v1_run("AD_TIFF", str(tmp_path), ".", {"template": AD_TIFF_TEMPLATE, "filename": "scan"},
                          [{"point_number": 0}, {"point_number": 1}], [1, *SHAPE]))
    assert time.monotonic() - t0 >= 0.25
    assert [f.seq_num for f in sink.frames] == [1, 2]
    np.testing.assert_array_equal(sink.frames[1].data, truth[1])


def test_ad_tiff_several_frames_per_point_summed(tmp_path):
    """frame_per_point 3 (cam.num_images 3): point n is files 3n..3n+2, handed on as their sum;
    Dectris-style flags (2**16 - 1) survive it."""
    truth = frames(6, np.uint16, seed=3, high=30000)
    truth[:, 5, :] = 2**16 - 1                              # a gap row in every frame
    truth[4, 0, 0] = 2**16 - 2                              # one bad pixel in one frame
    for k, frame in enumerate(truth):
        tifffile.imwrite(tmp_path / f"img_{k:06d}.tiff", frame)
    router, sink, _ = router_for(tmp_path, detector_field="det_image")   # see the report: ingest picks [1, r, c] only
    routed(router, v1_run("AD_TIFF", str(tmp_path), "", {"template": AD_TIFF_TEMPLATE, "filename": "img",
                                                         "frame_per_point": 3},
                          [{"point_number": 0}, {"point_number": 1}], [3, *SHAPE]))
    assert [f.seq_num for f in sink.frames] == [1, 2]
    for f, stack in zip(sink.frames, (truth[:3], truth[3:])):
        np.testing.assert_array_equal(f.data, reference_sum(stack))
    first = sink.frames[0].data
    assert first.dtype == np.uint32                          # three uint16 frames of up to 30000 overflow uint16
    assert (first[5] == 2**32 - 1).all() and sink.frames[1].data[0, 0] == 2**32 - 2
    ok = np.ones(SHAPE, bool)
    ok[5] = False
    np.testing.assert_array_equal(first[ok], truth[:3].astype(np.int64).sum(axis=0)[ok])


def test_ophyd_async_hdf5_several_frames_per_event(tmp_path):
    """An ophyd-async HDF5 stream whose data key is [2, rows, cols] (collections_per_event 2):
    stream_datum index i is dataset rows 2i, 2i+1, summed (it used to be refused)."""
    truth = frames(6, np.uint32, seed=9, high=2**16)
    with h5py.File(tmp_path / "det.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=truth, chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4"))
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det": {"source": "sim", "dtype": "array", "shape": [2, *SHAPE], "external": "STREAM:", "dtype_numpy": "<u4"}})
    sres = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{tmp_path}/det.h5",
                                       data_key="det", parameters={"dataset": "/entry/data/data",
                                                                   "chunk_shape": [1, *SHAPE]})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
            ("stream_resource", sres.stream_resource_doc)]
    for i in range(3):
        docs.append(("stream_datum", sres.compose_stream_datum(indices={"start": i, "stop": i + 1},
                                                               seq_nums={"start": i + 1, "stop": i + 2},
                                                               descriptor=desc.descriptor_doc)))
        docs.append(("event", desc.compose_event(data={}, timestamps={}, seq_num=i + 1)))
    router, sink, metrics = router_for(tmp_path)
    routed(router, docs + [("stop", run.compose_stop())])
    assert [f.seq_num for f in sink.frames] == [1, 2, 3]
    for i, f in enumerate(sink.frames):
        np.testing.assert_array_equal(f.data, truth[2 * i:2 * i + 2].astype(np.int64).sum(axis=0))
    assert not _rejections(metrics)


# --------------------------------------------------------------------------- AD_CBF
def test_ad_cbf_pilatus_files(tmp_path):
    """Pilatus CBF (byte offset, int32, -1 gaps and -2 bad pixels) as fabio writes them; files
    numbered from initial_number (default 1, as the camserver)."""
    truth = frames(3, np.int32, seed=4, high=2**20)
    truth[:, :, 7] = -1
    truth[1, 3, 3] = -2
    for k, frame in enumerate(truth, start=1):
        CbfImage(data=frame).write(str(tmp_path / f"pil_{k:05d}.cbf"))
    router, sink, metrics = router_for(tmp_path)
    routed(router, v1_run("AD_CBF", str(tmp_path), "", {"template": "%s%s_%5.5d.cbf", "filename": "pil",
                                                        "frame_per_point": 1},
                          [{"point_number": i} for i in range(3)], [1, *SHAPE], "<i4"))
    assert [f.seq_num for f in sink.frames] == [1, 2, 3]
    for f, frame in zip(sink.frames, truth):
        assert f.data.dtype == np.int32
        np.testing.assert_array_equal(f.data, frame)
    assert rejected(metrics, "file_unavailable") == 0


# --------------------------------------------------------------------------- Eiger
def write_eiger(prefix: Path, seq_id: int, stack: np.ndarray, images_per_file: int,
                data_dir: Path | None = None) -> None:
    """An Eiger series as the DCU lays it out: ``<prefix>_<seq>_master.h5`` whose
    ``/entry/data/data_NNNNNN`` are external links to ``<prefix>_<seq>_data_NNNNNN.h5``
    (``/entry/data/data``, bitshuffle/LZ4, one frame per chunk), detectorSpecific nimages/ntrigger."""
    base = f"{prefix}_{seq_id}"
    with h5py.File(f"{base}_master.h5", "w") as master:
        specific = master.create_group("/entry/instrument/detector/detectorSpecific")
        specific["nimages"], specific["ntrigger"] = np.uint32(len(stack)), np.uint32(1)
        specific["pixel_mask"] = np.zeros(stack.shape[1:], np.uint32)
        data = master.require_group("/entry/data")
        data.attrs["NX_class"] = "NXdata"
        for k, lo in enumerate(range(0, len(stack), images_per_file), start=1):
            part = stack[lo:lo + images_per_file]
            name = f"data_{k:06d}"
            path = Path(data_dir or Path(base).parent) / f"{Path(base).name}_{name}.h5"
            with h5py.File(path, "w") as f:
                ds = f.create_dataset("/entry/data/data", data=part, chunks=(1, *stack.shape[1:]),
                                      **hdf5plugin.Bitshuffle(cname="lz4"))
                ds.attrs["image_nr_low"], ds.attrs["image_nr_high"] = lo + 1, lo + len(part)
            data[name] = h5py.ExternalLink(path.name if data_dir is None else str(path), "/entry/data/data")


def test_eiger_series_one_frame_per_point(tmp_path):
    """NSLS-II's Eiger plugin: one series (seq_id) per point, {images_per_file}; each frame read
    from its bitshuffle/LZ4 data file through the master's external link."""
    truth = frames(3, np.uint32, seed=5, high=2**16)
    truth[:, :, 4] = 2**32 - 1
    for i, frame in enumerate(truth):
        write_eiger(tmp_path / "d2e3f4", 11 + i, frame[np.newaxis], images_per_file=1000)
    with h5py.File(tmp_path / "d2e3f4_11_data_000001.h5", "r") as f:
        assert f["/entry/data/data"].id.get_create_plist().get_filter(0)[0] == hdf5plugin.BSHUF_ID
    router, sink, _ = router_for(tmp_path)
    routed(router, v1_run("AD_EIGER2", str(tmp_path), "d2e3f4", {"images_per_file": 1000},
                          [{"seq_id": 11 + i} for i in range(3)], [1, *SHAPE], "<u4"))
    assert [f.seq_num for f in sink.frames] == [1, 2, 3]
    for f, frame in zip(sink.frames, truth):
        assert f.data.dtype == np.uint32
        np.testing.assert_array_equal(f.data, frame)


def test_eiger_series_over_two_data_files(tmp_path):
    """One series of 5 frames, 3 per data file: frame_num picks one frame of the stack (across the
    file boundary); without frame_num the point is the whole series, summed."""
    truth = frames(5, np.uint32, seed=6, high=2**20)
    write_eiger(tmp_path / "ser", 3, truth, images_per_file=3)
    assert (tmp_path / "ser_3_data_000002.h5").exists()
    router, sink, _ = router_for(tmp_path)
    routed(router, v1_run("AD_EIGER2", str(tmp_path), "ser", {"images_per_file": 3},
                          [{"seq_id": 3, "frame_num": i} for i in range(5)], [1, *SHAPE], "<u4"))
    assert [f.seq_num for f in sink.frames] == [1, 2, 3, 4, 5]
    for f, frame in zip(sink.frames, truth):
        np.testing.assert_array_equal(f.data, frame)

    second = tmp_path / "ser_3_data_000002.h5"                 # the DCU has not closed the 2nd data file yet
    os.replace(second, tmp_path / "later.h5")
    finish = threading.Timer(0.3, lambda: os.replace(tmp_path / "later.h5", second))
    router, sink, _ = router_for(tmp_path, detector_field="det_image", file_retries=100, file_retry_delay_s=0.02)
    finish.start()
    routed(router, v1_run("AD_EIGER", str(tmp_path), "ser", {"frame_per_point": 3}, [{"seq_id": 3}],
                          [5, *SHAPE], "<u4"))
    (f,) = sink.frames                                         # all nimages = 5 frames, once both files are there
    np.testing.assert_array_equal(f.data, truth.astype(np.int64).sum(axis=0))
    assert f.data.dtype == np.uint32


# --------------------------------------------------------------------------- ophyd-async TIFF writer
def tiff_detector(directory: Path, frames_per_event: int, shape: tuple[int, int]):
    """An ophyd-async StandardDetector whose data logic is ophyd-async's own areaDetector TIFF
    writer logic (`ADMultipartDataLogic`, as `ADWriterFactory.tiff` builds it); the IOC is
    replaced by soft signals and an acquire logic that writes each frame with tifffile at the
    name the writer's template gives, counting it in num_captured as the plugin does."""
    from ophyd_async.core import (DetectorAcquireLogic, DetectorTriggerLogic, Device, StandardDetector,
                                  StaticFilenameProvider, StaticPathProvider, TriggerInfo, soft_signal_rw)
    from ophyd_async.epics.adcore import (ADBaseColorMode, ADBaseDataType, ADFileWriteMode, ADMultipartDataLogic,
                                          NDArrayDescription)

    class FileWriterSignals(Device):          # the NDFileTIFF plugin's records the data logic uses
        def __init__(self):
            for name, kind in [("create_directory", int), ("file_path", str), ("file_name", str),
                               ("file_template", str), ("auto_increment", bool), ("file_number", int),
                               ("num_capture", int), ("capture", bool), ("num_captured", int)]:
                setattr(self, name, soft_signal_rw(kind))
            self.file_write_mode = soft_signal_rw(ADFileWriteMode)
            self.file_path_exists = soft_signal_rw(bool, initial_value=True)
            super().__init__()

    class Trigger(DetectorTriggerLogic):
        exposures = 0

        async def prepare_internal(self, num, livetime, deadtime):
            self.exposures = num

        async def default_trigger_info(self):          # cam.num_images, as trigger_info_from_num_images
            return TriggerInfo(collections_per_event=frames_per_event)

    class Acquire(DetectorAcquireLogic):
        def __init__(self, writer, trigger):
            self.writer, self.trigger, self.written = writer, trigger, []

        async def start_acquiring(self):
            w = self.writer
            for _ in range(self.trigger.exposures):
                k = await w.file_number.get_value()
                path = (await w.file_template.get_value()) % (await w.file_path.get_value(),
                                                              await w.file_name.get_value(), k)
                frame = frames(1, np.uint16, seed=100 + len(self.written), shape=shape)[0]
                tifffile.imwrite(path, frame)
                self.written.append(frame)
                await w.file_number.set(k + 1)
                await w.num_captured.set(await w.num_captured.get_value() + 1)

        async def wait_for_idle(self):
            pass

        async def ensure_stopped(self):
            pass

    class TiffDetector(StandardDetector):
        def __init__(self, name=""):
            self.tiff = FileWriterSignals()
            trigger = Trigger()
            self.acquire = Acquire(self.tiff, trigger)
            description = NDArrayDescription(
                shape_signals=[soft_signal_rw(int, 0), soft_signal_rw(int, shape[0]), soft_signal_rw(int, shape[1])],
                data_type_signal=soft_signal_rw(ADBaseDataType, ADBaseDataType.UINT16),
                color_mode_signal=soft_signal_rw(ADBaseColorMode, ADBaseColorMode.MONO))
            paths = StaticPathProvider(StaticFilenameProvider("scan"), directory)
            self.add_detector_logics(trigger, self.acquire, ADMultipartDataLogic(
                array_description=description, path_provider=paths, writer=self.tiff, extension=".tiff",
                mimetype="multipart/related;type=image/tiff"))
            super().__init__(name=name)

    return TiffDetector(name="det")


@pytest.mark.parametrize("frames_per_event", [1, 3])
def test_ophyd_async_tiff_writer_under_a_run_engine(tmp_path, monkeypatch, frames_per_event):
    """stream_resource (multipart/related;type=image/tiff, directory uri, template scan_{:06d}.tiff)
    and stream_datum documents from ophyd-async; frames_per_event 3 (data key [3, rows, cols]):
    each event's three files, summed."""
    import bluesky.plans as bp
    from bluesky.run_engine import RunEngine
    from ophyd_async.core import init_devices

    monkeypatch.setenv("OPHYD_ASYNC_PRESERVE_DETECTOR_STATE", "YES")     # trigger() reads num_images
    RE = RunEngine({}, call_returns_result=True)                         # the bluesky event loop first
    with init_devices():
        det = tiff_detector(tmp_path, frames_per_event, (12, 10))
    router, sink, metrics = router_for(tmp_path)
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE.subscribe(lambda name, doc: router.route(name, doc))
    RE(bp.count([det], num=3))
    assert router.drain()
    (sres,) = [d for n, d in docs if n == "stream_resource"]
    assert sres["mimetype"] == "multipart/related;type=image/tiff"
    assert sres["parameters"]["template"] == "scan_{:06d}.tiff" and sres["uri"] == f"file://localhost{tmp_path}/"
    (desc,) = [d for n, d in docs if n == "descriptor"]
    assert desc["data_keys"]["det"]["shape"] == [frames_per_event, 12, 10]
    written = det.acquire.written
    assert len(written) == 3 * frames_per_event == len(list(tmp_path.glob("scan_*.tiff")))
    assert [f.seq_num for f in sink.frames] == [1, 2, 3]
    for i, f in enumerate(sink.frames):
        stack = np.stack(written[i * frames_per_event:(i + 1) * frames_per_event])
        np.testing.assert_array_equal(f.data, stack[0] if frames_per_event == 1 else reference_sum(stack))
    assert sum(v for (n, labels), v in _rejections(metrics).items()) == 0


def _rejections(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in metrics.registry.collect()
            for s in fam.samples if s.name == "scatterflow_rejected_total" and s.value}


# --------------------------------------------------------------------------- refusals
def test_missing_file_and_paths_outside_the_roots_refused(tmp_path):
    """A missing frame file is file_unavailable (the others of the run are read); a resource
    outside ingest.allowed_roots, a TIFF symlinked outside and an Eiger data file linked outside
    are path_outside_root."""
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    truth = frames(3, np.uint16, seed=7)
    for k, frame in enumerate(truth):
        tifffile.imwrite(allowed / f"s_{k:06d}.tiff", frame)
        tifffile.imwrite(secret / f"s_{k:06d}.tiff", frame)
    (allowed / "s_000001.tiff").unlink()
    router, sink, metrics = router_for(allowed)
    kwargs = {"template": AD_TIFF_TEMPLATE, "filename": "s", "frame_per_point": 1}
    points = [{"point_number": i} for i in range(3)]
    routed(router, v1_run("AD_TIFF", str(allowed), "", kwargs, points, [1, *SHAPE]))
    assert [f.seq_num for f in sink.frames] == [1, 3]
    assert rejected(metrics, "file_unavailable") == 1

    sink.frames.clear()
    routed(router, v1_run("AD_TIFF", str(secret), "", kwargs, points, [1, *SHAPE]))
    assert sink.frames == [] and rejected(metrics, "path_outside_root") == 1 + 3     # the resource, each event

    (allowed / "s_000001.tiff").symlink_to(secret / "s_000001.tiff")
    routed(router, v1_run("AD_TIFF", str(allowed), "", kwargs, points, [1, *SHAPE]))
    assert [f.seq_num for f in sink.frames] == [1, 3] and rejected(metrics, "path_outside_root") == 5

    write_eiger(allowed / "e", 1, truth[:1].astype(np.uint32), images_per_file=10, data_dir=secret)
    sink.frames.clear()
    routed(router, v1_run("AD_EIGER2", str(allowed), "e", {"images_per_file": 10}, [{"seq_id": 1}], [1, *SHAPE],
                          "<u4"))
    assert sink.frames == [] and rejected(metrics, "path_outside_root") == 6

    bad = v1_run("AD_TIFF", str(allowed), "", {**kwargs, "template": "%s%s_%99999999d.tiff"}, points[:1], [1, *SHAPE])
    routed(router, bad)
    assert rejected(metrics, "bad_resource") == 1 and sink.frames == []
    assert rejected(metrics, "unknown_datum") + rejected(metrics, "unknown_resource") >= 1


# --------------------------------------------------------------------------- templates and the sum
def test_templates_are_parsed_not_trusted():
    assert ad_template("%s%s_%6.6d.tiff")("/d/", "f", 7) == "/d/f_000007.tiff"
    assert ad_template("%s%s%05d.cbf")("/d/", "f", 12) == "/d/f00012.cbf"
    for bad in ["%s%s_%999999999d.tif", "%(x)s%s%d", "%s_%d.tif", "%s%s%s%d", "%s%s_%d%", "%s%s_%x.tif", 7, ""]:
        with pytest.raises(RejectedInput, match="bad_resource"):
            ad_template(bad)
    assert stream_template("scan_{:06d}.tiff")(42) == "scan_000042.tiff"
    for bad in ["{0.__class__}", "{:99999999d}", "{}{}", "scan.tiff", "{:06d}}"]:
        with pytest.raises(RejectedInput, match="bad_resource"):
            stream_template(bad)


@pytest.mark.parametrize("dtype,high,flags,out", [
    (np.uint16, 30000, [2**16 - 1, 2**16 - 2], np.uint32),   # overflows uint16: uint32, flags moved to its top
    (np.uint16, 100, [2**16 - 1], np.uint16),                # fits: dtype kept
    (np.uint8, 200, [255], np.uint16),
    (np.uint32, 2**31, [2**32 - 1], np.int64),               # overflows uint32: int64, flags -1 / -2
    (np.int32, 2**20, [-1, -2], np.int32),                   # Pilatus
    (np.int16, 20000, [-1], np.int32),
    (np.float32, 1000, [], np.float32),
])
def test_frame_sum_matches_the_reference_in_chunks(dtype, high, flags, out):
    rng = np.random.default_rng(8)
    stack = rng.integers(0, high, (7, 5, 6)).astype(dtype)
    for j, flag in enumerate(flags):
        stack[rng.integers(0, 7, 4), rng.integers(0, 5, 4), rng.integers(0, 6, 4)] = flag
        stack[:, j, 0] = flag                                 # flagged in every frame
    total = FrameSum()
    for chunk in (stack[:2], stack[2:3], stack[3:]):
        total.add(chunk)
    result = total.result()
    assert result.dtype == out and total.count == 7
    np.testing.assert_array_equal(result, reference_sum(stack))
    np.testing.assert_array_equal(point_frame([stack[:4], stack[4:]]), result)
    if dtype == np.uint32:
        assert result[0, 0] == -1
    if not flags:
        np.testing.assert_array_equal(result, stack.astype(np.float64).sum(axis=0).astype(dtype))
    single = stack[:1]
    assert point_frame([single]) is not None and np.shares_memory(point_frame([single]), single)


def test_frames_of_one_point_must_agree():
    total = FrameSum()
    total.add(np.zeros((1, 4, 4), np.uint16))
    with pytest.raises(RejectedInput, match="wrong_shape"):
        total.add(np.zeros((1, 4, 5), np.uint16))
    with pytest.raises(RejectedInput, match="frame_out_of_range"):
        point_frame([])
    assert os.path.basename(ad_template(AD_TIFF_TEMPLATE)("/x/", "y", 0)) == "y_000000.tiff"
