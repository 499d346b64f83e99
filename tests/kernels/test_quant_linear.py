"""The quantized-weight CPU kernels against gguf-py's own dequantization.

Rows (embedding lookups) must equal gguf-py's float32 weights bit for bit; products may differ
from a float64 reference only by float32 summation error. Every test taking ``kernels`` runs on
each build of the same source (native, AVX2, portable; see conftest.py), held to the same standard.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from loader.test_gguf import random_k_blocks

from ferry.kernels.packing import QuantizedTensor, concat_rows, pack
from ferry.model.layers.linear import Linear, PackedWeight, VocabEmbedding

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FIVE_BIT = [Q.Q5_0, Q.Q5_1, Q.Q5_K]


def random_quantized(qtype: Q, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf-py cannot quantize to K-quants: random blocks
        k = -(-k // 256) * 256
        return QuantizedTensor(qtype, (n, k), random_k_blocks(qtype, n, k, rng)[0])
    w = rng.normal(0, 0.05, size=(n, k)).astype(np.float32)
    w[:, :32] += 0.2  # a block with a large offset, so Q4_1's minimum matters
    return QuantizedTensor(qtype, (n, k), quantize(w, qtype))


def reference(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    return (x.double() @ q.dequantize().double().T).float()


def assert_close_to_reference(got: torch.Tensor, x: torch.Tensor, q: QuantizedTensor) -> None:
    want = reference(x, q)
    scale = (x.double().abs() @ q.dequantize().double().abs().T).float() + 1e-6
    # float32 summation over K terms: a few ulps of the sum of magnitudes
    assert torch.all((got - want).abs() <= 4e-7 * q.shape[1] ** 0.5 * scale), (
        (got - want).abs().max().item())


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(1, 32), (17, 64), (40, 576), (96, 1536)])
def test_rows_equal_gguf_dequantization_exactly(kernels: ModuleType, qtype: Q, n: int,
                                                k: int) -> None:
    q = random_quantized(qtype, n, k)
    packed = PackedWeight(pack(q), kernels)
    ids = torch.tensor([n - 1, 0, n // 2, n - 1])
    assert torch.equal(packed.rows(ids), q.dequantize()[ids])


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(17, 64), (96, 576)])
def test_bfloat16_transposed_weight_equals_rounding_the_dequantized_one(
        kernels: ModuleType, qtype: Q, n: int, k: int) -> None:
    # the operand of a bfloat16 GEMM: exactly torch's round-to-nearest-even of the exact weights
    q = random_quantized(qtype, n, k)
    p = pack(q)
    wt = kernels.dequantize_t_bf16(p.codes, p.d, p.m, p.type_id, p.out_features, p.in_features)
    assert wt.dtype == torch.bfloat16 and wt.shape == (q.shape[1], n)
    assert torch.equal(wt, q.dequantize().to(torch.bfloat16).T)


@pytest.mark.parametrize("qtype", TYPES)
# every register-tile height of both vector builds (AVX2: up to 4 rows, AVX-512: 16), and batches
# past the prefill threshold (AVX2: 8 rows, AVX-512: 32), with a partial last row block
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 16, 17, 40])
def test_matmul_matches_float64_reference(kernels: ModuleType, qtype: Q, m: int) -> None:
    q = random_quantized(qtype, 72, 576, seed=m)  # 72 rows: four full tiles and a half tile
    x = torch.randn(m, q.shape[1], generator=torch.Generator().manual_seed(m))
    assert_close_to_reference(PackedWeight(pack(q), kernels).matmul(x), x, q)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q6_K])
def test_the_builds_compute_the_same_weights(ops: ModuleType, avx2_ops: ModuleType,
                                             portable_ops: ModuleType, qtype: Q) -> None:
    # one-hot inputs read the weights back through each build's matmul: equal bit for bit
    q = random_quantized(qtype, 40, 256, seed=3)
    x = torch.eye(256)[::5]
    want = q.dequantize().T[::5].contiguous()
    for kernels in (ops, avx2_ops, portable_ops):
        assert torch.equal(PackedWeight(pack(q), kernels).matmul(x), want), kernels.isa()
    assert len({ops.__name__, avx2_ops.__name__, portable_ops.__name__}) == 3


@pytest.mark.parametrize("qtype", FIVE_BIT)
@pytest.mark.parametrize("n,k,m", [(1, 32, 1), (17, 64, 3), (33, 800, 2), (31, 544, 37)])
def test_five_bit_types_odd_shapes(kernels: ModuleType, qtype: Q, n: int, k: int,
                                   m: int) -> None:
    # odd row counts (padded tiles), widths that are no multiple of 256 for Q5_0/Q5_1 (the
    # fallback llama.cpp picks for such rows), and a batch past the prefill threshold
    q = random_quantized(qtype, n, k, seed=n + m)
    x = torch.randn(m, q.shape[1], generator=torch.Generator().manual_seed(k))
    ids = torch.tensor([0, n - 1, n // 2])
    packed = PackedWeight(pack(q), kernels)
    assert_close_to_reference(packed.matmul(x), x, q)
    assert torch.equal(packed.rows(ids), q.dequantize()[ids])


@pytest.mark.parametrize("qtype", FIVE_BIT)
def test_every_fifth_bit_reaches_its_weight(kernels: ModuleType, qtype: Q) -> None:
    # one-hot inputs read every weight on its own (row k of x @ W.T is column k of W, exactly),
    # so a fifth bit put at the wrong row, k or half of a k pair shows up as a wrong weight;
    # 256 rows take the prefill path (tiles dequantized once), 6 the register-tile one
    q = random_quantized(qtype, 16, 256, seed=7)
    dense = q.dequantize()
    codes = pack(q).codes.reshape(1, 8, 320)[..., 256:]
    assert 0.3 < np.unpackbits(codes.numpy()).mean() < 0.7  # about half the weights have bit 4
    packed = PackedWeight(pack(q), kernels)
    x = torch.eye(256)
    assert torch.equal(packed.matmul(x), dense.T.contiguous())
    assert torch.equal(packed.matmul(x[100:106]), dense.T[100:106].contiguous())


def test_empty_batch_and_non_contiguous_input(kernels: ModuleType) -> None:
    q = random_quantized(Q.Q4_1, 20, 64)
    packed = PackedWeight(pack(q), kernels)
    assert packed.matmul(torch.empty(0, 64)).shape == (0, 20)
    x = torch.randn(64, 6).T  # [6, 64], not contiguous
    assert_close_to_reference(packed.matmul(x), x, q)


def test_bad_inputs_raise_instead_of_reading_out_of_bounds(ops: ModuleType) -> None:
    packed = PackedWeight(pack(random_quantized(Q.Q4_0, 20, 64)), ops)
    with pytest.raises(RuntimeError, match="float32"):
        packed.matmul(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bytes"):
        packed.matmul(torch.randn(2, 96))  # wrong in_features for these codes
    with pytest.raises(RuntimeError, match="out of range"):
        packed.rows(torch.tensor([20]))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedTensor(Q.Q4_0, (4, 48), np.zeros((4, 27), dtype=np.uint8))
    with pytest.raises(ValueError, match="do not hold"):
        QuantizedTensor(Q.Q4_0, (4, 64), np.zeros((4, 35), dtype=np.uint8))
    with pytest.raises(ValueError, match="no kernel"):
        QuantizedTensor(Q.Q2_K, (4, 256), np.zeros((4, 84), dtype=np.uint8))
    q5 = pack(random_quantized(Q.Q5_1, 20, 64))
    with pytest.raises(RuntimeError, match="bytes"):  # Q5 codes read as Q4 codes
        ops.quant_linear(torch.randn(2, 64), q5.codes, q5.d, q5.m, 1, 20)
    with pytest.raises(RuntimeError, match="m must be"):
        ops.quant_linear(torch.randn(2, 64), q5.codes, q5.d, torch.empty(0), 5, 20)
    with pytest.raises(RuntimeError, match="unknown quant type"):
        ops.quant_linear(torch.randn(2, 64), q5.codes, q5.d, q5.m, 6, 20)


def test_fused_rows_and_reordering(ops: ModuleType) -> None:
    a, b = random_quantized(Q.Q8_0, 24, 64, seed=1), random_quantized(Q.Q8_0, 8, 64, seed=2)
    fused = concat_rows([a, b])
    assert fused.shape == (32, 64)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = np.arange(32)[::-1].copy()
    assert torch.equal(fused.take_rows(order).dequantize(), fused.dequantize()[order])
    with pytest.raises(ValueError, match="different"):
        concat_rows([a, random_quantized(Q.Q4_0, 8, 64)])


def test_layers_switch_to_packed_weights(ops: ModuleType) -> None:
    q = random_quantized(Q.Q4_1, 48, 64)
    dense = Linear(64, 48, bias=True)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize())
        dense.bias.copy_(torch.arange(48.0))
    x = torch.randn(3, 64)
    want = dense(x)
    dense.use_packed([PackedWeight(pack(q), ops)])
    assert dense.weight.numel() == 0  # the float32 copy is gone
    torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        Linear(64, 47, bias=False).use_packed([PackedWeight(pack(q), ops)])

    emb = VocabEmbedding(48, 64)
    emb.use_packed([PackedWeight(pack(q), ops)])
    ids = torch.tensor([5, 0, 47])
    assert torch.equal(emb.embed(ids), q.dequantize()[ids])


def test_a_layer_of_parts_with_different_types(kernels: ModuleType) -> None:
    # a fused q/k/v whose v is another type: one packed part per type, outputs side by side
    parts = [random_quantized(Q.Q4_K, 32, 256, seed=1), random_quantized(Q.Q6_K, 16, 256, seed=2),
             random_quantized(Q.Q8_0, 24, 256, seed=3), random_quantized(Q.Q5_0, 8, 256, seed=4),
             random_quantized(Q.Q5_K, 16, 256, seed=5)]
    layer = Linear(256, 96, bias=False)
    layer.use_packed([PackedWeight(pack(p), kernels) for p in parts])
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    got = layer(x).split([p.shape[0] for p in parts], dim=-1)
    for part, q in zip(got, parts):
        assert_close_to_reference(part, x, q)
