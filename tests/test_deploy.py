"""Deployment files (docker-compose.yml, deploy/): they parse, reference what exists, and agree
with the service. Docker is not run here: these checks are static, plus the service's own
configuration loader and the shell snippets that carry the secrets."""
import configparser
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from service.config import load_settings
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVICES = {"proxy", "tiled", "scatterflow", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def metric_names(metrics: Metrics) -> tuple[set[str], set[str]]:
    """Sample names Prometheus sees from our registry (counters get _total, histograms
    _bucket/_sum/_count) and all label names, from the metric families themselves."""
    names, labels = set(), {"le", "job", "instance"}
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    for fam in metrics.registry.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
    for m in vars(metrics).values():
        labels.update(getattr(m, "_labelnames", ()))
    return names, labels


def test_compose_services_healthchecks_volumes_secrets(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    declared_volumes, declared_secrets = set(compose["volumes"]), set(compose["secrets"])
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        assert svc.get("restart") == "unless-stopped", name
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):                       # bind mount of a repository file
                assert (ROOT / source).exists(), (name, source)
            elif not source.startswith("$"):
                assert source in declared_volumes, (name, source)
        assert set(svc.get("secrets", [])) <= declared_secrets, name
        for dep in svc.get("depends_on", {}):
            assert dep in services
    assert declared_volumes == {"tiled-data", "scatterflow-var", "prometheus-data", "grafana-data"}
    for spec in compose["secrets"].values():           # secret files live in the git-ignored directory
        assert spec["file"].startswith("./deploy/secrets/")
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore


def test_no_literal_secrets_in_compose(compose):
    """Keys are read from secret files at start, never written into the compose file."""
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"API_KEY|PASSWORD|SECRET", key) and not key.endswith("__FILE"):
                pytest.fail(f"{name}: {key} set in docker-compose.yml")
    text = (ROOT / "docker-compose.yml").read_text()
    assert "--api-key" not in text                      # would show in `ps` on the host


def test_compose_environment_is_a_valid_service_configuration(compose, monkeypatch):
    """deploy/scatterflow.yaml + the compose environment + the secrets load as Settings."""
    env = compose["services"]["scatterflow"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("SCATTERFLOW_API__API_KEY", "k" * 64)
    monkeypatch.setenv("SCATTERFLOW_TILED__API_KEY", "t" * 64)
    s = load_settings(DEPLOY / "scatterflow.yaml")
    assert s.api.host == "0.0.0.0" and s.api.api_key.get_secret_value() == "k" * 64
    assert s.ingest.address == "tcp://proxy:5578" and s.tiled.uri == "http://tiled:8001/api/v1"
    assert s.fit.peaks[0].name == "lamellar"            # the YAML file still applies under the environment
    monkeypatch.delenv("SCATTERFLOW_API__API_KEY")
    with pytest.raises(ValueError, match="api.api_key"):   # the service would refuse to start without its key
        load_settings(DEPLOY / "scatterflow.yaml")


def _run_secret_snippet(script: str, secret_dir: Path, env: dict) -> dict:
    """Run a `sh -c` command line from a unit or the compose file with `exec PROGRAM ...`
    replaced by `exec env`; returns the environment PROGRAM would have received."""
    script = re.sub(r"exec .*$", "exec env", script)
    script = script.replace("/run/secrets", str(secret_dir))
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=10, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("service,variables", [
    ("scatterflow", {"SCATTERFLOW_API__API_KEY": "scatterflow_api_key", "SCATTERFLOW_TILED__API_KEY": "tiled_api_key"}),
    ("tiled", {"TILED_KEY_FROM_SECRET": "tiled_api_key"}),
])
def test_compose_commands_pass_secret_files_as_environment(compose, tmp_path, service, variables):
    command = compose["services"][service]["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("$$", "$")                # compose's escape for a literal $
    for secret in set(variables.values()):
        (tmp_path / secret).write_text(f"value-of-{secret}\n")
    got = _run_secret_snippet(script, tmp_path, {"PATH": "/usr/bin:/bin"})
    for var, secret in variables.items():
        assert got[var] == f"value-of-{secret}"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("name", ["bluesky-0mq-proxy", "tiled", "scatterflow"])
def test_systemd_units(name, tmp_path):
    unit = _unit(DEPLOY / "systemd" / f"{name}.service")
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service["User"] == "scatterflow" and service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    exec_start = service["ExecStart"]
    if name == "bluesky-0mq-proxy":        # 0MQ has no authentication: loopback unless overridden
        assert "--in-address ${PROXY_IN}" in exec_start and service["Environment"] == "PROXY_OUT=tcp://127.0.0.1:5578"
        return
    # credentials -> environment, as systemd runs it: "$$" is a literal "$", CREDENTIALS_DIRECTORY set
    script = re.match(r"/bin/sh -c '(.*)'$", exec_start).group(1).replace("$$", "$")
    creds = re.findall(r"LoadCredential=(\w+):", (DEPLOY / "systemd" / f"{name}.service").read_text())
    for c in creds:
        (tmp_path / c).write_text(f"value-of-{c}\n")
    got = _run_secret_snippet(script, tmp_path, {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(tmp_path)})
    wanted = {"tiled": {"TILED_KEY_FROM_SECRET": "tiled_api_key"},
              "scatterflow": {"SCATTERFLOW_API__API_KEY": "scatterflow_api_key",
                              "SCATTERFLOW_TILED__API_KEY": "tiled_api_key"}}[name]
    for var, secret in wanted.items():
        assert got[var] == f"value-of-{secret}"


def test_tiled_config_reads_key_from_environment():
    cfg = yaml.safe_load((DEPLOY / "tiled" / "config.yml").read_text())
    auth = cfg["authentication"]
    assert auth["single_user_api_key"] == "${TILED_KEY_FROM_SECRET}" and auth["allow_anonymous_access"] is False
    assert cfg["trees"][0]["tree"] == "catalog" and cfg["trees"][0]["args"]["init_if_not_exists"] is True


def test_prometheus_scrapes_scatterflow_with_its_key(compose):
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = compose["services"]["scatterflow"]["environment"]["SCATTERFLOW_API__PORT"]
    assert job["static_configs"][0]["targets"] == [f"scatterflow:{port}"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/scatterflow_api_key"}
    assert "scatterflow_api_key" in compose["services"]["prometheus"]["secrets"]


def test_grafana_dashboard_queries_only_metrics_the_service_exports():
    """Every PromQL expression names only metrics in service/metrics.py (with the suffixes
    Prometheus gives them) and groups by labels that exist; panels use the provisioned datasource."""
    names, labels = metric_names(Metrics())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/scatterflow.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dash = json.loads((DEPLOY / "grafana/dashboards/scatterflow.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("rate", "latency", "drops", "convergence"):
        assert topic in titles
    exprs = []
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            exprs.append(target["expr"])
            used = set(re.findall(r"\bscatterflow_[a-z_]+", target["expr"]))
            assert used or "up{" in target["expr"], target["expr"]
            assert used <= names, (target["expr"], used - names)
            for group in re.findall(r"by \(([^)]*)\)", target["expr"]):
                assert {g.strip() for g in group.split(",")} <= labels, target["expr"]
    assert len(exprs) >= 10


def test_proxy_reuses_frame_buffers_as_the_service_does(compose):
    """The proxy copies every frame too: same glibc malloc settings as service/memory.py."""
    from service.memory import reuse_environment
    assert compose["services"]["proxy"]["environment"] == reuse_environment()
