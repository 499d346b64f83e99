"""Config: the issue's example validates as written; bad configs fail `check` and start-up naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ferry.gateway.config import ConfigError, describe, load_config, parse_config

ISSUE_EXAMPLE = """\
backends:
  - name: gpu-rack-1
    url: http://10.0.0.5:8000/v1
    location: onprem
    kind: ferry
    max_concurrency: 32
    input_per_mtok: 0.05      # amortized on-prem cost (ferry plan prints it)
    output_per_mtok: 0.10
  - name: openai
    url: https://api.openai.com/v1
    location: cloud
    kind: openai
    api_key_env: OPENAI_API_KEY
    max_concurrency: 64
    input_per_mtok: 0.15
    output_per_mtok: 0.60
models:
  - name: chat
    deployments:
      - backend: gpu-rack-1
        model: llama-3.1-8b-instruct
      - backend: openai
        model: gpt-4o-mini
routing:
  policy: onprem-first
data_classes:
  public: {locations: [onprem, cloud]}
  restricted: {locations: [onprem]}
default_data_class: public
pii: {enabled: true}
database: sqlite:///ferry-gateway.db
master_key_env: FERRY_MASTER_KEY
"""

ROOT = Path(__file__).resolve().parents[2]


def _check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry.cli", "gateway", "check", str(path)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_issue_example_validates_as_written(tmp_path) -> None:
    config = parse_config(yaml.safe_load(ISSUE_EXAMPLE))
    assert [b.name for b in config.backends] == ["gpu-rack-1", "openai"]
    assert config.backend("gpu-rack-1").scrape_url == "http://10.0.0.5:8000/metrics"
    assert config.backend("openai").scrape_url is None
    assert config.data_class("restricted").locations == ("onprem",)
    assert config.pii.data_class == "restricted" and config.routing.policy == "onprem-first"
    text = describe(config)
    assert "chat -> gpu-rack-1/llama-3.1-8b-instruct (onprem), openai/gpt-4o-mini (cloud)" in text
    path = tmp_path / "gateway.yaml"
    path.write_text(ISSUE_EXAMPLE)
    ok = _check(path, {"OPENAI_API_KEY": "sk-x", "FERRY_MASTER_KEY": "m"})
    assert ok.returncode == 0, ok.stderr
    assert "gpu-rack-1: ferry at http://10.0.0.5:8000/v1 (onprem)" in ok.stdout and "OK" in ok.stdout


def test_shipped_example_validates() -> None:
    config = load_config(ROOT / "examples" / "gateway.yaml")
    assert len(config.backends) >= 3 and config.teams


def test_missing_key_env_fails_check_naming_the_key(tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(ISSUE_EXAMPLE)
    r = _check(path, {"FERRY_MASTER_KEY": "m"})
    assert r.returncode == 1 and "backends[1].api_key_env: environment variable OPENAI_API_KEY is not set" in r.stderr
    r = _check(path, {"OPENAI_API_KEY": "k"})
    assert r.returncode == 1 and "master_key_env" in r.stderr


def _bad(edit) -> str:
    data = yaml.safe_load(ISSUE_EXAMPLE)
    edit(data)
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


def test_bad_configs_name_the_key() -> None:
    assert _bad(lambda d: d["models"][0]["deployments"][1].update(backend="azure")).startswith(
        "models[0].deployments[1].backend: unknown backend 'azure'")
    assert _bad(lambda d: d["backends"][0].update(url="10.0.0.5:8000")).startswith("backends[0].url:")
    assert _bad(lambda d: d["backends"][0].update(url="ftp://x/v1")).startswith("backends[0].url:")
    assert _bad(lambda d: d.update(default_data_class="secret")).startswith("default_data_class: unknown data class")
    assert _bad(lambda d: d.update(pii={"enabled": True, "data_class": "secret"})).startswith("pii.data_class:")
    assert _bad(lambda d: d["data_classes"].update(x={"locations": ["moon"]})).startswith("data_classes.x.locations")
    assert _bad(lambda d: d["backends"][0].update(location="edge")).startswith("backends[0].location")
    assert _bad(lambda d: d["backends"][0].update(max_concurrency=0)).startswith("backends[0].max_concurrency")
    assert _bad(lambda d: d["backends"][1].update(name="gpu-rack-1")).startswith("backends[1].name: duplicate")
    assert _bad(lambda d: d["routing"].update(policy="fastest")).startswith("routing.policy")
    assert _bad(lambda d: d["routing"].update(overflow={"max_kv_cache_usage": 2})).startswith(
        "routing.overflow.max_kv_cache_usage")
    assert _bad(lambda d: d["backends"][0].update(timout=3)).startswith("backends[0].timout: unknown key")
    assert _bad(lambda d: d.update(databse="x")).startswith("databse: unknown key")
    assert _bad(lambda d: d.update(database="mysql://x")).startswith("database:")
    assert _bad(lambda d: d.update(pii={"patterns": {"emp": "("}})).startswith("pii.patterns.emp: bad regular")
    assert _bad(lambda d: d.update(pii={"detectors": ["dna"]})).startswith("pii.detectors")
    assert _bad(lambda d: d["models"][0].pop("deployments")).startswith("models[0].deployments: is required")


def test_bad_config_fails_check_and_start_up(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("backend: openai", "backend: azure"))
    env = {"OPENAI_API_KEY": "k", "FERRY_MASTER_KEY": "m"}
    r = _check(path, env)
    assert r.returncode == 1 and "models[0].deployments[1].backend: unknown backend 'azure'" in r.stderr
    serve = subprocess.run([sys.executable, "-m", "ferry.cli", "gateway", "--config", str(path), "--port", "0"],
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)
    assert serve.returncode == 1 and "models[0].deployments[1].backend" in serve.stderr
    good = tmp_path / "good.yaml"
    good.write_text(ISSUE_EXAMPLE)
    serve = subprocess.run([sys.executable, "-m", "ferry.cli", "gateway", "--config", str(good), "--port", "0"],
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "FERRY_MASTER_KEY": "m"},
                           timeout=60)
    assert serve.returncode == 1 and "OPENAI_API_KEY is not set" in serve.stderr


def test_create_app_refuses_missing_secrets() -> None:
    from ferry.gateway.app import create_app

    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        create_app(parse_config(yaml.safe_load(ISSUE_EXAMPLE)), {"FERRY_MASTER_KEY": "m"})
