"""Per-frame SAXS inversion through the running service (real 0MQ ingest, worker process, hub,
REST, results stream, a real Tiled and the run report): reduced profiles of growing polydisperse
hard spheres, generated with sasmodels (``sphere@hardsphere``, Schulz, P(q)S(q)), no peak fit
(``fit.peaks: []``); the published radius per frame against the truth, its LM error against the
scatter, every frame final once. Then dilute spheres under a Porod upturn (sasmodels ``sphere``
+ ``power_law``): hard spheres cannot describe them, and REST and the report say so; the same
frames with ``powerlaw_spheres`` chosen in the start document are described."""
import functools
import socket
import time

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from event_model import compose_run

from service.config import load_settings
from service.server import Service

from helpers import stream_events

pytestmark = pytest.mark.slow
pack = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
N = 24
PD, PHI, I0, BKG = 0.1, 0.15, 200.0, 0.05


def sasmodels_sphere_hs(q_nm, radius_nm):
    """sasmodels sphere@hardsphere in our units (q 1/nm, radius nm), scaled to forward intensity I0."""
    from sasmodels.core import load_model
    from sasmodels.direct_model import call_kernel
    poly = dict(radius=10 * radius_nm, radius_pd=PD, radius_pd_type="schulz", radius_pd_n=200,
                radius_pd_nsigma=8, sld=2.0, sld_solvent=1.0, background=0.0)
    unit = call_kernel(load_model("sphere", dtype="double").make_kernel([np.array([1e-7])]), dict(poly, scale=1.0))[0]
    kernel = load_model("sphere@hardsphere", dtype="double").make_kernel([q_nm / 10.0])
    return call_kernel(kernel, dict(poly, scale=I0 / (PHI * unit), background=BKG, volfraction=PHI,
                                    radius_effective_mode=1, structure_factor_mode=0))


def sasmodels_spheres_upturn(q_nm, radius_nm, porod=0.02):
    """Dilute Schulz spheres (sasmodels ``sphere``, forward intensity I0) plus a Porod upturn
    ``porod`` q^-4 (sasmodels ``power_law``, q in 1/nm) and BKG."""
    from sasmodels.core import load_model
    from sasmodels.direct_model import call_kernel
    poly = dict(radius=10 * radius_nm, radius_pd=PD, radius_pd_type="schulz", radius_pd_n=200,
                radius_pd_nsigma=8, sld=2.0, sld_solvent=1.0, background=0.0)
    sphere = load_model("sphere", dtype="double")
    unit = call_kernel(sphere.make_kernel([np.array([1e-7])]), dict(poly, scale=1.0))[0]
    spheres = call_kernel(sphere.make_kernel([q_nm / 10.0]), dict(poly, scale=I0 / unit))
    upturn = call_kernel(load_model("power_law", dtype="double").make_kernel([q_nm]),
                         dict(scale=porod, power=4.0, background=0.0))
    return spheres + upturn + BKG


@pytest.fixture(scope="module")
def inverting_service(shared_tiled):
    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    results = f"tcp://127.0.0.1:{free_port()}"
    settings = load_settings(None, ingest={"address": f"tcp://127.0.0.1:{port}"},
                             tiled={"uri": shared_tiled.uri, "api_key": shared_tiled.api_key, "flush_seconds": 0.5},
                             results={"address": results}, api={"port": free_port()},
                             fit={"peaks": []}, phases={"enabled": False}, inversion={"enabled": True})
    service = Service(settings).start()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(results)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    time.sleep(1.0)                                     # slow joiner, both sockets
    yield service, pub, sub, shared_tiled
    service.close()
    pub.close(linger=0)
    sub.close(linger=0)


def test_growing_spheres_inverted_per_frame(inverting_service):
    import httpx
    service, pub, sub, _ = inverting_service
    rng = np.random.default_rng(3)
    q = np.linspace(0.08, 4.0, 300)
    radius = np.linspace(4.0, 9.0, N)                   # nm: particles growing during the run
    bundle = compose_run(metadata={"plan_name": "growth"})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        k: {"source": "sim", "dtype": "array", "shape": [300]} for k in ("q", "intensity", "sigma")})
    send = lambda name, doc: pub.send(b" " + name.encode() + b" " + pack(doc))   # noqa: E731
    send("start", bundle.start_doc)
    send("descriptor", desc.descriptor_doc)
    for i, r in enumerate(radius):
        clean = sasmodels_sphere_hs(q, r)
        sigma = np.sqrt(clean * I0 / 1e5)               # 1e5 counts at the forward intensity
        send("event", desc.compose_event(data={"q": q, "intensity": clean + sigma * rng.standard_normal(300),
                                               "sigma": sigma}, timestamps={k: 0.0 for k in ("q", "intensity", "sigma")},
                                         seq_num=i + 1))
    send("stop", bundle.compose_stop())
    uid = bundle.start_doc["uid"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (service.store.get(uid) is None or service.store.get(uid).status == "running"):
        time.sleep(0.1)
    run = service.store.get(uid)
    assert run.status == "complete" and run.frames_received == N and not run.failed

    body = httpx.get(f"http://127.0.0.1:{service.api_port}/api/v1/runs/{uid}/inversion").json()
    cols = body["columns"]
    assert body["next_since"] == N and cols["seq_num"] == list(range(1, N + 1))   # each frame once
    fitted, err = np.array(cols["radius"]), np.array(cols["radius_err"])
    encoder = np.array(cols["radius_encoder"])
    assert np.all(np.abs(encoder / radius - 1) < 0.15)                 # encoder alone: a warm start
    assert np.all(np.abs(fitted / radius - 1) < 0.02)                  # refined: within 2 %
    pulls = (fitted - radius) / err
    print(f"radius: encoder median |rel err| {np.median(np.abs(encoder / radius - 1)):.4f}, refined "
          f"{np.median(np.abs(fitted / radius - 1)):.5f}; pull std {pulls.std():.2f}")
    assert np.all(np.isfinite(err)) and np.abs(pulls).max() < 5 and 0.4 < pulls.std() < 2.0
    assert np.all(np.abs(np.array(cols["volfraction"]) - PHI) < 0.05)
    assert all(cols["converged"])
    summary = httpx.get(f"http://127.0.0.1:{service.api_port}/api/v1/runs/{uid}").json()["inversion"]
    assert summary["frames"] == N and summary["bad"] == 0 and summary["model"] == "sphere_hs"
    assert service.metrics.frames_final._value.get() >= N              # no peak fit: reduced = final

    # the results stream: an analysis run with an "inversion" stream, one event per frame
    events = stream_events(sub, None, "inversion")
    assert sorted(e["data"]["source_seq_num"] for e in events) == list(range(1, N + 1))
    by_seq = {e["data"]["source_seq_num"]: e["data"]["radius"] for e in events}
    np.testing.assert_allclose([by_seq[s] for s in range(1, N + 1)], fitted)


def send_run(pub, profiles, q, rng, metadata):
    """One run of reduced profiles (with Poisson-like errors, 1e5 counts at I0) on the 0MQ socket;
    returns its uid."""
    bundle = compose_run(metadata=metadata)
    desc = bundle.compose_descriptor(name="primary", data_keys={
        k: {"source": "sim", "dtype": "array", "shape": [len(q)]} for k in ("q", "intensity", "sigma")})
    send = lambda name, doc: pub.send(b" " + name.encode() + b" " + pack(doc))   # noqa: E731
    send("start", bundle.start_doc)
    send("descriptor", desc.descriptor_doc)
    for i, clean in enumerate(profiles):
        sigma = np.sqrt(clean * I0 / 1e5)
        send("event", desc.compose_event(data={"q": q, "intensity": clean + sigma * rng.standard_normal(len(q)),
                                               "sigma": sigma}, timestamps={k: 0.0 for k in ("q", "intensity", "sigma")},
                                         seq_num=i + 1))
    send("stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


def test_model_that_cannot_describe_the_sample_is_flagged(inverting_service, tmp_path):
    import httpx

    from service.report import write_report_for
    service, pub, _, tiled = inverting_service
    rng = np.random.default_rng(5)
    q = np.linspace(0.08, 4.0, 300)
    n = 8
    profiles = [sasmodels_spheres_upturn(q, r) for r in np.linspace(5.0, 7.0, n)]
    hard_spheres = send_run(pub, profiles, q, rng, {"plan_name": "upturn"})
    with_upturn = send_run(pub, profiles, q, rng, {"plan_name": "upturn",
                                                   "scatterflow": {"inversion": {"model": "powerlaw_spheres"}}})
    api = f"http://127.0.0.1:{service.api_port}/api/v1/runs"
    for uid in (hard_spheres, with_upturn):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (service.store.get(uid) is None
                                               or service.store.get(uid).status == "running"):
            time.sleep(0.1)
    bad = httpx.get(f"{api}/{hard_spheres}").json()
    good = httpx.get(f"{api}/{with_upturn}").json()
    print("sphere_hs:", bad["inversion"], "\npowerlaw_spheres:", good["inversion"])
    assert bad["status"] == good["status"] == "complete"
    assert bad["inversion"]["model"] == "sphere_hs" and bad["inversion"]["bad"] == n
    assert bad["inversion"]["adequate_fraction"] == 0.0
    rows = httpx.get(f"{api}/{hard_spheres}/inversion").json()["columns"]
    assert set(rows["fit_quality"]) == {"bad"} and min(rows["chi2"]) > 4
    assert good["inversion"]["model"] == "powerlaw_spheres" and good["inversion"]["bad"] == 0
    fitted = httpx.get(f"{api}/{with_upturn}/inversion").json()["columns"]
    assert np.all(np.abs(np.array(fitted["radius"]) / np.linspace(5.0, 7.0, n) - 1) < 0.03)
    assert np.all(np.abs(np.array(fitted["power"]) - 4.0) < 0.2)

    # the report of the hard-sphere run leads its inversion section with the verdict
    index = write_report_for(tiled.uri, tiled.api_key, hard_spheres[:8], tmp_path / "report")
    page = index.read_text()
    verdict = page[page.index('id="inversion-verdict"') - 20:]
    assert 'class="warn"' in verdict[:60] and f'data-bad="{n}"' in verdict[:120]
    assert "cannot describe 8 of 8 frames" in verdict
    assert (tmp_path / "report" / "figures" / "inversion.png").stat().st_size > 10_000
