"""Parity with Hugging Face transformers on the same weights: logits close, greedy tokens equal.

GGUF files run both ways: with their Q4_0/Q4_1/Q8_0 blocks on ferry's quantized kernels
(``weight_format="auto"``, the default) and dequantized to float32 (``"dense"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hf_reference import PARITY_PROMPTS as PROMPTS
from hf_reference import hf_greedy, load_hf
from loader.test_gguf import write_gguf

from ferry import LLM, SamplingParams
from ferry.batch.outputs import ScheduledRequest, SchedulerOutput
from ferry.batch.request import Request

NEW_TOKENS = 32


def ferry_prompt_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one paged prefill; frees the blocks after."""
    core = llm.engine.core
    req = Request("parity", ids, SamplingParams(), (), 1)
    assert core.kv.allocate_slots(req, len(ids))
    try:
        return core.runner.all_logits(SchedulerOutput([
            ScheduledRequest(req, len(ids), core.kv.block_ids(req.request_id))]))
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


@pytest.mark.parametrize("weight_format,packed", [("auto", 30 * 4 + 1), ("dense", 0)])
def test_smollm2_gguf_matches_transformers(smollm2_path: Path, hf_smollm2: Any,
                                           weight_format: str, packed: int) -> None:
    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20, weight_format=weight_format)
    # auto: every linear layer (Q4_1) and the tied embedding/output head (Q8_0) stay quantized
    assert llm.engine.core.runner.num_packed_layers == packed
    check_parity(llm, hf_smollm2)


def check_formats_agree(path: Path, packed: int) -> None:
    """The same GGUF file with quantized kernels and dequantized: logits and greedy tokens."""
    auto = LLM(str(path), kv_cache_memory=8 << 20, weight_format="auto")
    dense = LLM(str(path), kv_cache_memory=8 << 20, weight_format="dense")
    assert auto.engine.core.runner.num_packed_layers == packed
    ids = [5, 17, 200, 3, 99, 42, 7, 150, 64, 11, 230, 1]
    a, d = ferry_prompt_logits(auto, ids), ferry_prompt_logits(dense, ids)
    assert (a - d).abs().max().item() < 1e-4 * d.abs().max().item()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids[:n]} for n in (1, 5, 12)]
    assert ([o.outputs[0].token_ids for o in auto.generate(prompts, params)]
            == [o.outputs[0].token_ids for o in dense.generate(prompts, params)])


def test_gguf_with_mixed_types_packs_only_layers_one_kernel_can_run(tmp_path: Path) -> None:
    # Packed: layer 1's q/k/v (Q8_0, Q4_0, Q4_1: one layer of three packed parts), o (Q5_0),
    # gate/up (Q5_1 + Q8_0) and down (Q4_0), layer 0's gate/up (Q4_K + Q5_K) and down (Q6_K), the
    # embedding (Q8_0) and the output head (Q6_K). Dense: layer 0's float q/k/v/o.
    path = tmp_path / "mixed.gguf"
    write_gguf(path)
    check_formats_agree(path, packed=8)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_of_one_type_packs_every_linear(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"{qtype.name}.gguf"
    layer_weights = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    types = {f"blk.{i}.{w}.weight": qtype for i in range(2) for w in layer_weights}
    write_gguf(path, types=types, tied=True)  # the Q8_0 embedding is the output head too
    check_formats_agree(path, packed=2 * 4 + 1)


def test_bfloat16_keeps_gguf_blocks_packed_unless_dense_is_asked(tmp_path: Path) -> None:
    path = tmp_path / "bf16.gguf"
    write_gguf(path)
    # bfloat16 matmuls over the packed blocks (tests/engine/test_bf16_packed.py), float32 elsewhere
    runner = LLM(str(path), kv_cache_memory=8 << 20, dtype="bfloat16").engine.core.runner
    float32 = LLM(str(path), kv_cache_memory=8 << 20).engine.core.runner
    assert runner.num_packed_layers == float32.num_packed_layers > 0
    assert runner.dtype == torch.float32
    dense = LLM(str(path), kv_cache_memory=8 << 20, dtype="bfloat16",
                weight_format="dense").engine.core.runner
    assert dense.num_packed_layers == 0 and dense.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight_format"):
        LLM(str(path), weight_format="int4")


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_hf_folders_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    check_parity(LLM(str(folder), kv_cache_memory=16 << 20), load_hf(folder))


def test_auto_falls_back_to_dense_when_the_kernels_cannot_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ferry.kernels.build import KernelUnavailableError
    from ferry.runner import model_runner

    def no_compiler() -> None:
        raise KernelUnavailableError("building ferry's CPU kernels needs a C++ compiler (c++)")

    monkeypatch.setattr(model_runner, "load_cpu_kernels", no_compiler)
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    llm = LLM(str(path), kv_cache_memory=8 << 20)
    assert llm.engine.core.runner.num_packed_layers == 0
    assert "C++ compiler" in caplog.text and "dequantized to float32" in caplog.text
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_a_cpu_without_avx2_keeps_the_pytorch_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the portable build computes the same, but slower than PyTorch's ops: it is not used
    from ferry.kernels.build import load_cpu_kernels
    from ferry.runner import model_runner

    portable = load_cpu_kernels(isa="portable")
    assert not portable.vectorized() and load_cpu_kernels().vectorized()
    monkeypatch.setattr(model_runner, "load_cpu_kernels", lambda: portable)
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    llm = LLM(str(path), kv_cache_memory=8 << 20)
    assert llm.engine.core.runner.num_packed_layers == 0
    assert llm.engine.core.runner.kernels is None
    assert "need AVX2 + FMA or AVX-512" in caplog.text
