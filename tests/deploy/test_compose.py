"""deploy/compose: every command, port, volume and URL agrees with ferry's flags and with each other."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from ferry.gateway.config import load_config
from ferry.server.command import DrainingServer

SERVES = ("serve-1", "serve-2")
COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (or volume name) of a service's short-form volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    assert m, duration
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_docker_compose_config_accepts_it(root: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE_DIR / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*SERVES, "gateway", "postgres", "prometheus", "grafana"}


@pytest.mark.parametrize("name", SERVES)
def test_serve_replicas_listen_where_the_others_look(name, compose, ferry_args, dockerfile) -> None:
    service = compose["services"][name]
    args = ferry_args(service["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert [str(args.port)] == [str(p) for p in service["expose"]]
    assert service["image"] == compose["services"]["gateway"]["image"]
    assert service["build"]["context"] == "../.." and service["build"]["dockerfile"] == "Dockerfile"
    assert service["build"]["args"]["FERRY_DEVICE"] in ("cpu", "cuda")
    # the Hub cache and compiled kernels on a named volume at the image's VOLUME
    assert _mounts(service) == {"/cache": "ferry-cache"}
    assert "ferry-cache" in compose["volumes"]
    # compose waits stop_grace_period after SIGTERM: ferry's drain must fit in it
    assert _seconds(service["stop_grace_period"]) >= args.shutdown_timeout + DrainingServer.GRACE_S


def test_gateway_reads_the_mounted_config_with_its_secrets(compose, ferry_args, root: Path) -> None:
    service = compose["services"]["gateway"]
    args = ferry_args(service["command"])
    assert args.command == "gateway" and args.action == "serve" and args.host == "0.0.0.0"
    mounts = _mounts(service)
    assert args.config in mounts, f"--config {args.config} is not mounted"
    host_file = COMPOSE_DIR / mounts[args.config]
    config = load_config(host_file)
    assert config.missing_env(service["environment"]) == []
    published = [p.split(":") for p in service["ports"]]
    assert [p[-1] for p in published] == [str(args.port)]
    assert all(p[0] == "127.0.0.1" for p in published), "only loopback: the master key is a demo default"
    assert args.instance, "a fixed --instance lets a restart settle what the last run left in flight"
    for dep in ("postgres", *SERVES):
        assert service["depends_on"][dep]["condition"] == "service_healthy"


def test_gateway_backends_are_the_serve_replicas(compose, ferry_args) -> None:
    config = load_config(COMPOSE_DIR / "gateway.yaml")
    targets = {}
    for name in SERVES:
        args = ferry_args(compose["services"][name]["command"])
        targets[name] = args
    assert {b.name for b in config.backends} == set(SERVES)
    for b in config.backends:
        url = urlparse(b.url)
        assert url.hostname in targets and url.port == targets[url.hostname].port, b.url
        assert b.kind == "ferry" and b.location == "onprem"
        served = targets[url.hostname].served_model_name or [targets[url.hostname].model]
        for route in config.models:
            for d in route.deployments:
                if d.backend == b.name:
                    assert d.model in served, f"{b.name} serves {served}, the route asks for {d.model}"


def test_gateway_database_is_the_stack_postgres_with_the_password_from_the_environment(compose) -> None:
    config = load_config(COMPOSE_DIR / "gateway.yaml")
    db = urlparse(config.database)
    assert db.scheme == "postgresql" and db.hostname == "postgres" and db.password is None
    pg = compose["services"]["postgres"]["environment"]
    assert db.username == pg["POSTGRES_USER"] and db.path == "/" + pg["POSTGRES_DB"]
    assert compose["services"]["gateway"]["environment"]["PGPASSWORD"] == pg["POSTGRES_PASSWORD"]
    assert db.port == 5432


def test_readme_curl_works_through_the_gateway(root: Path) -> None:
    """README's request names a model the compose gateway routes; docs/deploy.md sends it to the gateway."""
    readme = (root / "README.md").read_text()
    model = re.search(r'curl http://127\.0\.0\.1:8000/v1/chat/completions.*?"model": "([^"]+)"', readme, re.S)
    assert model, "README's curl example moved"
    config = load_config(COMPOSE_DIR / "gateway.yaml")
    assert config.model(model.group(1)) is not None
    doc = (root / "docs" / "deploy.md").read_text()
    assert re.search(r"curl http://127\.0\.0\.1:4000/v1/chat/completions", doc)
    assert 'Authorization: Bearer sk-ferry-compose' in doc


def test_prometheus_scrapes_all_three(compose, ferry_args) -> None:
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    paths = {job.get("metrics_path", "/metrics") for job in prom["scrape_configs"]}
    assert paths == {"/metrics"}
    expected = set()
    for name in (*SERVES, "gateway"):
        expected.add(f"{name}:{ferry_args(compose['services'][name]['command']).port}")
    assert targets == expected
    service = compose["services"]["prometheus"]
    assert "/etc/prometheus/prometheus.yml" in _mounts(service)


def test_grafana_provisions_the_dashboard_on_the_stack_prometheus(compose, dashboard) -> None:
    service = compose["services"]["grafana"]
    mounts = _mounts(service)
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/ferry.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (COMPOSE_DIR / mounts[path] / "ferry-dashboard.json").exists()
    assert (COMPOSE_DIR / mounts["/etc/grafana/provisioning"] / "dashboards" / "ferry.yaml").exists()
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/ferry-dashboard.json"
    ds = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    source = ds["datasources"][0]
    assert urlparse(source["url"]).hostname == "prometheus"
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


def test_postgres_health_is_checked(compose) -> None:
    test = compose["services"]["postgres"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]


def test_no_variable_is_left_unresolved(root: Path) -> None:
    """Every ${VAR} in compose.yaml has a default, so a bare `docker compose up` works."""
    text = (COMPOSE_DIR / "compose.yaml").read_text()
    assert re.findall(r"\$\{[^}]*\}", text)
    for ref in re.findall(r"\$\{[^}]*\}", text):
        assert ":-" in ref, f"{ref} has no default"
