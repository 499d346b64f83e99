"""ferry.engine.preflight.check: resolves the model, reads its config, and refuses what cannot fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from ferry.config import CacheConfig, EngineConfig, ModelConfig
from ferry.engine.preflight import InsufficientMemoryError, check, estimate
from ferry.loader import (
    ModelFormatError,
    ModelNotFoundError,
    expected_weight_shapes,
    load_model,
)
from hub.fake_hub import FakeHub, FakeRepo
from hub.tiny_gguf import write_tiny_gguf

GiB = 1 << 30


def _budget(n: int):
    return lambda device: n


def test_memory_error_names_the_terms(hub: FakeHub, tiny_llama_dir: Path) -> None:
    hub.repos["tiny-org/tiny-llama"] = FakeRepo.from_folder(tiny_llama_dir)
    config = EngineConfig(ModelConfig("tiny-org/tiny-llama", device="cpu", max_model_len=300))
    arch = load_model(str(tiny_llama_dir)).arch
    weights = sum(math.prod(s) for s in expected_weight_shapes(arch).values()) * 4
    kv = 300 * arch.kv_bytes_per_token(4)  # 2 layers x 2 KV heads x 16 x K,V x 4 bytes per token
    assert kv == 300 * 512
    with pytest.raises(InsufficientMemoryError) as err:
        check(config, available_memory=_budget(weights + kv - 1))
    assert str(err.value) == (
        f"tiny-org/tiny-llama needs {(weights + kv) / GiB:.2f} GiB of cpu memory (weights {weights / GiB:.2f} GiB "
        f"as float32 + KV {kv / GiB:.2f} GiB for 300 tokens) but {(weights + kv - 1) / GiB:.2f} GiB is available; "
        "lower --max-model-len, pick a smaller model or quant, or a smaller --dtype")
    check(config, available_memory=_budget(weights + kv))  # exactly enough: no error


def test_kv_term_is_one_sequence_of_the_context_or_the_configured_pool(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    cpu = torch.device("cpu")
    need = estimate(EngineConfig(ModelConfig(str(tiny_llama_dir), dtype="bfloat16")), loaded, tiny_llama_dir, cpu, 0)
    assert (need.kv_tokens, need.kv_bytes) == (512, 512 * 256)  # the model's context; bf16 halves KV and weights
    assert need.weight_format == "bfloat16" and not need.fits
    pool = EngineConfig(ModelConfig(str(tiny_llama_dir)), CacheConfig(kv_cache_memory=1 << 20))
    assert estimate(pool, loaded, tiny_llama_dir, cpu, 0).kv_bytes == 1 << 20


def test_gguf_weights_count_kernel_types_as_blocks_only_when_packed(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny-Q8_0.gguf", matrix_type=Q.Q8_0)
    loaded = load_model(str(path))
    tensors = GGUFReader(str(path)).tensors
    blocks = sum(int(t.n_bytes) for t in tensors if t.tensor_type == Q.Q8_0)
    floats = sum(int(t.n_elements) for t in tensors if t.tensor_type == Q.F32)
    cpu = torch.device("cpu")
    packed = estimate(EngineConfig(ModelConfig(str(path))), loaded, path, cpu, GiB)
    assert packed.weights_bytes == blocks + 4 * floats and packed.weight_format == "GGUF blocks + float32"
    auto = estimate(EngineConfig(ModelConfig(str(path), dtype="auto")), loaded, path, cpu, GiB)
    assert auto == packed  # --dtype auto is float32 on CPU
    dense = estimate(EngineConfig(ModelConfig(str(path), weight_format="dense")), loaded, path, cpu, GiB)
    assert dense.weights_bytes == 4 * sum(int(t.n_elements) for t in tensors)


def test_split_gguf_weights_count_every_shard(hub: FakeHub, tmp_path: Path) -> None:
    from ferry.engine.preflight import _gguf_weight_bytes

    one = write_tiny_gguf(tmp_path / "one.gguf")
    data = one.read_bytes()
    # NOTE: three copies of a whole file stand for three shards: only the tensor tables are read.
    hub.repos["tiny-org/Split-GGUF"] = FakeRepo({f"S-F32-{i:05d}-of-00003.gguf": data for i in (1, 2, 3)})
    from ferry.hub import resolve

    first = resolve("tiny-org/Split-GGUF")
    assert _gguf_weight_bytes(first, 4, packed=True) == 3 * _gguf_weight_bytes(one, 4, packed=True)


def test_model_errors_surface_before_serving(hub: FakeHub, tmp_path: Path, tiny_llama_dir: Path) -> None:
    import json
    import shutil

    with pytest.raises(ModelNotFoundError, match="^repo 'tiny-org/missing' not found"):
        check(EngineConfig(ModelConfig("tiny-org/missing")), available_memory=_budget(GiB))
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "mamba"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"],
                                                    "model_type": "mamba"}))
    with pytest.raises(ModelFormatError, match="unsupported architecture"):
        check(EngineConfig(ModelConfig(str(folder))), available_memory=_budget(GiB))
