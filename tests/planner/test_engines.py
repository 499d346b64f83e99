"""Which engine runs a layout, and what the plan offers when `ferry serve` (one device, no tensor parallelism,
bf16/fp16/fp32 weights on a GPU) cannot run it."""

from __future__ import annotations

import json

import pytest
import yaml

from ferry.cli import main
from ferry.planner.catalog import get_dtype, get_gpu
from ferry.planner.engines import (
    FERRY,
    LLAMA_CPP,
    SGLANG,
    VLLM,
    engines_for,
    get_engine,
    why_not,
)


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_llama_70b_bf16_on_h100_names_its_engines_and_a_ferry_alternative(capsys: pytest.CaptureFixture[str]) -> None:
    d = _plan(capsys, "--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--dtype", "bf16")
    e = d["engines"]
    assert d["memory"]["tp"] == 2 and not e["ferry_runs"]
    assert "one device per replica" in e["ferry_why_not"]
    assert VLLM in e["engines"] and SGLANG in e["engines"] and FERRY not in e["engines"]
    kinds = {a["kind"]: a for a in e["alternatives"]}
    # what ferry can run instead: every such alternative is one GPU in a format ferry holds there
    ferry_alts = [a for a in e["alternatives"] if a["ferry_runs"]]
    assert ferry_alts and all(a["gpus"] == 1 and a["dtype"] in ("bf16", "fp16", "fp32") for a in ferry_alts)
    assert kinds["bigger-gpu"]["gpu"] == "h200" and kinds["bigger-gpu"]["command"].startswith("ferry serve")
    assert kinds["smaller-model"]["model"] == "llama-3.1-8b" and kinds["smaller-model"]["gpu"] == "h100-sxm"
    # a quantized 70B fits one H100, but not under ferry (it would dequantize to bf16 on a GPU)
    q = kinds["quantized"]
    assert q["gpus"] == 1 and not q["ferry_runs"] and q["engine"] in (VLLM, SGLANG)
    # the planned TP2 layout on a vLLM backend behind ferry gateway, with vLLM's memory flag
    backend = next(a for a in e["alternatives"] if a["kind"] == "backend" and a["engine"] == VLLM)
    assert "--tensor-parallel-size 2" in backend["command"] and "--gpu-memory-utilization 0.9" in backend["command"]
    assert "weights, activations" in backend["memory_model"]


def test_text_plan_for_70b_says_who_runs_what(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-70b", "--gpu", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    assert "ferry cannot: ferry runs one device per replica" in out
    assert "(ferry runs it)" in out and "vllm serve" in out and "--mem-fraction-static" in out


def test_sglang_fraction_covers_weights_and_kv_pool(capsys: pytest.CaptureFixture[str]) -> None:
    d = _plan(capsys, "--model", "llama-3.1-70b", "--gpu", "h100-sxm")
    m, gpu = d["memory"], d["gpu"]
    backend = next(a for a in d["engines"]["alternatives"] if a["engine"] == SGLANG)
    fraction = (m["per_gpu_weight_bytes"] + m["per_gpu_kv_bytes"]) / (gpu["memory_gib"] * 1024**3)
    assert backend["memory_flag"] == f"--mem-fraction-static {fraction:.2f}"


@pytest.mark.parametrize("gpu,dtype,kv,tp,pp,ferry_reason", [
    ("h100-sxm", "bf16", "bf16", 1, 1, None),
    ("h100-sxm", "bf16", "bf16", 2, 1, "one device per replica"),
    ("h100-sxm", "q4_k_m", "fp16", 1, 1, "dequantizes GGUF q4_k_m weights on a GPU"),
    ("h100-sxm", "int4", "bf16", 1, 1, "does not run int4 weights on a GPU"),
    ("h100-sxm", "bf16", "fp8", 1, 1, "KV cache has the model's dtype (bf16)"),
    ("cpu", "q4_k_m", "fp32", 1, 1, None),
    ("cpu", "fp32", "fp32", 1, 1, None),
    ("mi300x", "bf16", "bf16", 1, 1, "CPUs and CUDA GPUs"),
])
def test_why_ferry_cannot(gpu: str, dtype: str, kv: str, tp: int, pp: int, ferry_reason: str | None) -> None:
    reason = why_not(get_engine(FERRY), get_gpu(gpu), get_dtype(dtype), get_dtype(kv, for_kv=True), tp, pp)
    assert reason == ferry_reason if ferry_reason is None else ferry_reason in str(reason)


def test_engines_for_formats() -> None:
    h100 = get_gpu("h100-sxm")
    assert engines_for(h100, get_dtype("q4_k_m"), get_dtype("fp16", for_kv=True), 1, 1) == (LLAMA_CPP,)
    assert engines_for(h100, get_dtype("fp8"), get_dtype("fp8", for_kv=True), 4, 2) == (VLLM, SGLANG)


def test_int4_on_l4_offers_the_same_model_in_a_format_ferry_holds(capsys: pytest.CaptureFixture[str]) -> None:
    d = _plan(capsys, "--model", "llama-3.1-8b", "--gpu", "l4", "--dtype", "int4")
    alt = d["engines"]["alternatives"][0]
    assert (alt["kind"], alt["model"], alt["dtype"], alt["gpu"], alt["ferry_runs"]) == \
        ("ferry-format", "llama-3.1-8b", "bf16", "l4", True)


def test_deployment_is_what_an_emitter_reads(capsys: pytest.CaptureFixture[str]) -> None:
    d = _plan(capsys, "--model", "llama-3.1-8b", "--rps", "20", "--peak-rps", "60", "--restricted-share", "0.4")
    dep, rec = d["deployment"], d["recommendation"]["option"]
    opt = next(o for o in d["options"] if o["name"] == rec)
    assert dep["engine"] == FERRY and dep["serve_command"].startswith("ferry serve")
    assert dep["gpus_per_replica"] == d["memory"]["gpus"] and dep["max_model_len"] == d["context"]
    assert dep["replicas_max"] == (opt["onprem_replicas"] if rec.startswith("hybrid") else
                                   d["throughput"]["replicas_peak"])
    assert len(dep["hourly_replicas"]) == 24 and dep["replicas_min"] == min(dep["hourly_replicas"])
    assert max(dep["hourly_replicas"]) <= dep["replicas_max"]
    assert dep["max_concurrency_per_replica"] == d["throughput"]["slo_batch"]
    assert dep["input_per_mtok"] == d["gateway"]["onprem_input_per_mtok"]
    assert dep["data_classes"] == {"public": ["onprem", "cloud"], "restricted": ["onprem"]}
    assert dep["restricted_share"] == 0.4
    assert dep["replicas_max"] * d["throughput"]["replica_capacity_rps"] >= 0.4 * d["traffic"]["peak_rps"]


def test_gateway_fragment_names_the_engine_that_runs_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    from ferry.gateway.config import parse_config

    d = _plan(capsys, "--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--rps", "1")
    assert d["deployment"]["engine"] == VLLM and "vllm serve" in d["gateway"]["config"]
    parse_config(yaml.safe_load(d["gateway"]["config"]))
