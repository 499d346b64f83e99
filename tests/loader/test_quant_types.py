"""Every common GGUF quant type, loaded through ``ferry.loader.load_model``: each weight equals
gguf-py's own dequantization of the same blocks bit for bit, as float32 and, for the types the
kernels run, as raw blocks (``keep_quantized=True``) dequantized again.

Each file is a tiny llama model whose every 2-D weight uses one type, with random but valid
blocks: random bytes, except the float16 scales (and minimums), which are set to small finite
values. The blocks are drawn in Hugging Face row order and the file stores llama.cpp's rope
permutation of the q/k rows, so the expected values never go through the loader's un-permute.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from gguf_header import write_llama_header
from loader.test_gguf import HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, TOKENS, ggml_permute, to_hf

from ferry.kernels.packing import KERNEL_TYPES, QuantizedTensor
from ferry.loader import load_model

HEAD_DIM = HIDDEN // HEADS
# byte offsets of each block's float16 fields (scales d, and minimums where the type has them)
F16_FIELDS: dict[Q, tuple[int, ...]] = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),  # 16 scale bytes, 64 of 2-bit codes, d, dmin
    Q.Q3_K: (108,),  # 32 bytes of high bits, 64 of 2-bit codes, 12 of scales, d
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}
TYPES = list(F16_FIELDS)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid raw blocks of ``qtype``: uint8 [rows, cols / block weights * block bytes]."""
    weights, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // weights, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        values = rng.uniform(1e-3, 2e-2, size=len(blocks)) * rng.choice([-1.0, 1.0], len(blocks))
        blocks[:, off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def weight_shapes() -> dict[str, tuple[int, int]]:
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output.weight": (len(TOKENS), HIDDEN)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        shapes.update({p + "attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
                       p + "ffn_gate.weight": (INTER, HIDDEN), p + "ffn_up.weight": (INTER, HIDDEN),
                       p + "ffn_down.weight": (HIDDEN, INTER)})
    return shapes


def write_model(path: Path, qtype: Q, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny llama GGUF whose 2-D weights are all ``qtype``; returns each weight's raw blocks in
    Hugging Face row order, keyed by HF name (norms: float32 ones, not returned)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    write_llama_header(w, context=512, hidden=HIDDEN, layers=LAYERS, inter=INTER, heads=HEADS,
                       kv_heads=KV_HEADS, tokens=TOKENS, merges=["Ġ t", "h e", "Ġt he"])
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32))
    blocks: dict[str, np.ndarray] = {}
    for name, (rows, cols) in weight_shapes().items():
        hf = random_blocks(qtype, rows, cols, rng)
        stored = hf
        if ".attn_q." in name or ".attn_k." in name:  # blocks lie within rows: permute rows
            stored = ggml_permute(hf, HEADS if ".attn_q." in name else KV_HEADS)
        w.add_tensor(name, np.ascontiguousarray(stored), raw_dtype=qtype)
        blocks[to_hf(name)] = hf
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return blocks


def reference(qtype: Q, blocks: np.ndarray, cols: int) -> np.ndarray:
    return dequantize(blocks, qtype).reshape(blocks.shape[0], cols).astype(np.float32)


def assert_bitwise_equal(got: torch.Tensor, want: np.ndarray, name: str) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, name
    got_bits = got.contiguous().numpy().view(np.uint32)
    bad = np.argwhere(got_bits != want.view(np.uint32))
    assert len(bad) == 0, f"{name}: {len(bad)} weights differ, first at {bad[0].tolist()}"


@pytest.fixture(scope="module", params=TYPES, ids=lambda t: t.name)
def quant_file(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Q, Path, dict[str, np.ndarray]]:
    qtype: Q = request.param
    path = tmp_path_factory.mktemp("quant") / f"{qtype.name}.gguf"
    return qtype, path, write_model(path, qtype)


def test_the_file_really_uses_the_type(quant_file: tuple[Q, Path, dict[str, np.ndarray]]) -> None:
    qtype, path, blocks = quant_file
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    assert len(types) == len(blocks) and set(types.values()) == {qtype}
    weights, nbytes = GGML_QUANT_SIZES[qtype]
    for raw in blocks.values():  # finite, and not a constant: the weights carry information
        values = reference(qtype, raw, raw.shape[1] // nbytes * weights)
        assert np.isfinite(values).all() and values.std() > 0


def test_float_weights_equal_gguf_py_bit_for_bit(
        quant_file: tuple[Q, Path, dict[str, np.ndarray]]) -> None:
    qtype, path, blocks = quant_file
    got = dict(load_model(str(path)).weights(keep_quantized=False))
    assert set(blocks) <= set(got)
    for name, raw in blocks.items():
        assert_bitwise_equal(got[name], reference(qtype, raw, got[name].shape[1]), name)


def test_kept_blocks_dequantize_to_the_same_bits(
        quant_file: tuple[Q, Path, dict[str, np.ndarray]]) -> None:
    qtype, path, blocks = quant_file
    got = dict(load_model(str(path)).weights(keep_quantized=True))
    for name, raw in blocks.items():
        tensor = got[name]
        if qtype not in KERNEL_TYPES:  # no kernel: dequantized at load, as with keep_quantized=False
            assert isinstance(tensor, torch.Tensor), name
            assert_bitwise_equal(tensor, reference(qtype, raw, tensor.shape[1]), name)
            continue
        assert isinstance(tensor, QuantizedTensor), name
        assert tensor.qtype == qtype
        np.testing.assert_array_equal(tensor.blocks, raw, err_msg=name)  # HF row order
        assert_bitwise_equal(tensor.dequantize(), reference(qtype, raw, tensor.shape[1]), name)


def test_kernel_types_are_the_expected_ones() -> None:
    # the types a Q4_K_M file mixes (Q4_K, Q5_K, Q6_K and the fallbacks Q5_0, Q5_1, Q8_0) and the
    # legacy ones all stay packed; the rest are dequantized at load
    assert set(KERNEL_TYPES) == {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K}
