import os
import socket

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CI box has 2 cores shared by several jobs: small kernels and FFTs run faster on one
    torch thread."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_tiled(tmp_path_factory):
    """One real embedded Tiled server for the session, in a process of its own
    (helpers.TiledProcess), started at its first use, in the background: each start costs
    seconds (`tiled catalog init` in a subprocess); its ``uri`` and ``port`` wait until it
    answers. For tests that write runs of their own (distinct keys) and read them back with
    fresh clients; a test that stops, restarts or cuts its server itself, or needs Tiled only
    after its service started, starts its own."""
    pytest.importorskip("tiled")
    from helpers import TiledProcess
    server = TiledProcess(tmp_path_factory.mktemp("shared_tiled"), api_key="sharedtiledkey")
    yield server
    server.close()


@pytest.fixture
def free_port():
    def _free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return _free


_exit_status = {"code": None}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """Guard: a thread or multiprocessing feeder left behind by a server a test started must not
    keep the interpreter alive after the summary (CI would wait for its time limit). The
    dispatcher cancels its queue joins itself; this only makes a regression fail fast."""
    import os
    import sys
    if _exit_status["code"] is not None and os.environ.get("SCATTERFLOW_TEST_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
