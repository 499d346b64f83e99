"""The KV pool's default size (what max_num_seqs x max_model_len can use, capped by free memory) and
its lazily committed CPU allocation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ferry import LLM
from ferry.config import ArchConfig, CacheConfig
from ferry.model.kv_tensors import zeroed_pool
from ferry.runner.memory import (
    CPU_DEFAULT_CAP,
    GiB,
    MiB,
    available_cpu_memory,
    kv_budget,
    num_kv_blocks,
)

CPU = torch.device("cpu")


def _arch() -> ArchConfig:
    return ArchConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_default_pool_holds_what_the_sequences_can_use() -> None:
    arch, cache = _arch(), CacheConfig(block_size=16)
    per_token = arch.kv_bytes_per_token(4)  # 2 x 2 layers x 2 heads x 16 x 4 B = 512 B
    budget = kv_budget(arch, cache, torch.float32, CPU, demand_tokens=4 * 100)
    # 4 sequences of 100 tokens: whole blocks, 400 -> 400 tokens (25 blocks of 16)
    assert budget.bytes == 25 * 16 * per_token
    assert "max_num_seqs x max_model_len need" in budget.reason
    assert num_kv_blocks(arch, cache, torch.float32, CPU, demand_tokens=4 * 100) == 25


def test_a_demand_beyond_free_memory_is_capped() -> None:
    arch, cache = _arch(), CacheConfig(block_size=16)
    huge = 10**12  # tokens
    budget = kv_budget(arch, cache, torch.float32, CPU, demand_tokens=huge)
    assert budget.bytes <= min(available_cpu_memory(), CPU_DEFAULT_CAP)
    assert "would need" in budget.reason


def test_explicit_sizes_win_over_the_demand() -> None:
    arch = _arch()
    budget = kv_budget(arch, CacheConfig(kv_cache_memory=3 * MiB), torch.float32, CPU, demand_tokens=64)
    assert budget.bytes == 3 * MiB and budget.reason == "--kv-cache-memory"


def test_the_engine_sizes_its_pool_from_its_limits(tiny_llama_dir: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ferry.runner.memory"):
        llm = LLM(str(tiny_llama_dir), max_num_seqs=3, max_model_len=64)
    runner = llm.engine.core.runner
    assert runner.num_blocks == 3 * 64 // 16
    assert any("max_num_seqs x max_model_len need" in r.getMessage() for r in caplog.records)


def test_a_draft_models_kv_shares_the_budget(tiny_llama_dir: Path) -> None:
    arch, cache = _arch(), CacheConfig(block_size=16, kv_cache_memory=1 * MiB)
    alone = num_kv_blocks(arch, cache, torch.float32, CPU)
    # a draft of the same shape doubles the bytes per token: half the blocks fit
    assert num_kv_blocks(arch, cache, torch.float32, CPU, draft=arch) == alone // 2
    # the engine: the target's pool and the draft's tensors together stay within the budget
    budget = 2 * MiB
    llm = LLM(str(tiny_llama_dir), kv_cache_memory=budget,
              speculative_config={"model": str(tiny_llama_dir), "num_speculative_tokens": 2})
    runner = llm.engine.core.runner
    assert runner.draft is not None
    used = runner.kv_cache_bytes + runner.draft.kv_cache_bytes
    block = used // runner.num_blocks
    assert budget - block < used <= budget


def test_the_cpu_pool_reads_as_zeros_and_costs_memory_only_when_written() -> None:
    before = _rss()
    pool = zeroed_pool(GiB // 2, torch.float32)
    assert pool.numel() == GiB // 8 and pool.dtype == torch.float32
    assert _rss() - before < 64 * MiB  # nothing committed yet
    view = pool.view(2, -1)
    assert float(view[1, -1]) == 0.0 and float(view[0, 0]) == 0.0
    view[0, : (GiB // 16)].fill_(1.0)  # write a quarter of a GiB
    grown = _rss() - before
    assert 200 * MiB < grown < 400 * MiB
    assert float(pool.sum()) == GiB // 16
