"""Parity with Hugging Face transformers on the same weights: logits close, greedy tokens equal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.engine.request import Request
from ferry.engine.scheduler import ScheduledRequest, SchedulerOutput

from hf_reference import hf_greedy, load_hf

PROMPTS = [
    "The quick brown fox",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Paris is the capital of",
    "Once upon a time, in a land far away, there lived a dragon who loved",
    "Q: What is 7 times 8?\nA:",
    "Les chats sont",
]
NEW_TOKENS = 32


def ferry_prompt_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one paged prefill; frees the blocks after."""
    core = llm.engine.core
    req = Request("parity", ids, SamplingParams(), (), 1)
    assert core.kv.allocate_slots(req, len(ids))
    try:
        return core.runner.all_logits(SchedulerOutput([ScheduledRequest(req, len(ids))]))
    finally:
        core.kv.free(req)


def hf_prompt_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def check_parity(llm: LLM, hf: Any) -> None:
    tok = llm.tokenizer
    ids = tok.encode(PROMPTS[5])
    diff = (ferry_prompt_logits(llm, ids) - hf_prompt_logits(hf, ids)).abs().max().item()
    assert diff < 1e-3, f"prefill logits differ by {diff}"

    # min_tokens bans EOS exactly as the reference's min_new_tokens does.
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, NEW_TOKENS) for ids in prompt_ids]
    alone = llm.generate({"prompt_token_ids": prompt_ids[0]}, params)[0]
    assert alone.outputs[0].token_ids == expected[0]
    batch = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    for out, want in zip(batch, expected):
        assert out.outputs[0].token_ids == want
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks


def test_smollm2_gguf_matches_transformers(smollm2_path: Path, hf_smollm2: Any) -> None:
    check_parity(LLM(str(smollm2_path), kv_cache_memory=64 << 20), hf_smollm2)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_hf_folders_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    check_parity(LLM(str(folder), kv_cache_memory=16 << 20), load_hf(folder))
