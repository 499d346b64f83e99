"""ModelRunner on hand-built SchedulerOutputs: no Scheduler, no KV cache manager.

Each test picks its requests, token ranges and block ids itself (shuffled, non-contiguous), runs
the runner step by step and checks its logits and greedy tokens against a plain full-context
forward of the same tiny random Llama in Hugging Face ``transformers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import load_hf

from ferry.batch.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from ferry.batch.request import Request
from ferry.config import CacheConfig, ModelConfig
from ferry.loader import load_model
from ferry.runner.model_runner import ModelRunner
from ferry.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 16
GREEDY = SamplingParams(temperature=0.0)


def test_min_tokens_blocks_every_eos_id_of_the_batch() -> None:
    # The tokenizer's EOS and the model config's may differ; a request stops on either, so
    # min_tokens must block the union, not just the model config's.
    a = Request("a", [1], SamplingParams(min_tokens=3), eos_token_ids=(2, 7))
    b = Request("b", [1], SamplingParams(), eos_token_ids=(2, 9))
    assert ModelRunner._eos_ids([a, b]) == [2, 7, 9]


@pytest.fixture(scope="module")
def runner(tiny_llama_dir: Path) -> ModelRunner:
    # NOTE: one runner for the module: each test writes blocks a previous test may have filled, so
    # stale KV in a reused block must not leak into the results.
    loaded = load_model(str(tiny_llama_dir))
    return ModelRunner(loaded.arch, ModelConfig(str(tiny_llama_dir), device="cpu"),
                       CacheConfig(block_size=BS, num_gpu_blocks_override=NUM_BLOCKS),
                       loaded.weights)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir: Path) -> Any:
    return load_hf(tiny_llama_dir)


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """The reference: one full-context forward, no KV cache. [len(ids), vocab]"""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def advance(out: SchedulerOutput, result: ModelRunnerOutput | None = None) -> None:
    """What ``Scheduler.update`` does to progress: computed tokens, then any sampled token."""
    for s in out.scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
        tokens = result.sampled.get(s.request.request_id) if result is not None else None
        sampled = tokens[-1] if tokens else None
        if sampled is not None:
            s.request.append_token(sampled.token_id)


def test_prefill_chunk_and_decode_in_one_step_sample_the_reference_tokens(
        runner: ModelRunner, hf: Any) -> None:
    a = Request("a", prompt(1, 6), GREEDY)
    b = Request("b", prompt(2, 10), GREEDY)
    a_blocks, b_blocks = [7, 2, 11], [5, 0, 9]  # each request's whole table, shuffled

    # Step 1: a's whole prompt (sampled) and b's first chunk, which stops short of its end.
    step1 = SchedulerOutput([ScheduledRequest(a, 6, a_blocks), ScheduledRequest(b, 6, b_blocks)])
    assert [s.samples for s in step1.scheduled] == [True, False]
    out1 = runner.execute(step1)
    assert set(out1.sampled) == {"a"}  # no token for a chunk that does not reach the end
    assert out1.sampled["a"][0].token_id == hf_logits(hf, a.prompt_token_ids)[-1].argmax().item()
    advance(step1, out1)

    # Step 2: b's last chunk (prefill over its cached first chunk) listed before a's decode.
    step2 = SchedulerOutput([ScheduledRequest(b, 4, b_blocks), ScheduledRequest(a, 1, a_blocks)])
    out2 = runner.execute(step2)
    assert set(out2.sampled) == {"a", "b"}
    a_ids = a.prompt_token_ids + a.output_token_ids
    assert out2.sampled["a"][0].token_id == hf_logits(hf, a_ids)[-1].argmax().item()
    assert out2.sampled["b"][0].token_id == hf_logits(hf, b.prompt_token_ids)[-1].argmax().item()
    advance(step2, out2)

    # Steps 3-4: two decodes batched with block tables of different lengths (a: 2 then 3 blocks,
    # b: 3), a crossing into its third block at step 4.
    for _ in range(2):
        step = SchedulerOutput([ScheduledRequest(a, 1, a_blocks), ScheduledRequest(b, 1, b_blocks)])
        out = runner.execute(step)
        for r in (a, b):
            ids = r.prompt_token_ids + r.output_token_ids
            assert out.sampled[r.request_id][0].token_id == hf_logits(hf, ids)[-1].argmax().item()
        advance(step, out)
    assert a.num_tokens == 10 and b.num_tokens == 13


def test_logits_of_every_chunk_match_a_full_forward(runner: ModelRunner, hf: Any) -> None:
    a = Request("a", prompt(3, 7), GREEDY)
    c = Request("c", prompt(4, 13), GREEDY)
    a_blocks, c_blocks = [3, 14], [12, 1, 8, 6]
    a_ref, c_ref = hf_logits(hf, a.prompt_token_ids), hf_logits(hf, c.prompt_token_ids)

    # Step 1: a's prompt and c's first chunk; no decodes, so rows follow the scheduled order.
    step1 = SchedulerOutput([ScheduledRequest(a, 7, a_blocks), ScheduledRequest(c, 5, c_blocks)])
    logits = runner.all_logits(step1)  # [12, vocab]
    assert (logits[:7] - a_ref).abs().max().item() < 1e-4
    assert (logits[7:] - c_ref[:5]).abs().max().item() < 1e-4
    advance(step1)

    # Step 2: a decodes a token the test picks; c's middle chunk starts mid-block and ends short.
    a.append_token(c.prompt_token_ids[0])
    step2 = SchedulerOutput([ScheduledRequest(c, 4, c_blocks), ScheduledRequest(a, 1, a_blocks)])
    assert [s.samples for s in step2.scheduled] == [False, True]
    logits = runner.all_logits(step2)  # decodes first: row 0 is a's, rows 1..4 are c's
    a_ids = a.prompt_token_ids + a.output_token_ids
    assert (logits[0] - hf_logits(hf, a_ids)[-1]).abs().max().item() < 1e-4
    assert (logits[1:] - c_ref[5:9]).abs().max().item() < 1e-4
    advance(step2)

    # Step 3: c's last chunk, which is sampled.
    step3 = SchedulerOutput([ScheduledRequest(c, 4, c_blocks)])
    out = runner.execute(step3)
    assert out.sampled["c"][0].token_id == c_ref[-1].argmax().item()
