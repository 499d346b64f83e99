"""The KV pool on a GPU sized by --gpu-memory-utilization (vLLM's rule): weights + KV cache stay
within F x the device's total memory, and the pool takes what is left of it but the reserve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferry.config import CacheConfig, EngineConfig, ModelConfig
from ferry.engine.llm_engine import LLMEngine
from ferry.runner.memory import UTILIZATION_RESERVE, total_device_memory


def engine(path: Path, fraction: float) -> LLMEngine:
    return LLMEngine(EngineConfig(ModelConfig(str(path), "bfloat16", "cuda", 2048),
                                  CacheConfig(gpu_memory_utilization=fraction)))


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_pool_fills_the_share_left_by_the_weights(smollm2_path: Path, fraction: float) -> None:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    eng = engine(smollm2_path, fraction)
    runner = eng.core.runner
    total = total_device_memory(runner.device)
    share = fraction * total
    held = torch.cuda.memory_allocated() - before  # weights + KV pool + buffers, as the allocator counts
    assert held <= share, f"{held / 2**30:.2f} GiB held > {fraction} x {total / 2**30:.1f} GiB"
    weights = held - runner.kv_cache_bytes
    block_bytes = runner.kv_cache_bytes // runner.num_blocks
    # the pool is the budget rounded down to whole blocks; ferry counts as weights everything the
    # allocator held before the pool (what earlier tests left, rope tables)
    expected = share - (before + weights) - UTILIZATION_RESERVE
    assert expected - block_bytes - (8 << 20) <= runner.kv_cache_bytes <= expected + (8 << 20)
    del eng, runner
    torch.cuda.empty_cache()


def test_a_share_the_weights_already_fill_is_refused(smollm2_path: Path) -> None:
    total = total_device_memory(torch.device("cuda"))
    tiny = (UTILIZATION_RESERVE // 2) / total  # less than the reserve alone
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        engine(smollm2_path, max(tiny, 1e-6))
