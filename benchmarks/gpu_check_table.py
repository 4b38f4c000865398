"""The one table of benchmarks/gpu_check.sh (step, figure, unit, goal, met?), read from its
work folder: each step's NAME.rc (exit status), NAME.log and JSON output.

    python benchmarks/gpu_check_table.py WORK SECONDS   # print the table, write WORK/gpu_check.md
    python benchmarks/gpu_check_table.py --env PATH     # the machine's facts as JSON (the env step)

Goals (the issue): integration >= 50k frames/s of 1 Mpx on the device and >= 80 % of the PCIe
bandwidth with the host-to-device copy; fits >= 10^6/s (3 pseudo-Voigt + line, 1000 points);
end to end >= 2.5 Gpixel/s with p99 latency <= 100 ms. A step that failed is a FAILED row with
the reason (the last error line of its log).
"""
from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

INT_FPS_GOAL = 50_000       # frames/s of Eiger1M (1.1 Mpx), frames already on the device
PCIE_GOAL = 80.0            # % of the raw pinned host-to-device bandwidth, integrating with the copy
FIT_GOAL = 1e6              # fits/s
E2E_GPX_GOAL = 2.5          # Gpixel/s sustained through the service
E2E_P99_GOAL_MS = 100.0     # ms, p99 latency frame arrival -> published provisional fit


def env_facts(path: str) -> None:
    """Python, torch, CUDA and GPU, CPU count, and which optional packages import (JSON to path)."""
    import importlib
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                 "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
    for mod in ("pyFAI", "lmfit", "zmq", "fastapi", "bluesky", "tiled", "hdf5plugin"):
        try:
            m = importlib.import_module(mod)
            info[mod] = str(getattr(m, "__version__", None) or getattr(m, "version", "yes"))
        except Exception:    # noqa: BLE001 - any failure means "not usable here"
            info[mod] = None
    print(json.dumps(info, indent=1))
    Path(path).write_text(json.dumps(info))


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, step, figure, unit="", goal="", met="-"):
        self.rows.append((step, figure, unit, goal, met))

    def failed(self, step, why):
        """A step that failed or was skipped: its reason as the figure; its goals are not met."""
        self.add(step, why, "", "", "NO")

    def check(self, step, value, unit, goal_text, ok: bool, fmt="{:,.0f}"):
        self.add(step, fmt.format(value), unit, goal_text, "yes" if ok else "NO")

    def markdown(self) -> str:
        head = ("step", "figure", "unit", "goal", "met?")
        cells = [head] + [tuple(str(c).replace("|", "/") for c in r) for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(5)]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                         + [line(r) for r in cells[1:]])


def failure(work: Path, name: str) -> str | None:
    """None when step `name` exited 0; else why it did not (timeout, skipped, the log's last error)."""
    rc_file = work / f"{name}.rc"
    rc = rc_file.read_text().strip() if rc_file.exists() else "not run"
    if rc == "0":
        return None
    if rc in ("skipped", "not run"):
        return "SKIPPED: no time left in the budget" if rc == "skipped" else "FAILED: not run"
    if rc in ("124", "137"):
        limit = work / f"{name}.limit"
        return f"FAILED: timeout after {limit.read_text().strip() if limit.exists() else '?'} s (rc {rc})"
    return f"FAILED (rc {rc}): {last_error(work / f'{name}.log')}"


def last_error(log: Path) -> str:
    """The log's last line that names an error, else its last non-empty line (120 characters)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if re.search(r"Error|Exception|error:|FAILED|Killed", ln)]
    text = (errors or lines or ["no output"])[-1]
    return text[:120]


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_rows(t: Table, work: Path) -> None:
    why = failure(work, "tests")
    xml = work / "tests.xml"
    if not xml.exists():
        t.failed("CUDA tests (pytest -m gpu)", why or "FAILED: no junit report")
        return
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    bad = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    figure = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    if bad:
        figure += ": " + ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
    if n["failures"] or n["errors"]:
        met = "NO"
    elif passed:
        met = "yes"
    else:
        met = "-"          # nothing ran: all skipped (no CUDA)
    if why and "timeout" in why:
        figure, met = why, "NO"
    t.add("CUDA tests (pytest -m gpu)", figure, "tests", "all pass", met)


def integrate_rows(t: Table, work: Path) -> None:
    why = failure(work, "integrate")
    data = load_json(work / "integrate.json")
    if why or not data:
        t.failed("integrate Eiger1M", why or "FAILED: no figures (integrate.json)")
        return
    d = data[0]
    b, mpx = d["batch"], d["pixels"] / 1e6
    rows = {(r["method"], r["label"]): r for r in d["rows"]}

    def fps(method, key):
        hits = [r["fps"] for (m, label), r in rows.items() if m == method and key in label]
        return hits[0] if hits else None
    pyfai = fps("bbox", "pyFAI integrate1d_ng")
    if pyfai:
        t.add(f"integrate {d['detector']} {mpx:.2f} Mpx: pyFAI integrate1d_ng bbox csr, CPU", f"{pyfai:,.1f}",
              "frames/s", "reference")
    if d["device"].startswith("cuda"):
        bw = d.get("h2d_pinned_bytes_per_s")
        t.add(f"integrate: raw pinned host-to-device copy ({b} frames)", f"{bw / 1e9:.1f}", "GB/s", "reference")
        for method in ("bbox", "no"):
            on_dev, with_copy = fps(method, "no H2D"), fps(method, "with H2D")
            if on_dev:
                t.check(f"integrate {method}, batch {b}, frames on the GPU", on_dev, "frames/s",
                        f">= {INT_FPS_GOAL:,}", on_dev >= INT_FPS_GOAL)
            if with_copy and bw:
                pct = 100 * with_copy * d["frame_bytes"] / bw
                t.add(f"integrate {method}, batch {b}, with the copy from pinned memory", f"{with_copy:,.0f}",
                      "frames/s", "")
                t.check(f"integrate {method}: copy + integration as share of PCIe", pct, "% of H2D",
                        f">= {PCIE_GOAL:.0f} %", pct >= PCIE_GOAL, "{:.0f}")
        best = fps("bbox", "no H2D")
        if best and pyfai:
            t.add("integrate bbox on the GPU vs pyFAI (CPU)", f"{best / pyfai:,.0f}", "x", "")
    else:
        for method in ("bbox", "no"):
            ours = fps(method, f"ours batch {b} (numpy in)")
            if ours:
                t.add(f"integrate {method}, batch {b}, {d['device']}", f"{ours:,.1f}", "frames/s", "")
        t.add("integrate: on-GPU, copy and PCIe figures", f"n/a (device {d['device']})")


FIT_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<n>\d+)\s+(?P<ms>[\d.]+)\s+(?P<fps>[\d.]+)\s+[\d.]+\s+[\d.]+\s*$")


def fit_rows(t: Table, work: Path) -> None:
    why = failure(work, "fit")
    log = work / "fit.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    rows = [(m["name"], float(m["fps"])) for m in map(FIT_ROW.match, text.splitlines()) if m]
    if why or not rows:
        t.failed("fit (bench_fit.py)", why or "FAILED: no rows in bench_fit.py's output")
        return
    batched = []
    for name, fps in rows:
        if name.startswith("fit_batch"):
            batched.append((fps, name))
            t.add(f"fit: {name}", f"{fps:,.0f}", "fits/s", "")
        else:
            t.add(f"fit: {name}", f"{fps:,.0f}", "fits/s", "reference")
    if batched:
        fps, name = max(batched)
        t.check(f"fit: best ({name})", fps, "fits/s", f">= {FIT_GOAL:,.0f}", fps >= FIT_GOAL)
    m = re.search(r"max \|diff\| = (\S+) stderr; batched converged fraction (\S+)", text)
    if m:
        t.add("fit: centres vs curve_fit, largest difference", m[1], "stderr", "")
        t.add("fit: converged fraction", m[2], "", "")


def e2e_rows(t: Table, work: Path, detector: str) -> None:
    name = f"e2e_{detector}"
    why = failure(work, name)
    r = load_json(work / f"{name}.json")
    if why or not r:
        t.failed(f"scatterflow bench {detector}", why or f"FAILED: no figures ({name}.json)")
        return
    where = f"{detector} {r['mode']}, {r['rate_requested']:.0f} frames/s asked, {r['frames']} frames"
    gpx = r["gpixel_per_s"] or 0.0
    t.add(f"e2e {where}: sustained", f"{r['fps'] or 0:,.1f}", "frames/s", "")
    t.check(f"e2e {detector}: sustained", gpx, "Gpixel/s", f">= {E2E_GPX_GOAL}", gpx >= E2E_GPX_GOAL, "{:.3f}")
    p99 = r["latency_provisional"][1]
    if p99 is None:
        t.add(f"e2e {detector}: latency p99 to provisional fit", "none measured", "ms", f"<= {E2E_P99_GOAL_MS:.0f}",
              "NO")
    else:
        t.check(f"e2e {detector}: latency p99 to provisional fit", 1e3 * p99, "ms", f"<= {E2E_P99_GOAL_MS:.0f}",
                1e3 * p99 <= E2E_P99_GOAL_MS)
    p99f = r["latency_final"][1]
    t.add(f"e2e {detector}: latency p99 to final fit (window lookahead)",
          "none measured" if p99f is None else f"{1e3 * p99f:,.0f}", "ms", "")
    lost = r["lost"] + r["dropped"] + r["failed"]
    t.add(f"e2e {detector}: fitted / lost / dropped / failed",
          f"{r['fitted']} / {r['lost']:.0f} / {r['dropped']:.0f} / {r['failed']:.0f} of {r['frames']}", "frames",
          "none lost", "yes" if lost == 0 and r["fitted"] == r["frames"] else "NO")
    t.add(f"e2e {detector}: worker devices, backlog at sender stop",
          f"{', '.join(r['devices'])}; {r['backlog']}", "frames", "")
    if r.get("baseline_fps"):
        t.add(f"e2e {detector}: pyFAI + lmfit per frame (baseline)", f"{r['baseline_fps']:,.1f}", "frames/s",
              "reference")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--env"]:
        env_facts(argv[1])
        return 0
    work, seconds = Path(argv[0]), argv[1] if len(argv) > 1 else "?"
    env = load_json(work / "env.json") or {}
    quick = os.environ.get("QUICK") == "1"
    t = Table()
    wheels = (work / "wheels.rc").read_text().strip() if (work / "wheels.rc").exists() else "?"
    if wheels not in ("0", "skipped"):
        t.failed("wheels (.whl -> /tmp/site)", f"FAILED (rc {wheels}): {last_error(work / 'wheels.log')}")
    if env:
        gpu = env.get("gpu") or "no CUDA device"
        t.add("machine", f"{gpu}; torch {env['torch']} (CUDA {env['cuda']}); Python {env['python']}; "
                         f"{env['cpus']} CPUs")
        t.add("packages", "; ".join(f"{k} {v or 'MISSING'}" for k, v in env.items()
                                    if k in ("pyFAI", "lmfit", "zmq", "fastapi", "bluesky", "tiled", "hdf5plugin")))
    else:
        t.failed("machine", failure(work, "env") or "FAILED: no env.json")
    tests_rows(t, work)
    integrate_rows(t, work)
    fit_rows(t, work)
    for detector in ("Eiger1M", "Eiger4M"):
        e2e_rows(t, work, detector)
    title = (f"gpu_check ({'quick, small sizes' if quick else 'full'}): {seconds} s in all; "
             f"goals from the issue; 'reference' rows are the baselines")
    text = f"{title}\n\n{t.markdown()}\n"
    print(text)
    (work / "gpu_check.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
