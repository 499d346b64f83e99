"""Memory: KV capacity as the engine sizes its pool, parallel layouts that fit, hand-computed budgets."""

from __future__ import annotations

import pytest

from ferry.config import ArchConfig
from ferry.planner.catalog import GIB, get_dtype, get_gpu, resolve_model
from ferry.planner.errors import PlannerError
from ferry.planner.memory import activation_bytes, kv_token_capacity, plan_memory

SMOLLM2 = ArchConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, tie_word_embeddings=True)


@pytest.mark.parametrize("kv_cache_memory", [1, 64 * 1024**2, 100_000_000, 512 * 1024**2, 3 * 1024**3 + 17])
def test_kv_capacity_follows_the_engine_rule_for_smollm2(kv_cache_memory: int) -> None:
    # the engine: num_blocks = kv_cache_memory // (block_size * kv_bytes_per_token(4)); tokens = blocks x 16
    per_token = 2 * 30 * 3 * 64 * 4
    assert SMOLLM2.kv_bytes_per_token(4) == per_token == 46_080
    expected = kv_cache_memory // (16 * per_token) * 16
    assert kv_token_capacity(SMOLLM2, kv_cache_memory) == expected
    # the catalogue's SmolLM2 gives the same answer as the engine's ArchConfig
    assert kv_token_capacity(resolve_model("smollm2-135m"), kv_cache_memory) == expected


def test_kv_capacity_hand_computed() -> None:
    # 64 MiB / (16 x 46080 B) = 91.0 blocks -> 91 x 16 = 1456 tokens
    assert kv_token_capacity(SMOLLM2, 64 * 1024**2) == 1456
    assert kv_token_capacity(SMOLLM2, 64 * 1024**2, block_size=32, kv_dtype_bytes=2) == 91 * 32
    assert kv_token_capacity(SMOLLM2, 16 * 46_080 - 1) == 0


def test_plan_memory_with_a_fixed_kv_pool_matches_the_engine_rule() -> None:
    mem = plan_memory(resolve_model("smollm2-135m"), get_gpu("cpu"), get_dtype("fp32"), get_dtype("fp32"), 1024,
                      kv_cache_memory=256 * 1024**2)
    assert (mem.tp, mem.pp) == (1, 1)
    assert mem.kv_tokens == kv_token_capacity(SMOLLM2, 256 * 1024**2)
    assert mem.max_concurrent_seqs == mem.kv_tokens // 1024


def test_llama_3_1_70b_needs_at_least_two_h100s_in_bf16() -> None:
    m, h100, bf16 = resolve_model("llama-3.1-70b"), get_gpu("h100-sxm"), get_dtype("bf16")
    mem = plan_memory(m, h100, bf16, bf16, 8192)
    assert mem.gpus >= 2
    assert m.total_params * 2 > h100.memory_bytes  # the weights alone overflow one GPU
    # fp8 halves the weights: one H100 then fits
    assert plan_memory(m, h100, get_dtype("fp8"), get_dtype("fp8"), 8192).gpus == 1


def test_llama_8b_fits_one_gpu_and_405b_needs_two_nodes_of_h100() -> None:
    bf16 = get_dtype("bf16")
    assert plan_memory(resolve_model("llama-3.1-8b"), get_gpu("h100-sxm"), bf16, bf16, 8192).gpus == 1
    big = plan_memory(resolve_model("llama-3.1-405b"), get_gpu("h100-sxm"), bf16, bf16, 8192)
    assert (big.tp, big.pp) == (8, 2)
    assert plan_memory(resolve_model("llama-3.1-405b"), get_gpu("h200"), bf16, bf16, 8192).gpus == 8


def test_memory_budget_adds_up_by_hand() -> None:
    m, gpu, bf16 = resolve_model("llama-3.1-8b"), get_gpu("h100-sxm"), get_dtype("bf16")
    mem = plan_memory(m, gpu, bf16, bf16, 8192, memory_utilization=0.9, max_num_batched_tokens=2048, max_num_seqs=256)
    usable = 79.6 * GIB * 0.9
    act = 2048 * (4 * 4096 + (32 + 16) * 128 + 2 * 14336) * 2 + 256 * 128256 * 4
    assert activation_bytes(m, 1, 2, 2048, 256) == act
    pool = usable - m.total_params * 2 - 1.5 * GIB - act
    assert mem.per_gpu_kv_bytes == pytest.approx(pool)
    assert mem.kv_tokens == int(pool // (16 * 131072)) * 16
    assert mem.max_concurrent_seqs == mem.kv_tokens // 8192


def test_longer_context_or_bigger_dtype_never_fits_more_sequences() -> None:
    m, gpu = resolve_model("qwen2.5-7b"), get_gpu("l40s")
    bf16, fp8 = get_dtype("bf16"), get_dtype("fp8")
    short = plan_memory(m, gpu, bf16, bf16, 4096)
    long = plan_memory(m, gpu, bf16, bf16, 16384)
    assert long.max_concurrent_seqs <= short.max_concurrent_seqs
    assert plan_memory(m, gpu, bf16, fp8, 4096).kv_tokens > short.kv_tokens


def test_does_not_fit_is_a_clear_error() -> None:
    with pytest.raises(PlannerError, match="does not fit"):
        plan_memory(resolve_model("llama-3.1-405b"), get_gpu("rtx-4090"), get_dtype("bf16"), get_dtype("bf16"),
                    8192, max_nodes=2)
    with pytest.raises(PlannerError, match="exceeds"):
        plan_memory(resolve_model("smollm2-135m"), get_gpu("cpu"), get_dtype("fp32"), get_dtype("fp32"), 100_000)
    with pytest.raises(PlannerError, match="kv_cache_memory must be >= 0"):
        kv_token_capacity(SMOLLM2, -1)
