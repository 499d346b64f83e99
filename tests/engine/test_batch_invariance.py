"""The same greedy text whether a prompt runs alone, batched, with prefix hits, chunked or preempted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry import LLM, SamplingParams

SYSTEM = ("You are a careful assistant. Answer briefly and precisely, and say so when you do not "
          "know. ")
PROMPTS = [SYSTEM + q for q in (
    "What is the boiling point of water?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is a prime number?",
    "Translate 'good morning' into French.",
)]
PARAMS = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)


def texts(llm: LLM, prompts: list[str]) -> list[list[int]]:
    outs = llm.generate(prompts, PARAMS)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked"
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> list[list[int]]:
    """Each prompt alone, no prefix caching, a roomy pool and budget."""
    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20, enable_prefix_caching=False)
    return [texts(llm, [p])[0] for p in PROMPTS]


def test_batched(smollm2_path: Path, reference: list[list[int]]) -> None:
    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20, enable_prefix_caching=False)
    assert texts(llm, PROMPTS) == reference


def test_prefix_cache_hits(smollm2_path: Path, reference: list[list[int]]) -> None:
    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20)
    assert texts(llm, PROMPTS[:1]) == reference[:1]
    before = llm.engine.stats().prefix_cache_hits_total
    assert texts(llm, PROMPTS) == reference  # shares the system prompt's blocks with the first
    assert llm.engine.stats().prefix_cache_hits_total > before
    again = llm.generate(PROMPTS[:2], PARAMS)
    assert all(o.num_cached_tokens >= 16 for o in again)


def test_chunked_prefill_with_a_tiny_budget(smollm2_path: Path,
                                            reference: list[list[int]]) -> None:
    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20, max_num_batched_tokens=7)
    assert texts(llm, PROMPTS) == reference


def test_preemption_with_a_tiny_pool(smollm2_path: Path, reference: list[list[int]]) -> None:
    # Each sequence needs up to 5 blocks of 16 tokens; 12 blocks cannot hold six at once.
    llm = LLM(str(smollm2_path), num_gpu_blocks_override=12)
    assert texts(llm, PROMPTS) == reference
    assert llm.engine.stats().num_preemptions_total > 0
