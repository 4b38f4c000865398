"""Code beside the service stays beside it: plan-side clients (service/plans), the benchmark
harness (service/bench) and training (service/train) are not imported by the service core; the
benchmark's lmfit baseline fails with one line naming the extra when lmfit is missing; the
commands' run wait gives up on a stalled run."""
import subprocess
import sys
import time
from types import SimpleNamespace

CORE = ("service.server", "service.api", "service.worker", "service.dispatch", "service.ingest")
BESIDE = ("service.plans", "service.bench", "service.train", "service.commands")


def test_service_core_imports_nothing_beside_it():
    code = (f"import sys\nfor m in {CORE!r}:\n    __import__(m)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({BESIDE!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bench_without_lmfit_says_which_extra_in_one_line():
    code = ("import sys\nsys.modules['lmfit'] = None\nfrom service.cli import main\n"
            "sys.exit(main(['bench', '--frames', '1']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'scatterflow[bench]'" in lines[0], out.stderr


class _Store:
    def __init__(self, runs):
        self.runs = runs

    def get(self, uid):
        return self.runs.get(uid)


def test_wait_finished_returns_finished_run_and_gives_up_on_a_stall():
    from service.commands.waiting import wait_finished
    done = SimpleNamespace(status="complete", frames_fitted=3, frames_final=3)
    stuck = SimpleNamespace(status="running", frames_fitted=2, frames_final=1)
    service = SimpleNamespace(store=_Store({"done": done, "stuck": stuck}))
    seen = []
    assert wait_finished(service, "done", 5.0, progress=lambda f, n: seen.append((f, n))) is done
    assert seen == [(3, 3)]
    t0 = time.monotonic()
    assert wait_finished(service, "stuck", 30.0, stall_s=0.3) is stuck
    assert time.monotonic() - t0 < 5.0
    t0 = time.monotonic()
    assert wait_finished(service, "never", 0.3) is None
    assert 0.3 <= time.monotonic() - t0 < 5.0
