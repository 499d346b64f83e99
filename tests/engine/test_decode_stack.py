"""The native whole-step decode path (kernels/decode_step.cpp) against the Python layer loop.

Both call the same kernels in the same order, so an all-decode step must give bit-identical results:
the tests compare every sampled token and every logprob exactly, on packed GGUF weights and on dense
safetensors weights with q/k/v biases, and check which models take the native path at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_models import make_tiny

from ferry import LLM, SamplingParams
from ferry.kernels.build import cpu_flags
from ferry.outputs import RequestOutput
from ferry.runner.model_runner import BF16_CPU_FLAGS, BF16_KEPT_ROWS

PROMPTS = ["Write a short story about a robot who paints.", "What is the capital of France?",
           "List three prime numbers and explain why."]


def _run(llm: LLM, fused: bool) -> list[RequestOutput]:
    model = llm.engine.core.runner.model
    model.fused_decode = fused
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)
    return llm.generate(PROMPTS, params)


def _assert_identical(a: list[RequestOutput], b: list[RequestOutput]) -> None:
    for x, y in zip(a, b, strict=True):
        cx, cy = x.outputs[0], y.outputs[0]
        assert cx.token_ids == cy.token_ids
        assert cx.logprobs is not None and cy.logprobs is not None
        # exact float equality: the same kernels in the same order
        assert [(lp.logprob, lp.top) for lp in cx.logprobs] == [(lp.logprob, lp.top) for lp in cy.logprobs]


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_path: Path) -> LLM:
    return LLM(str(smollm2_path), max_num_seqs=4)


def test_packed_gguf_decode_steps_match_the_python_path(smollm2_llm: LLM) -> None:
    model = smollm2_llm.engine.core.runner.model
    python_path = _run(smollm2_llm, fused=False)
    assert model.kernels is not None
    native = _run(smollm2_llm, fused=True)
    assert model._decode_stack() is not None and model._stack.num_layers() == len(model.layers)
    _assert_identical(python_path, native)


def test_dense_weights_with_qkv_bias_match(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    folder = make_tiny("qwen2", tmp_path / "qwen2", tokenizer_dir=hf_tokenizer_dir)
    llm = LLM(str(folder), max_num_seqs=4)
    model = llm.engine.core.runner.model
    assert model.layers[0].self_attn.qkv_proj.bias is not None
    python_path = _run(llm, fused=False)
    native = _run(llm, fused=True)
    assert model._decode_stack() is not None
    _assert_identical(python_path, native)


def test_sliding_window_layers_keep_the_python_path(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    folder = make_tiny("mistral", tmp_path / "mistral", tokenizer_dir=hf_tokenizer_dir)
    llm = LLM(str(folder), max_num_seqs=4)
    out = _run(llm, fused=True)
    assert all(len(o.outputs[0].token_ids) == 24 for o in out)
    assert llm.engine.core.runner.model._decode_stack() is None


@pytest.mark.skipif(not BF16_CPU_FLAGS & cpu_flags(), reason="no bfloat16 matrix units on this CPU")
def test_bfloat16_steps_over_kept_weights_match_the_python_path(smollm2_path: Path) -> None:
    llm = LLM(str(smollm2_path), dtype="bfloat16", max_num_seqs=BF16_KEPT_ROWS + 2)
    prompts = [f"{p} ({i})" for i in range(BF16_KEPT_ROWS // len(PROMPTS) + 1) for p in PROMPTS]
    assert len(prompts) >= BF16_KEPT_ROWS  # every decode step multiplies in bfloat16

    def run(fused: bool) -> list[RequestOutput]:
        llm.engine.core.runner.model.fused_decode = fused
        return llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                    logprobs=3))

    _assert_identical(run(False), run(True))


def test_bad_arguments_raise_instead_of_crashing(smollm2_llm: LLM) -> None:
    model = smollm2_llm.engine.core.runner.model
    model.fused_decode = True
    stack = model._decode_stack()
    caches = smollm2_llm.engine.core.runner.kv_caches
    x = torch.zeros(1, model.arch.hidden_size)
    rope = torch.zeros(1, model.arch.head_dim)
    table = torch.zeros(1, 1, dtype=torch.long)
    lens = torch.ones(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="one K and one V cache per layer"):
        stack.forward(x, rope, rope, [caches[0][0]], [caches[0][1]], torch.zeros(1, dtype=torch.long),
                      table, lens)
    slots = torch.tensor([caches[0][0].shape[0] * caches[0][0].shape[1]])  # one past the last slot
    with pytest.raises(RuntimeError, match="out of range"):
        stack.forward(x, rope, rope, [k for k, _ in caches], [v for _, v in caches], slots, table, lens)
