"""Catalogue facts: parameter counts, KV bytes, MoE active parameters, sources, HF config and GGUF reading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.config import ArchConfig
from ferry.planner.catalog import (get_dtype, get_gpu, load_gpus, load_models, model_from_hf_dict, resolve_model)
from ferry.planner.errors import PlannerError
from ferry.planner.memory import weight_bytes


def test_llama_3_1_8b_weights_and_kv_bytes() -> None:
    m = resolve_model("llama-3.1-8b")
    assert weight_bytes(m, get_dtype("bf16")) == pytest.approx(16.06e9, rel=0.01)
    assert m.kv_bytes_per_token(2) == 131_072  # 32 layers x 8 KV heads x 128 x 2 x 2 bytes


def test_mixtral_active_parameters_differ_from_total() -> None:
    m = resolve_model("mixtral-8x7b")
    assert m.is_moe
    assert m.total_params == pytest.approx(46.7e9, rel=0.01)
    assert m.active_params == pytest.approx(12.9e9, rel=0.01)
    assert m.active_params < m.total_params / 3


@pytest.mark.parametrize("name", sorted(load_models()))
def test_computed_parameters_match_the_model_card(name: str) -> None:
    m = load_models()[name]
    assert m.total_params == pytest.approx(m.published_params, rel=0.02)
    assert m.source.startswith("https://huggingface.co/")


def test_every_gpu_value_has_a_source() -> None:
    for gpu in load_gpus().values():
        fields = [f for f in gpu.__dataclass_fields__ if f not in ("name", "description", "sources")]
        assert set(gpu.sources) == set(fields), gpu.name
        assert all(s.strip() for s in gpu.sources.values())


def test_names_and_aliases_resolve_case_insensitively() -> None:
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert resolve_model("SmolLM2-135M-Instruct").name == "smollm2-135m"
    assert get_gpu("H100-SXM").name == "h100-sxm"
    assert get_dtype("bfloat16").name == "bf16"


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(PlannerError, match="unknown GPU 'b200'"):
        get_gpu("b200")
    with pytest.raises(PlannerError, match="unknown model 'gpt-17'"):
        resolve_model("gpt-17")
    with pytest.raises(PlannerError, match="unknown dtype"):
        get_dtype("fp7")
    with pytest.raises(PlannerError, match="cannot hold the KV cache"):
        get_dtype("q4_k_m", for_kv=True)


def test_hf_config_json_and_folder_match_the_catalogue(tmp_path: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 131072, "tie_word_embeddings": False}
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    for ref in (str(folder), str(folder / "config.json")):
        m = resolve_model(ref)
        assert m.total_params == resolve_model("llama-3.1-8b").total_params
        assert m.kv_bytes_per_token(2) == 131_072


def test_hf_moe_and_multimodal_configs() -> None:
    moe = model_from_hf_dict({"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
                              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "max_position_embeddings": 32768, "num_local_experts": 8,
                              "num_experts_per_tok": 2}, name="m")
    assert moe.total_params == resolve_model("mixtral-8x7b").total_params
    assert moe.active_params == resolve_model("mixtral-8x7b").active_params
    nested = model_from_hf_dict({"architectures": ["X"], "text_config": {
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4}}, name="mm")
    assert nested.num_key_value_heads == 4 and nested.head_dim == 16


def test_bad_hf_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(PlannerError, match="lacks integer vocab_size"):
        resolve_model(str(bad))
    bad.write_text("{not json")
    with pytest.raises(PlannerError, match="cannot read Hugging Face config"):
        resolve_model(str(bad))


SMOLLM2 = ArchConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, tie_word_embeddings=True)


def test_gguf_metadata_gives_smollm2_shape_and_exact_bytes(smollm2_path: Path) -> None:
    m = resolve_model(str(smollm2_path))
    assert (m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.num_hidden_layers, m.head_dim,
            m.intermediate_size, m.vocab_size, m.max_position_embeddings, m.tie_word_embeddings) == (
        576, 9, 3, 30, 64, 1536, 49152, 8192, True)
    assert m.kv_bytes_per_token(4) == SMOLLM2.kv_bytes_per_token(4)
    # the tensor table's count agrees with the count from the shape, and the file's own bytes are used
    assert m.total_params == resolve_model("smollm2-135m").total_params
    assert m.file_type == "q4_1"
    assert weight_bytes(m, get_dtype("q4_1")) == m.file_weight_bytes
    assert weight_bytes(m, get_dtype("q4_1")) < weight_bytes(m, get_dtype("bf16")) / 2


def test_planner_does_not_import_torch() -> None:
    code = ("import sys; import ferry.planner.command, ferry.planner.plan, ferry.planner.calibrate, "
            "ferry.planner.report; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
