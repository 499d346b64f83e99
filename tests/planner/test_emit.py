"""`ferry plan --emit DIR`: every emitted file passes the checks the deployment kit and `ferry gateway check` use:
cluster.yaml through ferry.cluster.spec's parser, values.yaml rendered by Helm's engine with every manifest
validated against the Kubernetes schemas, gateway.yaml through the gateway's loader and `ferry gateway check`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from ferry.cli import main
from ferry.cluster.spec import load_spec
from ferry.gateway.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSIONS = ("1.30.0", "1.37.0")
HOURLY = [1, 1, 1, 1, 1, 1, 2, 4, 6, 8, 8, 8, 8, 8, 8, 6, 4, 3, 2, 2, 1, 1, 1, 1]
# ferry's built-in model on a CPU with a small KV pool: what the cluster test deploys
CPU_PLAN = ["--model", "smollm2-135m-instruct", "--gpu", "cpu", "--kv-cache-memory", "256MiB", "--context", "2048",
            "--replica-cpus", "1"]


def _traffic(tmp_path: Path, scale: float) -> str:
    path = tmp_path / f"traffic-{scale:g}.yaml"
    path.write_text(yaml.safe_dump({"hourly_rps": [r * scale for r in HOURLY], "prompt_tokens": 512,
                                    "output_tokens": 256}))
    return str(path)


def _emit(capsys: pytest.CaptureFixture[str], out: Path, argv: list[str]) -> dict[str, Any]:
    """Emit into ``out``; the plan's JSON."""
    assert main(["plan", *argv, "--json", "--emit", str(out)]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    for name in sorted(p.name for p in out.iterdir()):
        assert f"wrote {out / name}" in captured.err
    return plan


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _gateway_check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_KEY")}
    ferry = Path(sys.executable).with_name("ferry")  # the installed console script, as a user runs it
    return subprocess.run([str(ferry), "gateway", "check", str(path)], capture_output=True,
                          text=True, env={**clean, **env}, timeout=120, check=False)


@pytest.fixture(scope="module")
def render_module() -> ModuleType:
    pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's engine) is not installed")
    spec = importlib.util.spec_from_file_location("ferry_emit_render", ROOT / "deploy" / "helm" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _helm(render_module: ModuleType, values: Path) -> list[dict[str, Any]]:
    """Helm's engine renders the chart with the emitted values; every manifest validates."""
    import kubernetes_validate

    docs = [d for _, _, d in render_module.split_documents(render_module.render_templates(_yaml(values)))]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # NOTE: the Prometheus operator's CRD: tests/deploy checks its shape
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_cpu_plan_with_a_daily_curve_autoscales_within_the_hourly_bounds(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, render_module: ModuleType) -> None:
    out = tmp_path / "emit"
    plan = _emit(capsys, out, [*CPU_PLAN, "--traffic", _traffic(tmp_path, 1), "--restricted-share", "1"])
    dep = plan["deployment"]
    assert (dep["location"], dep["replicas_min"], dep["replicas_max"]) == ("onprem", 1, 4)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "cluster.yaml", "gateway.yaml", "values.yaml"]

    spec = load_spec(out / "cluster.yaml")  # ferry.cluster's own parser, ferry serve flags included
    (m,) = spec.models
    assert m.autoscaling is not None
    assert (m.autoscaling.min_replicas, m.autoscaling.max_replicas) == (min(dep["hourly_replicas"]),
                                                                       max(dep["hourly_replicas"]))
    assert m.autoscaling.target_load == dep["max_concurrency_per_replica"]
    engine, server = m.configs()
    assert engine.model.model == "smollm2-135m-instruct"  # ferry's built-in, loadable offline
    assert engine.cache.kv_cache_memory == 256 * 1024**2
    assert engine.scheduler.max_num_seqs == dep["max_concurrency_per_replica"]
    assert engine.model.max_model_len == 2048 and server.served_model_name == "smollm2-135m"
    assert (m.resources.num_cpus, m.resources.num_gpus) == (1.0, 0.0)
    assert m.resources.memory is not None and m.resources.memory >= plan["memory"]["weight_bytes"] + 256 * 1024**2

    docs = _helm(render_module, out / "values.yaml")
    (hpa,) = _one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    serve = [d for d in _one(docs, "Deployment") if "ferry-model" in d["metadata"]["labels"]]
    assert len(serve) == 1 and "replicas" not in serve[0]["spec"], "the HPA owns the replica count"
    container = serve[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("-cpu") and "nvidia.com/gpu" not in container["resources"]["requests"]
    (cm,) = [d for d in _one(docs, "ConfigMap") if d["metadata"]["name"] == "ferry-gateway"]
    rendered_gateway = parse_config(yaml.safe_load(cm["data"]["gateway.yaml"]))
    (backend,) = rendered_gateway.backends
    assert backend.max_concurrency == dep["replicas_max"] * dep["max_concurrency_per_replica"]
    assert backend.input_per_mtok == pytest.approx(dep["input_per_mtok"], abs=1e-4)
    assert rendered_gateway.data_class("restricted").locations == ("onprem",)

    gw = load_config(out / "gateway.yaml")
    assert [b.location for b in gw.backends] == ["onprem"]
    check = _gateway_check(out / "gateway.yaml", {"FERRY_MASTER_KEY": "placeholder"})
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout


def test_gpu_hybrid_overflows_to_cloud_gpus_at_the_plans_prices(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, render_module: ModuleType) -> None:
    out = tmp_path / "emit"
    plan = _emit(capsys, out, ["--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--traffic", _traffic(tmp_path, 60),
                               "--restricted-share", "0.2"])
    dep = plan["deployment"]
    assert plan["recommendation"]["option"] == "hybrid on-prem + cloud" and dep["overflow_target"] == "cloud on-demand"
    m = load_spec(out / "cluster.yaml").models[0]
    assert m.autoscaling is not None and (m.autoscaling.min_replicas, m.autoscaling.max_replicas) == (2, 3)
    assert (m.resources.num_gpus, m.resources.num_cpus) == (1.0, 4.0)
    engine, _ = m.configs()
    assert engine.model.model == "meta-llama/Llama-3.1-8B-Instruct" and engine.model.dtype == "bfloat16"

    gw = load_config(out / "gateway.yaml")
    onprem, cloud = gw.backends
    assert (onprem.location, onprem.kind, cloud.location) == ("onprem", "ferry", "cloud")
    assert onprem.input_per_mtok == pytest.approx(dep["input_per_mtok"], abs=1e-4)
    assert onprem.output_per_mtok == pytest.approx(dep["output_per_mtok"], abs=1e-4)
    options = {o["name"]: o for o in plan["options"]}
    ratio = options["cloud on-demand"]["usd_per_mtok"] / options["on-prem"]["usd_per_mtok"]
    assert cloud.output_per_mtok == pytest.approx(dep["output_per_mtok"] * ratio, abs=1e-3)
    assert cloud.api_key_env == "CLOUD_FERRY_API_KEY"
    assert gw.data_class("restricted").locations == ("onprem",)
    assert gw.routing.overflow.inflight_fraction == dep["overflow_inflight_fraction"]
    assert [d.backend for d in gw.models[0].deployments] == [onprem.name, cloud.name]
    # no secret in any file, only the variables' names
    assert "placeholder-secret" not in "".join(p.read_text() for p in out.iterdir())
    ok = _gateway_check(out / "gateway.yaml", {"FERRY_MASTER_KEY": "placeholder-secret",
                                               "CLOUD_FERRY_API_KEY": "placeholder-secret"})
    assert ok.returncode == 0, ok.stderr
    missing = _gateway_check(out / "gateway.yaml", {"FERRY_MASTER_KEY": "placeholder-secret"})
    assert missing.returncode == 1 and "CLOUD_FERRY_API_KEY is not set" in missing.stderr
    readme = (out / "README.md").read_text()
    assert "CLOUD_FERRY_API_KEY" in readme and "ferry cluster deploy cluster.yaml" in readme

    docs = _helm(render_module, out / "values.yaml")
    serve = next(d for d in _one(docs, "Deployment") if "ferry-model" in d["metadata"]["labels"])
    resources = serve["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    (cm,) = [d for d in _one(docs, "ConfigMap") if d["metadata"]["name"] == "ferry-gateway"]
    rendered = parse_config(yaml.safe_load(cm["data"]["gateway.yaml"]))
    assert [b.location for b in rendered.backends] == ["onprem", "cloud"]
    assert [d.backend for d in rendered.models[0].deployments] == ["llama-3-1-8b", cloud.name]


def test_memory_only_plan_emits_one_replica_and_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        render_module: ModuleType) -> None:
    out = tmp_path / "emit"
    plan = _emit(capsys, out, ["--model", "llama-3.1-8b", "--gpu", "h100-sxm"])
    assert "deployment" not in plan
    m = load_spec(out / "cluster.yaml").models[0]
    assert m.autoscaling is None and m.num_replicas == 1
    engine, _ = m.configs()
    assert engine.cache.gpu_memory_utilization == 0.9
    docs = _helm(render_module, out / "values.yaml")
    assert _one(docs, "HorizontalPodAutoscaler") == []
    serve = next(d for d in _one(docs, "Deployment") if "ferry-model" in d["metadata"]["labels"])
    assert serve["spec"]["replicas"] == 1
    gw = load_config(out / "gateway.yaml")
    assert [(b.location, b.input_per_mtok) for b in gw.backends] == [("onprem", 0.0)]
    assert "Memory-only plan" in (out / "README.md").read_text()


def test_a_layout_ferry_cannot_run_gets_a_vllm_backend_not_a_broken_ferry_config(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "emit"
    plan = _emit(capsys, out, ["--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--rps", "2"])
    assert plan["engines"]["ferry_runs"] is False
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "gateway.yaml"]
    gw = load_config(out / "gateway.yaml")
    (b,) = gw.backends
    assert (b.kind, b.location) == ("openai", "onprem") and b.url.startswith("http://vllm-")
    assert gw.models[0].deployments[0].model == "meta-llama/Llama-3.1-70B-Instruct"
    readme = (out / "README.md").read_text()
    assert "vllm serve meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 2" in readme
    assert "What ferry can run instead" in readme and "ferry serve --model" in readme
    check = _gateway_check(out / "gateway.yaml", {"FERRY_MASTER_KEY": "k"})
    assert check.returncode == 0, check.stderr


def test_an_api_only_recommendation_emits_the_gateway_alone(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    out = tmp_path / "emit"
    plan = _emit(capsys, out, ["--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--rps", "0.001"])
    assert plan["recommendation"]["option"] == "API"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "gateway.yaml"]
    gw = load_config(out / "gateway.yaml")
    (b,) = gw.backends
    price = plan["costs"]["assumptions"]["api_price"]
    assert (b.location, b.kind, b.api_key_env) == ("cloud", "openai", "API_PROVIDER_KEY")
    assert b.input_per_mtok == pytest.approx(price["input_usd_per_mtok"])
    assert gw.pii.enabled is False
    assert "self-hosts nothing" in (out / "README.md").read_text()


def test_emit_refuses_a_folder_in_use_unless_forced(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "emit"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["plan", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--emit", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty (notes.txt); use --force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([*argv, "--force"]) == 0
    assert {"cluster.yaml", "gateway.yaml", "notes.txt"} <= {p.name for p in out.iterdir()}
    # a forced emit of a layout ferry cannot run removes the earlier ferry configs, not the user's file
    assert main(["plan", "--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--emit", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "gateway.yaml", "notes.txt"]


@pytest.mark.parametrize("setup,extra,message", [
    (lambda d: d.write_text("x"), [], "exists and is not a folder"),
    (lambda d: None, ["--calibrate-from", "bench.json"], "without --calibrate"),
    (lambda d: None, ["--replica-cpus", "0"], "--replica-cpus must be positive"),
])
def test_emit_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, setup, extra: list[str],
                                         message: str) -> None:
    target = tmp_path / "emit"
    setup(target)
    assert main(["plan", "--model", "smollm2-135m", "--gpu", "cpu", "--emit", str(target), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ferry plan: error: ") and "\n" not in err and message in err


def test_emit_into_an_unwritable_place_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["plan", "--model", "smollm2-135m", "--gpu", "cpu", "--emit", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ferry plan: error: --emit: cannot write into") and "\n" not in err
