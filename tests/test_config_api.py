"""Configuration (YAML + environment) and the REST API through an in-process ASGI client."""
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import build_app
from service.config import load_settings
from service.errors import ConfigError
from service.metrics import Metrics
from service.publish.state import PEAK_COLUMNS, RunStore


def test_yaml_and_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest: {address: 'tcp://10.0.0.1:5578'}\nreduction: {npt: 500}\n"
                   "fit:\n  peaks:\n    - {name: p, center: 3.0, center_min: 2.5, center_max: 3.5}\n")
    monkeypatch.setenv("SCATTERFLOW_REDUCTION__NPT", "700")
    s = load_settings(cfg)
    assert s.ingest.address == "tcp://10.0.0.1:5578"
    assert s.reduction.npt == 700                          # environment wins over the file
    assert [p.name for p in s.fit.peaks] == ["p"]


@pytest.mark.parametrize("text,where", [
    ("reduction: {npt: -3}", "reduction.npt"),
    ("reduction: {method: fancy}", "reduction.method"),
    ("ingest: {nonsense: 1}", "ingest.nonsense"),
    ("api: {host: 0.0.0.0}", "api"),                       # exposed without an API key
])
def test_config_errors_are_one_line(tmp_path, text, where):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert where in str(info.value) and "\n" not in str(info.value)


def rows(seq, final):
    n = len(seq)
    return {"seq_num": np.asarray(seq), "time": np.asarray(seq, float), "peak": np.array(["a"] * n),
            **{c: np.linspace(1, 2, n) for c in PEAK_COLUMNS[3:11]},
            "converged": np.ones(n, bool), "change_point": np.zeros(n, bool), "final": np.full(n, final)}


def make_client(api_key=None):
    store, metrics = RunStore(), Metrics()
    app = build_app(store, metrics, lambda: {"ok": True}, api_key=api_key)
    return store, metrics, TestClient(app)


def test_peaks_columnar_and_incremental():
    store, metrics, client = make_client()
    store.start_run("u1", {"uid": "u1", "plan_name": "count"})
    store.add_peaks("u1", rows([1, 2, 3], False))
    r = client.get("/api/v1/runs/u1/peaks").json()
    assert r["columns"]["seq_num"] == [1, 2, 3] and r["next_since"] == 3
    assert set(r["columns"]) == set(PEAK_COLUMNS)
    assert len({len(v) for v in r["columns"].values()}) == 1          # equal-length lists
    store.add_peaks("u1", rows([1, 2], True))
    r2 = client.get("/api/v1/runs/u1/peaks", params={"since": 3}).json()
    assert r2["columns"]["seq_num"] == [1, 2] and r2["columns"]["final"] == [True, True]
    assert client.get("/api/v1/runs/u1/peaks", params={"final": False}).json()["columns"]["seq_num"] == [1, 2, 3]
    assert client.get("/api/v1/runs/u1").json()["frames_final"] == 2
    assert client.get("/api/v1/runs/nope/peaks").status_code == 404
    assert client.get("/api/v1/runs/u1/peaks", params={"since": -1}).status_code == 422


def test_metrics_endpoint_and_api_key():
    store, metrics, client = make_client(api_key="k")
    metrics.rejected.labels("garbage").inc(3)
    assert client.get("/api/v1/health").status_code == 401
    r = client.get("/metrics", headers={"x-api-key": "k"})
    assert r.status_code == 200 and 'scatterflow_rejected_total{reason="garbage"} 3.0' in r.text
    assert client.get("/api/v1/status", headers={"x-api-key": "k"}).json() == {"ok": True}


def test_openapi_names_response_models():
    """/openapi.json documents the JSON bodies of the peaks and runs routes by named models
    whose fields are those of the REST contract (DESIGN.md)."""
    store, _, client = make_client()
    store.start_run("u1", {"uid": "u1", "plan_name": "count"})
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def model(path):
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        return schemas[ok["$ref"].rsplit("/", 1)[-1]]

    peaks = model("/api/v1/runs/{uid}/peaks")
    assert set(peaks["properties"]) == {"columns", "next_since", "next_seq", "missing"}   # seq_num paging, gaps
    assert set(peaks["required"]) == {"columns", "next_since"}
    runs = model("/api/v1/runs")
    assert set(runs["properties"]) == {"runs"}
    item = schemas[runs["properties"]["runs"]["items"]["$ref"].rsplit("/", 1)[-1]]
    assert {"uid", "status", "frames_received", "frames_fitted", "frames_final", "peak_rows"} <= set(item["properties"])
    assert "start" in model("/api/v1/runs/{uid}")["properties"]
    served = client.get("/api/v1/runs").json()["runs"][0]
    assert set(served) <= set(item["properties"])          # a plain run: no modality/detector keys
    assert "modality" not in served and "detector" not in served


def test_fit_config_validates_the_workers_specs():
    """FitConfig reads the ``fit:`` mapping into the workers' own specs and names bad keys."""
    from pydantic import ValidationError

    from service.config import FitConfig
    from workers.specs import BackgroundSpec, PeakSpec, RegularizerSpec
    fit = FitConfig.model_validate({
        "background": {"kind": "polynomial", "degree": 2},
        "peaks": [{"name": "lamellar", "shape": "pseudo_voigt", "center": 3.2, "fwhm": 0.15,
                   "center_min": 2.8, "center_max": 3.6},
                  {"name": "pipi", "shape": "voigt", "center": 17.5, "fwhm": 0.8}],
        "regularizer": {"window": 12, "penalty": "tv"},
        "q_range": [2.0, 20.0]})
    spec = fit.model_spec()
    assert spec.peaks[0] == PeakSpec("lamellar", "pseudo_voigt", 3.2, 0.15, 2.8, 3.6)
    assert spec.background == BackgroundSpec("polynomial", 2) and spec.q_range == (2.0, 20.0)
    assert fit.regularizer == RegularizerSpec(12, "tv", 2.0)
    peak = {"name": "a", "center": 17.0}
    for bad, where, says in (({"peaks": [{**peak, "colour": "red"}]}, ("peaks", 0, "colour"), ""),
                             ({"peaks": [peak], "regularizer": {"penalty": "l2"}}, ("regularizer", "penalty"), "huber"),
                             ({"peaks": [{**peak, "fwhm": -1.0}]}, (), "fwhm")):
        with pytest.raises(ValidationError) as info:
            FitConfig.model_validate(bad)
        err = info.value.errors()[0]
        assert err["loc"] == where and says in err["msg"], err
    assert FitConfig.model_validate({"peaks": []}).model_spec() is None      # peaks: [] means no fit
