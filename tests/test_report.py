"""The run report: a run written into a real embedded Tiled by TiledPublisher, from simulated
azopolymer profiles (service.sim, Poisson noise) fitted by workers.temporal.TrajectoryFitter,
read back by `write_report` and checked against the Tiled data (read independently here) and
the simulator's truth. One embedded server (Tiled allows one per process), about 15 s to start.
"""
from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tiled")
pytestmark = pytest.mark.slow

N_FRAMES, BATCH, N_BINS = 24, 6, 350
SCHEDULE = ((0.0, "dark"), (8.0, "uv"), (18.0, "visible"))


def simulated_run():
    """(seq, time, q, intensity, sigma, truth): pyFAI-like mean-per-bin profiles of the cycle,
    Poisson counts over K pixels per bin, sigma = sqrt(counts) / K (pyFAI's Poisson model)."""
    from service.sim import AzoCycle
    rng = np.random.default_rng(11)
    cycle = AzoCycle(schedule=SCHEDULE)
    q = np.linspace(2.0, 19.5, N_BINS)
    t = np.arange(N_FRAMES, dtype=float)                    # 1 s per frame
    K = 400.0
    expected = cycle.profile(q, t)                          # (frames, bins)
    counts = rng.poisson(expected * K)
    intensity = counts / K
    sigma = np.sqrt(np.maximum(counts, 1)) / K
    seq = np.arange(1, N_FRAMES + 1)
    return seq, 1.79e9 + t, q, intensity, sigma, cycle.truth(t)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    from service.config import load_settings
    from service.publish.tiled import TiledPublisher
    from service.publish.tiled_server import EmbeddedTiled
    from service.sim import default_geometry, poni_dict
    from workers.temporal import TrajectoryFitter

    tmp = tmp_path_factory.mktemp("report")
    seq, times, q, intensity, sigma, truth = simulated_run()
    settings = load_settings(None, fit={"regularizer": {"window": 4}})
    fitter = TrajectoryFitter(settings.fit.model_spec(), settings.fit.regularizer)
    uid = str(uuid.uuid4())
    start = {"uid": uid, "time": float(times[0]), "plan_name": "operando_cycle", "scan_id": 7,
             "sample": "azopolymer film (simulated)", "modality": "WAXS",
             "geometry": poni_dict(default_geometry())}
    with EmbeddedTiled(tmp / "tiled", api_key="reportkey123") as server:
        pub = TiledPublisher(server.uri, server.api_key, spool_dir=tmp / "spool", flush_rows=50)
        config = settings.model_dump(mode="json")
        config["tiled"]["api_key"] = "secretkey42"
        pub.start_run(uid, start, config)
        for k in range(0, N_FRAMES, BATCH):
            s = slice(k, k + BATCH)
            rows = fitter.update(q, intensity[s], sigma[s], seq[s], times[s])
            pub.add_profiles(uid, seq[s], times[s], q, intensity[s], sigma[s], "q_nm^-1")
            pub.add_peaks(uid, rows)
        pub.add_peaks(uid, fitter.finish())
        pub.stop_run(uid, "success")
        assert pub.drain(60)
        pub.close()
        assert pub.errors == 0
        yield {"server": server, "uid": uid, "truth": truth, "start": start, "tmp": tmp}


def cell(page: str, peak: str, field: str) -> float:
    row = re.search(rf'<tr data-peak="{peak}">(.*?)</tr>', page, re.S).group(1)
    return float(re.search(rf'data-field="{field}" data-value="([^"]+)"', row).group(1))


def test_report_matches_tiled_and_truth(stored_run):
    from service.report import write_report
    from tiled.client import from_uri

    server, uid = stored_run["server"], stored_run["uid"]
    out = stored_run["tmp"] / "out"
    client = from_uri(server.uri, api_key=server.api_key)
    node = client["scatterflow"][uid]
    index = write_report(node, out)
    page = index.read_text()
    assert index == out / "index.html"
    assert f'<code id="run-uid">{uid}</code>' in page

    # independent read-back of what Tiled holds
    peaks = node["peaks"].read()
    final = peaks[peaks["final"]]
    assert node["profiles"].read().shape == (N_FRAMES, N_BINS)
    assert re.search(rf"<th>frames \(profiles stored\)</th><td>{N_FRAMES}</td>", page)
    cps_tiled = node["change_points"].read()                 # provisional and final flags
    n_cps = int(cps_tiled["final"].sum())
    assert n_cps == int(final["change_point"].sum()) and n_cps >= 1  # UV and visible switch the film
    assert re.search(rf"<th>change points \(final\)</th><td>{n_cps}</td>", page)
    assert page.count("<tr><td>", page.index('id="change-points"')) == n_cps
    truth = stored_run["truth"]
    for peak in ("lamellar", "halo", "pi_pi"):
        d = final[final["peak"] == peak]
        assert len(d) == N_FRAMES and cell(page, peak, "frames") == N_FRAMES
        assert cell(page, peak, "mean_center") == pytest.approx(d["center"].mean(), rel=1e-12)
        assert cell(page, peak, "max_center") == pytest.approx(d["center"].max(), rel=1e-12)
        assert cell(page, peak, "mean_fwhm") == pytest.approx(d["fwhm"].mean(), rel=1e-12)
        assert cell(page, peak, "median_chi2") == pytest.approx(d["chi2"].median(), rel=1e-12)
        assert cell(page, peak, "change_points") == d["change_point"].sum()
        assert cell(page, peak, "undetermined") == (d["unidentified"] > 0).sum()
        # and the fits themselves follow the simulator (mean over the run, 1/nm)
        assert cell(page, peak, "mean_center") == pytest.approx(truth[peak]["center"].mean(), abs=0.02)
    # the lamellar peak moved under UV, so its range is not flat
    assert cell(page, "lamellar", "max_center") - cell(page, "lamellar", "min_center") > 0.05

    # figures: one trajectory per peak, heat map, profiles, chi²; all valid PNGs
    figs = re.findall(r'<img src="([^"]+)"', page)
    for peak in ("lamellar", "halo", "pi_pi"):
        assert f"figures/trajectory-{peak}.png" in figs
    assert {"figures/heatmap.png", "figures/profiles.png", "figures/chi2.png"} <= set(figs)
    for f in figs:
        with Image.open(out / f) as im:
            im.verify()
        with Image.open(out / f) as im:
            assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 250
    # the heat map really shows the data: not one flat colour
    hm = np.asarray(Image.open(out / "figures/heatmap.png").convert("L"), float)
    assert hm.std() > 10

    # geometry from the start document's PONI, configuration and software from the metadata
    poni = stored_run["start"]["geometry"]
    assert f"{poni['dist'] * 1e3:.3f} mm" in page
    assert f"{12.398419843320026 / (poni['wavelength'] * 1e10):.4f} keV" in page
    assert 'id="no-snapshots"' in page                       # 2D frames are not in the layout
    assert '"regularizer"' in page and "tiled" in page and "torch" in page
    assert '"api_key": "***"' in page and "secretkey42" not in page     # secrets redacted
    try:
        import weasyprint  # noqa: F401   optional: the PDF comes with it
    except Exception:
        assert not (out / "report.pdf").exists()
    else:
        assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"


def test_report_command_and_uid_prefix(stored_run, capsys):
    import argparse

    from service.commands import report as report_cmd

    server, uid = stored_run["server"], stored_run["uid"]
    out = stored_run["tmp"] / "cli"
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    report_cmd.add_parser(sub)
    args = parser.parse_args(["report", uid[:8], "-o", str(out), "--tiled-uri", server.uri,
                              "--api-key", server.api_key])
    assert args.func(args) == 0
    assert (out / "index.html").exists() and uid in (out / "index.html").read_text()
    args = parser.parse_args(["report", "nosuchrun", "-o", str(out), "--tiled-uri", server.uri,
                              "--api-key", server.api_key])
    assert args.func(args) == 2
    assert "no run 'nosuchrun'" in capsys.readouterr().out


def test_write_report_for(stored_run):
    from service.report import write_report_for
    server, uid = stored_run["server"], stored_run["uid"]
    index = write_report_for(server.uri, server.api_key, uid, stored_run["tmp"] / "demo-report")
    assert index.name == "index.html" and (index.parent / "figures" / "trajectory-lamellar.png").exists()
