"""--dtype bfloat16 on CPU with GGUF weights: bfloat16 GEMMs for large steps (over bfloat16 copies
kept beside the packed blocks when memory allows, else over each weight dequantized for the call),
float32 (and the kernels' exact path) for small ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.kernels.build import cpu_flags
from ferry.model.layers.linear import PackedWeight
from ferry.runner import model_runner
from ferry.runner.model_runner import BF16_CPU_FLAGS, BF16_KEPT_ROWS, BF16_MATMUL_ROWS

pytestmark = pytest.mark.skipif(not BF16_CPU_FLAGS & cpu_flags(),
                                reason="this CPU has no bfloat16 matrix units (AMX-BF16, AVX512-BF16)")

PROMPT = ("Summarise in one sentence: the lighthouse keeper climbed the stairs every evening, lit the "
          "lamp, wrote the weather in his log and watched the ships pass until dawn.")


@pytest.fixture(scope="module")
def bf16_llm(smollm2_path: Path) -> LLM:
    return LLM(str(smollm2_path), dtype="bfloat16", max_num_seqs=BF16_MATMUL_ROWS + 8)


def test_gguf_weights_stay_packed_and_large_steps_use_bfloat16(bf16_llm: LLM) -> None:
    runner = bf16_llm.engine.core.runner
    assert runner.dtype == torch.float32 and runner.kernels is not None
    assert runner.num_packed_layers > 0
    packed = [m for m in runner.model.modules() if isinstance(m, PackedWeight)]
    # SmolLM2's copies (~270 MB) fit: kept, so bfloat16 pays from BF16_KEPT_ROWS rows
    assert packed and all(p.bf16_rows == BF16_KEPT_ROWS for p in packed)
    for p in packed:
        assert p.bf16_weight is not None and p.bf16_weight.dtype == torch.bfloat16
        assert tuple(p.bf16_weight.shape) == (p.in_features, p.out_features)
        assert torch.equal(p.bf16_weight, p._ops.dequantize_t_bf16(p.codes, p.d, p.m, p.type_id,
                                                                   p.out_features, p.in_features))
    # the copies count as resident weights
    assert runner.weight_bytes > sum(p.bf16_weight.numel() * 2 for p in packed)


def test_copies_too_big_for_memory_are_not_kept(smollm2_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_runner, "available_cpu_memory", lambda: 64 << 20)
    runner = LLM(str(smollm2_path), dtype="bfloat16", kv_cache_memory=16 << 20).engine.core.runner
    packed = [m for m in runner.model.modules() if isinstance(m, PackedWeight)]
    assert packed and all(p.bf16_rows == BF16_MATMUL_ROWS and p.bf16_weight is None for p in packed)


def test_a_bfloat16_matmul_is_close_to_the_float32_kernel(bf16_llm: LLM) -> None:
    weight = bf16_llm.engine.core.runner.model.layers[0].mlp.gate_up_proj.packed[0]
    x = torch.randn(BF16_MATMUL_ROWS, weight.in_features, generator=torch.Generator().manual_seed(0))
    got = weight.matmul(x)
    # the kept copy and the per-call dequantization give the same product, bit for bit
    per_call = torch.mm(x.to(torch.bfloat16), weight._ops.dequantize_t_bf16(
        weight.codes, weight.d, weight.m, weight.type_id, weight.out_features, weight.in_features)).float()
    assert torch.equal(got, per_call)
    want = weight._ops.quant_linear(x, weight.codes, weight.d, weight.m, weight.type_id,
                                    weight.out_features)
    assert got.dtype == torch.float32
    # bfloat16 inputs: ~3 significant digits per product, errors average out over K
    scale = x.abs() @ weight.rows(torch.arange(weight.out_features)).abs().T
    assert torch.all((got - want).abs() <= 2e-2 * scale)
    # below the threshold: the float32 kernel, exactly
    few = x[:BF16_KEPT_ROWS - 1]
    exact = weight._ops.quant_linear(few, weight.codes, weight.d, weight.m, weight.type_id,
                                     weight.out_features)
    assert torch.equal(weight.matmul(few), exact)

def test_outputs_track_float32_as_vllm_compares_bfloat16(bf16_llm: LLM, smollm2_path: Path) -> None:
    # the prompts decode in one batch (>= BF16_MATMUL_ROWS rows): every step multiplies in bfloat16
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    prompts = [f"{PROMPT} ({i})" for i in range(BF16_MATMUL_ROWS + 4)]
    got = bf16_llm.generate(prompts, params)
    want = LLM(str(smollm2_path), max_num_seqs=BF16_MATMUL_ROWS + 8).generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        a, b = g.outputs[0], w.outputs[0]
        assert a.logprobs is not None and b.logprobs is not None
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if ta != tb:  # after the first difference the sequences are different texts
                assert ta in b.logprobs[i].top and tb in a.logprobs[i].top
                break


def test_dense_checkpoints_keep_dense_bfloat16(tiny_llama_dir: Path) -> None:
    runner = LLM(str(tiny_llama_dir), dtype="bfloat16").engine.core.runner
    assert runner.dtype == torch.bfloat16
