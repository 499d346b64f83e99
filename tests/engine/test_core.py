"""EngineCore: a failed model step aborts its requests and leaves no stale prefix-cache entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferry import LLM, SamplingParams
from ferry.engine.core import StepError


def test_failed_step_leaves_no_prefix_cache_hit_on_unwritten_kv(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128)
    prompt = {"prompt_token_ids": list(range(100, 120))}  # 5 full blocks
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0)
    runner = llm.engine.core.runner
    real_execute = runner.execute

    def failing_execute(out: Any) -> Any:
        monkeypatch.setattr(runner, "execute", real_execute)  # fail once only
        raise RuntimeError("simulated device failure before any KV was written")

    monkeypatch.setattr(runner, "execute", failing_execute)
    with pytest.raises(StepError):
        llm.generate(prompt, params)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks

    first = llm.generate(prompt, params)[0]
    assert first.num_cached_tokens == 0  # nothing from the failed step may hit
    again = llm.generate(prompt, params)[0]
    assert again.num_cached_tokens == 16  # a real hit once the KV was written
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert [lp.logprob for lp in again.outputs[0].logprobs] == pytest.approx(
        [lp.logprob for lp in first.outputs[0].logprobs], abs=1e-4)
