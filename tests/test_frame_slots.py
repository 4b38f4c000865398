"""Shared-memory frame hand-off: another process reads exactly the frames written, a busy
pool falls back to the queue, slots grow for bigger batches, and nothing is left in /dev/shm."""
import multiprocessing as mp

import numpy as np
import pytest

from service.frame_slots import SlotPool, SlotReader


def _reader(refs, out):
    reader = SlotReader()
    out.put([(reader.read(r).sum(dtype=np.float64), reader.read(r).shape, reader.read(r).dtype.str) for r in refs])


def test_other_process_reads_the_frames_written(tmp_path):
    rng = np.random.default_rng(0)
    pool = SlotPool("t", 3, directory=tmp_path)
    small = [rng.integers(0, 1000, (64, 48), dtype=np.uint32) for _ in range(5)]
    big = [rng.random((128, 96)).astype(np.float32) for _ in range(7)]
    refs = [pool.put(small), pool.put(big)]
    assert all(r is not None for r in refs)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_reader, args=(refs, out))
    p.start()
    got = out.get(timeout=60)
    p.join(10)
    assert got[0] == (np.stack(small).sum(dtype=np.float64), (5, 64, 48), np.dtype(np.uint32).str)
    assert got[1][1:] == ((7, 128, 96), np.dtype(np.float32).str)
    assert got[1][0] == pytest.approx(np.stack(big).sum(dtype=np.float64), rel=1e-12)
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_busy_pool_falls_back_and_released_slot_is_reused(tmp_path):
    pool = SlotPool("t", 2, directory=tmp_path)
    a = pool.put([np.ones((4, 4))])
    b = pool.put([np.ones((4, 4))])
    assert pool.put([np.ones((4, 4))]) is None and pool.fallbacks == 1
    pool.release(a)
    c = pool.put([np.full((4, 4), 2.0)])
    assert c is not None and c.slot == a.slot
    assert SlotReader().read(c)[0, 0, 0] == 2.0
    # a larger batch in a released slot gets a new (bigger) file; the reader maps the new one
    pool.release(b)
    reader = SlotReader()
    assert reader.read(pool.put([np.zeros((2, 2))])).shape == (1, 2, 2)
    pool.release_all()
    grown = pool.put([np.arange(10_000.0).reshape(100, 100)] * 3)
    assert reader.read(grown)[2, 99, 99] == 9999.0
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_pool_size():
    with pytest.raises(ValueError, match="n_slots"):
        SlotPool("t", 0)
