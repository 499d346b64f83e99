"""Hugging Face folders: config.json -> ArchConfig, weights equal the safetensors, sharded indexes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferry.loader import LoadedModel, ModelFormatError, load_model


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def check_against_files(model: LoadedModel, folder: Path) -> None:
    on_disk = file_tensors(folder)
    got = dict(model.weights())
    expected_names = set(on_disk) - ({"lm_head.weight"} if model.arch.tie_word_embeddings else set())
    assert set(got) == expected_names
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, on_disk[name].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_arch_equals_config_json(request: pytest.FixtureRequest, fixture: str) -> None:
    folder: Path = request.getfixturevalue(fixture)
    cfg = json.loads((folder / "config.json").read_text())
    model = load_model(str(folder))
    arch = model.arch
    assert arch.architecture == cfg["architectures"][0]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id"):
        assert getattr(arch, key) == cfg[key], key
    rope = cfg.get("rope_parameters") or {}
    assert arch.rope_theta == cfg.get("rope_theta", rope.get("rope_theta"))
    assert arch.rope_scaling is None
    assert arch.eos_token_ids == (cfg["eos_token_id"],)
    assert arch.attention_bias == (fixture == "tiny_qwen2_dir")
    assert arch.head_dim == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert model.name == folder.name and model.source == folder.resolve()
    assert model.tokenizer.encode("Hello") == [19556]
    assert model.tokenizer.chat_template is not None


def test_llama_weights_equal_files(tiny_llama_dir: Path) -> None:
    model = load_model(str(tiny_llama_dir))
    assert not model.arch.tie_word_embeddings
    check_against_files(model, tiny_llama_dir)
    assert "lm_head.weight" in dict(model.weights())


def test_qwen2_weights_equal_files_with_bias_and_tied(tiny_qwen2_dir: Path) -> None:
    model = load_model(str(tiny_qwen2_dir))
    check_against_files(model, tiny_qwen2_dir)
    names = [n for n, _ in model.weights()]
    assert "model.layers.1.self_attn.k_proj.bias" in names
    assert "lm_head.weight" not in names


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size="2MB")
    for f in tiny_llama_dir.iterdir():
        if not f.name.endswith(".safetensors") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def test_sharded_index_loads(sharded_dir: Path, tiny_llama_dir: Path) -> None:
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    model = load_model(str(sharded_dir))
    check_against_files(model, sharded_dir)
    # bf16 on disk, float32 out, equal to the original weights rounded to bf16.
    original = file_tensors(tiny_llama_dir)
    for name, tensor in model.weights():
        torch.testing.assert_close(tensor, original[name].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_missing_shard_is_a_format_error(tmp_path: Path, sharded_dir: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(sharded_dir, folder)
    next(iter(sorted(folder.glob("*.safetensors")))).unlink()
    with pytest.raises(ModelFormatError, match="missing"):
        load_model(str(folder))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_a_format_error(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError):
        model = load_model(str(folder))
        dict(model.weights())


def test_folder_problems_are_format_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(str(tmp_path))
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelFormatError, match="unsupported architecture"):
        load_model(str(folder))

    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelFormatError, match="missing"):
        load_model(str(folder))

    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ModelFormatError, match="shape"):
        load_model(str(folder))

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(str(folder))

    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        load_model(str(folder))


def test_generation_config_eos_and_rope_scaling(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    model = load_model(str(folder))
    assert model.arch.eos_token_ids == (2, 0)
    assert model.tokenizer.eos_token_ids == (2, 0)
    assert model.arch.rope_theta == 500000.0
    assert model.arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}
