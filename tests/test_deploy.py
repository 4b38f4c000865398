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
SERVICES = {"proxy", "tiled", "scatterflow", "prometheus", "grafana"}     # the default stack
RAY_SERVICES = {"ray-head", "ray-worker"}                                 # only with `--profile ray`


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def metric_names(metrics: Metrics) -> tuple[set[str], set[str]]:
    """Sample names Prometheus sees from our registry (counters get _total, histograms
    _bucket/_sum/_count) and all label names, from the metric families themselves."""
    names, labels = set(), {"le", "job", "instance"}
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    for fam in metrics.registry.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
    for m in vars(metrics).values():
        labels.update(getattr(m, "_labelnames", ()))
    return names, labels


def test_compose_services_healthchecks_volumes_secrets(compose):
    services = compose["services"]
    assert set(services) == SERVICES | RAY_SERVICES
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


def _data_mount(svc: dict) -> str:
    (mount,) = [v for v in svc.get("volumes", []) if re.search(r":/data(:[a-z,]+)?$", v)]
    return mount


def _shm_bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_compose_ray_profile(compose):
    """Profile "ray": a head without actors and worker nodes on the service's image, with the
    detector data at the service's path, read-only (actors read file-backed frames themselves);
    the default stack neither includes nor depends on them."""
    services = compose["services"]
    for name in SERVICES:
        assert "profiles" not in services[name], name
        assert not set(services[name].get("depends_on", {})) & RAY_SERVICES, name
    image = services["scatterflow"]["image"]
    assert [name for name, svc in services.items() if "build" in svc] == ["scatterflow"]   # one build
    assert all(svc["pull_policy"] == "never" for svc in services.values() if svc.get("image") == image)
    data = _data_mount(services["scatterflow"])
    assert data.endswith(":/data:ro")
    for name in RAY_SERVICES:
        svc = services[name]
        assert svc.get("profiles") == ["ray"], name
        assert svc["image"] == image, name
        assert _data_mount(svc) == data, name
        assert _shm_bytes(svc["shm_size"]) >= 1024 ** 3, name          # Ray's object store in /dev/shm
        assert svc["command"][:2] == ["ray", "start"] and "--block" in svc["command"], name
        assert svc["healthcheck"]["test"][:3] == ["CMD", "ray", "status"], name
        for port in svc.get("ports", []):                  # Ray has no authentication: loopback by default
            assert re.fullmatch(r"\$\{[A-Z_]+:-127\.0\.0\.1\}:8265:8265", port), (name, port)
    head, worker = services["ray-head"]["command"], services["ray-worker"]["command"]
    assert {"--head", "--port=6379", "--num-cpus=0", "--ray-client-server-port=10001"} <= set(head)
    assert "--address=ray-head:6379" in worker and "--head" not in worker
    assert services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "replicas" in services["ray-worker"].get("deploy", {})
    assert "container_name" not in services["ray-worker"]              # would forbid --scale


def test_ray_override_in_readme_is_a_valid_service_configuration(compose, monkeypatch):
    """The docker-compose.override.yml of deploy/README.md, merged over the scatterflow service as
    Compose does, loads as Settings that reach the head's Ray Client port; the image has Ray."""
    readme = (DEPLOY / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "SCATTERFLOW_WORKERS__ENGINE" in b]
    override = yaml.safe_load(block)["services"]["scatterflow"]
    assert set(override["depends_on"]) <= set(compose["services"])
    env = {**compose["services"]["scatterflow"]["environment"], **override["environment"]}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("SCATTERFLOW_API__API_KEY", "k" * 64)
    monkeypatch.setenv("SCATTERFLOW_TILED__API_KEY", "t" * 64)
    s = load_settings(DEPLOY / "scatterflow.yaml")
    assert s.workers.engine == "ray"
    host, port = re.fullmatch(r"ray://([\w.-]+):(\d+)", s.workers.ray_address).groups()
    assert f"--ray-client-server-port={port}" in compose["services"][host]["command"]
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    assert f"SCATTERFLOW_WORKERS__RAY_ADDRESS: {s.workers.ray_address}" in header
    assert "SCATTERFLOW_WORKERS__ENGINE: ray" in header
    assert re.search(r'pip install [^\n]*"\.\[ray\]"', (DEPLOY / "Dockerfile").read_text())


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
    assert s.fit.peaks == [] and not s.phases.enabled   # the YAML file (generic: reduction only) still applies
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


def test_tiled_serves_the_detector_files_the_service_reads(compose):
    """Files a beamline's TiledWriter registers (stream_resource) are readable by Tiled: its
    readable_storage is the service's detector data directory, mounted read-only."""
    cfg = yaml.safe_load((DEPLOY / "tiled" / "config.yml").read_text())
    (readable,) = cfg["trees"][0]["args"]["readable_storage"]
    host_side = _data_mount(compose["services"]["scatterflow"]).rsplit(":", 2)[0]
    assert f"{host_side}:{readable}:ro" in compose["services"]["tiled"]["volumes"]


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
    for topic in ("rate", "latency", "drops", "re-seeded"):
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


def test_metrics_have_process_build_and_loss_series_from_the_start():
    """What Prometheus scrapes from a fresh service: process_* and python_info, the build's
    versions (against the installed packages), counters typed as counters, and a series for
    each kind of upstream loss before any loss (so rate() and alerts work from the start)."""
    from importlib.metadata import version

    import torch

    text = Metrics().render().decode()
    assert "process_resident_memory_bytes" in text and "python_info{" in text
    build = next(line for line in text.splitlines() if line.startswith("scatterflow_build_info{"))
    assert f'version="{version("scatterflow")}"' in build and f'torch="{torch.__version__}"' in build
    for name in ("tiled_requests", "tiled_failures"):
        assert f"# TYPE scatterflow_{name}_total counter" in text
    for kind in ("event", "stream_datum", "start"):
        assert f'scatterflow_lost_upstream_total{{kind="{kind}"}} 0.0' in text


@pytest.mark.parametrize("name, modality, peaks, phases", [
    ("saxs-lamellar", "saxs", ["lamellar"], False),
    ("waxs-semicrystalline", "waxs", ["lamellar", "pi_pi", "halo"], True),
    ("gisaxs", "gisaxs", ["lamellar"], False),
    ("giwaxs", "giwaxs", ["halo", "pi_pi"], False),
])
def test_example_configurations_build_their_run_spec(name, modality, peaks, phases, caplog):
    """Each deploy/examples/ configuration gives the service a run spec with its modality, peaks
    and phases for a run that brings only its geometry, and logs no warning doing so."""
    from service.run_spec import RunSpecBuilder
    from service.sim.frames import default_geometry, poni_dict

    settings = load_settings(DEPLOY / "examples" / f"{name}.yaml")
    spec = RunSpecBuilder(settings).build({"uid": "example", "geometry": poni_dict(default_geometry())})
    assert spec.reduction.modality == modality
    assert [p.name for p in spec.model.peaks] == peaks
    assert (spec.phases is not None) == phases
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("service")]
