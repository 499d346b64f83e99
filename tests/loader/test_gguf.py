"""GGUF loading: config and every weight equal transformers' for the real SmolLM2 file; dequantization
of each quant type and llama's q/k un-permutation on small synthetic files; damaged files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_header import write_llama_header

from ferry.kernels.packing import QuantizedTensor
from ferry.loader import LoadedModel, ModelFormatError, ModelNotFoundError, load_model
from ferry.loader.gguf import load_gguf, unpermute_rope_rows

# ------------------------------------------------------------------ the real file vs transformers


@pytest.fixture(scope="module")
def hf_model(smollm2_path: Path) -> Any:
    from hf_reference import load_hf_gguf

    return load_hf_gguf(smollm2_path)


@pytest.fixture(scope="module")
def loaded(smollm2_path: Path) -> LoadedModel:
    return load_model(str(smollm2_path))


@pytest.mark.slow
def test_config_matches_transformers(loaded: LoadedModel, smollm2_path: Path) -> None:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    arch = loaded.arch
    assert arch.architecture == "LlamaForCausalLM"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "head_dim"):
        assert getattr(arch, key) == getattr(hf, key), key
    rope = getattr(hf, "rope_parameters", None) or {}
    assert arch.rope_theta == rope.get("rope_theta", getattr(hf, "rope_theta", None))
    assert arch.rope_scaling is None and rope.get("rope_type", "default") == "default"
    assert arch.eos_token_ids == (hf.eos_token_id,)
    assert not arch.attention_bias
    assert loaded.name == smollm2_path.name and loaded.source == smollm2_path.resolve()


@pytest.mark.slow
def test_every_weight_matches_transformers(loaded: LoadedModel, hf_model: Any) -> None:
    state = hf_model.state_dict()
    seen = set()
    for name, tensor in loaded.weights():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        ref = state[name]
        assert tensor.shape == ref.shape, name
        torch.testing.assert_close(tensor, ref, rtol=0, atol=1e-6, msg=name)
        seen.add(name)
    # Tied embeddings: transformers lists lm_head (shared with embed_tokens); we omit it.
    assert seen == set(state) - {"lm_head.weight"}
    assert loaded.arch.tie_word_embeddings


def test_builtin_name_loads_the_same_file(smollm2_path: Path) -> None:
    model = load_model("smollm2-135m-instruct")
    assert model.source == smollm2_path.resolve()
    assert model.name == "smollm2-135m-instruct"
    assert model.tokenizer.encode("Hello") == [19556]


# ------------------------------------------------------------------ damaged files


def test_truncated_file_is_a_format_error(tmp_path: Path, smollm2_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as f:
        path.write_bytes(f.read(1024 * 1024))
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        load_model(str(path))


def test_file_missing_its_last_bytes_is_a_format_error(tmp_path: Path, smollm2_path: Path) -> None:
    path = tmp_path / "short.gguf"
    size = smollm2_path.stat().st_size
    with smollm2_path.open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(size - 1000))
    with pytest.raises(ModelFormatError):
        load_model(str(path))


def test_random_bytes_are_a_format_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "random.gguf"
    path.write_bytes(rng.bytes(4096))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(str(path))
    # Right magic, garbage after it: the reader itself must fail cleanly.
    path.write_bytes(b"GGUF" + rng.bytes(4096))
    with pytest.raises(ModelFormatError):
        load_model(str(path))
    with pytest.raises(ModelFormatError):
        load_gguf(path)


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        load_model(str(tmp_path / "nope.gguf"))


# ------------------------------------------------------------------ reference dequantizers
# Straight ports of ggml's dequantize_row_q{4,5,6}_K loops, independent of gguf-py's vectorized code.

QK_K = 256


def _f16(b: np.ndarray) -> float:
    return float(b[:2].copy().view(np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    d = (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4)
    m = (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)
    return d, m


def ref_q4_k(block: np.ndarray) -> np.ndarray:
    d, dmin, scales, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]
    y = np.zeros(QK_K, dtype=np.float64)
    out, q, is_ = 0, 0, 0
    for _ in range(0, QK_K, 64):
        sc, m = _scale_min_k4(is_, scales)
        d1, m1 = d * sc, dmin * m
        sc, m = _scale_min_k4(is_ + 1, scales)
        d2, m2 = d * sc, dmin * m
        for lane in range(32):
            y[out + lane] = d1 * (int(qs[q + lane]) & 0xF) - m1
        for lane in range(32):
            y[out + 32 + lane] = d2 * (int(qs[q + lane]) >> 4) - m2
        out, q, is_ = out + 64, q + 32, is_ + 2
    return y


def ref_q5_k(block: np.ndarray) -> np.ndarray:
    d, dmin, scales = _f16(block[0:2]), _f16(block[2:4]), block[4:16]
    qh, ql = block[16:48], block[48:176]
    y = np.zeros(QK_K, dtype=np.float64)
    out, q, is_, u1, u2 = 0, 0, 0, 1, 2
    for _ in range(0, QK_K, 64):
        sc, m = _scale_min_k4(is_, scales)
        d1, m1 = d * sc, dmin * m
        sc, m = _scale_min_k4(is_ + 1, scales)
        d2, m2 = d * sc, dmin * m
        for lane in range(32):
            y[out + lane] = d1 * ((int(ql[q + lane]) & 0xF) + (16 if int(qh[lane]) & u1 else 0)) - m1
        for lane in range(32):
            y[out + 32 + lane] = d2 * ((int(ql[q + lane]) >> 4) + (16 if int(qh[lane]) & u2 else 0)) - m2
        out, q, is_, u1, u2 = out + 64, q + 32, is_ + 2, u1 << 2, u2 << 2
    return y


def ref_q6_k(block: np.ndarray) -> np.ndarray:
    ql, qh = block[0:128], block[128:192]
    sc = block[192:208].copy().view(np.int8)
    d = _f16(block[208:210])
    y = np.zeros(QK_K, dtype=np.float64)
    for n in range(2):
        lq, hq, s, o = 64 * n, 32 * n, 8 * n, 128 * n
        for lane in range(32):
            is_ = lane // 16
            q1 = ((int(ql[lq + lane]) & 0xF) | (((int(qh[hq + lane]) >> 0) & 3) << 4)) - 32
            q2 = ((int(ql[lq + lane + 32]) & 0xF) | (((int(qh[hq + lane]) >> 2) & 3) << 4)) - 32
            q3 = ((int(ql[lq + lane]) >> 4) | (((int(qh[hq + lane]) >> 4) & 3) << 4)) - 32
            q4 = ((int(ql[lq + lane + 32]) >> 4) | (((int(qh[hq + lane]) >> 6) & 3) << 4)) - 32
            y[o + lane] = d * sc[s + is_] * q1
            y[o + lane + 32] = d * sc[s + is_ + 2] * q2
            y[o + lane + 64] = d * sc[s + is_ + 4] * q3
            y[o + lane + 96] = d * sc[s + is_ + 6] * q4
    return y


K_QUANTS = {Q.Q4_K: (144, ref_q4_k, (0, 2)), Q.Q5_K: (176, ref_q5_k, (0, 2)), Q.Q6_K: (210, ref_q6_k, (208,))}


def random_k_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random raw K-quant bytes [rows, cols/256 * block_bytes] with sane f16 scales, and their values."""
    nbytes, ref, f16_at = K_QUANTS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // QK_K, nbytes), dtype=np.uint8)
    for off in f16_at:  # d (and dmin): small positive finite f16 values
        scales = rng.uniform(1e-3, 2e-2, size=len(blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    values = np.stack([ref(b) for b in blocks]).reshape(rows, cols).astype(np.float32)
    return blocks.reshape(rows, -1), values


# ------------------------------------------------------------------ synthetic files


def _byte_tokens() -> list[str]:
    from ferry.tokenizer import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


TOKENS = _byte_tokens() + ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 256, 4, 2, 256, 2
HEAD_DIM = HIDDEN // HEADS


def ggml_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF -> GGML rope layout)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


DEFAULT_TYPES = {
    # layer 0: float types and K-quants; layer 1: the legacy block quants.
    "blk.0.attn_q.weight": Q.F32, "blk.0.attn_k.weight": Q.F16, "blk.0.attn_v.weight": Q.F16,
    "blk.0.attn_output.weight": Q.BF16, "blk.0.ffn_gate.weight": Q.Q4_K, "blk.0.ffn_up.weight": Q.Q5_K,
    "blk.0.ffn_down.weight": Q.Q6_K,
    "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q4_0, "blk.1.attn_v.weight": Q.Q4_1,
    "blk.1.attn_output.weight": Q.Q5_0, "blk.1.ffn_gate.weight": Q.Q5_1, "blk.1.ffn_up.weight": Q.Q8_0,
    "blk.1.ffn_down.weight": Q.Q4_0,
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K,
}


def write_gguf(path: Path, *, arch: str = "llama", tied: bool = False, bias: bool = False,
               types: dict[str, Q] | None = None, drop: tuple[str, ...] = (), extra: dict[str, Q] | None = None,
               metadata: dict[str, Any] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny 2-layer model; return the float32 HF-layout tensors a correct loader yields."""
    rng = np.random.default_rng(seed)
    types = {**DEFAULT_TYPES, **(types or {})}
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (HIDDEN,), p + "ffn_norm.weight": (HIDDEN,),
                       p + "attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
                       p + "ffn_gate.weight": (INTER, HIDDEN), p + "ffn_up.weight": (INTER, HIDDEN),
                       p + "ffn_down.weight": (HIDDEN, INTER)})
        if bias:
            shapes.update({p + "attn_q.bias": (HEADS * HEAD_DIM,), p + "attn_k.bias": (KV_HEADS * HEAD_DIM,),
                           p + "attn_v.bias": (KV_HEADS * HEAD_DIM,)})
    for name in drop:
        shapes.pop(name)
    for name, qtype in (extra or {}).items():
        shapes[name] = (4, 256)
        types[name] = qtype

    w = gguf.GGUFWriter(str(path), arch)
    write_llama_header(w, context=512, hidden=HIDDEN, layers=LAYERS, inter=INTER, heads=HEADS,
                       kv_heads=KV_HEADS, tokens=TOKENS, merges=["Ġ t", "h e", "Ġt he"])
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)

    expected: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        hf = rng.normal(0, 0.1, size=shape).astype(np.float32)
        qtype = types.get(name, Q.F32)
        permute = arch == "llama" and (".attn_q." in name or ".attn_k." in name)
        n_head = HEADS if ".attn_q." in name else KV_HEADS
        if qtype == Q.Q8_K:  # a type gguf-py cannot dequantize: 292 bytes per 256 values
            w.add_tensor(name, np.zeros((shape[0], shape[1] // 256 * 292), dtype=np.uint8), raw_dtype=qtype)
            continue
        if qtype in K_QUANTS:
            raw, values = random_k_blocks(qtype, shape[0], shape[1], rng)
            w.add_tensor(name, raw, raw_dtype=qtype)
            expected[name] = values
            continue
        stored = ggml_permute(hf, n_head) if permute else hf
        if qtype == Q.F32:
            w.add_tensor(name, stored)
            expected[name] = hf
        elif qtype == Q.F16:
            w.add_tensor(name, stored.astype(np.float16))
            expected[name] = hf.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            # Quant blocks lie within rows and the permutation moves whole rows, so this is the
            # un-permuted value without using the code under test.
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(hf, qtype), qtype).reshape(shape)
            assert np.abs(expected[name] - hf).max() <= 0.2 * np.abs(hf).max()  # a sane quantization
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def to_hf(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{HF_NAMES[parts[0]]}.{parts[1]}"


def check_weights(model: LoadedModel, expected: dict[str, np.ndarray]) -> None:
    got = dict(model.weights())
    assert set(got) == {to_hf(n) for n in expected}
    for name, ref in expected.items():
        tensor = got[to_hf(name)]
        assert tensor.dtype == torch.float32
        np.testing.assert_allclose(tensor.numpy(), ref, rtol=1e-6, atol=1e-7, err_msg=name)


def test_synthetic_llama_every_quant_type_and_unpermute(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path)
    model = load_model(str(path))
    arch = model.arch
    assert (arch.architecture, arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads) == (
        "LlamaForCausalLM", HIDDEN, HEADS, KV_HEADS)
    assert (arch.vocab_size, arch.num_hidden_layers, arch.intermediate_size) == (len(TOKENS), LAYERS, INTER)
    assert not arch.tie_word_embeddings and not arch.attention_bias
    assert arch.bos_token_id == len(TOKENS) - 2 and arch.eos_token_ids == (len(TOKENS) - 1,)
    check_weights(model, expected)
    assert model.tokenizer.encode(" the<|im_end|>") == [TOKENS.index("Ġthe"), len(TOKENS) - 1]


def test_synthetic_qwen2_biases_tied_and_not_permuted(tmp_path: Path) -> None:
    path = tmp_path / "qwen2.gguf"
    expected = write_gguf(path, arch="qwen2", tied=True, bias=True)
    model = load_model(str(path))
    assert model.arch.architecture == "Qwen2ForCausalLM"
    assert model.arch.tie_word_embeddings and model.arch.attention_bias
    check_weights(model, expected)
    assert "lm_head.weight" not in {n for n, _ in model.weights()}


def test_llama_q_bias_is_unpermuted_too(tmp_path: Path) -> None:
    path = tmp_path / "bias.gguf"
    expected = write_gguf(path, bias=True)
    check_weights(load_model(str(path)), expected)


def test_rope_scaling_metadata(tmp_path: Path) -> None:
    path = tmp_path / "rope.gguf"
    write_gguf(path, metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert load_model(str(path)).arch.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_known_values_q8_0_and_q4_0() -> None:
    from ferry.loader.gguf import dequantize_tensor

    # Q8_0 block: f16 scale then 32 int8; value = d * q.
    q8 = np.zeros(34, dtype=np.uint8)
    q8[:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    q8[2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    # Q4_0 block: f16 scale then 16 bytes; low nibbles are elements 0..15, high ones 16..31; value = d*(q-8).
    q4 = np.zeros(18, dtype=np.uint8)
    q4[:2] = np.array([2.0], dtype=np.float16).view(np.uint8)
    q4[2:] = (np.arange(16) | (15 - np.arange(16)) << 4).astype(np.uint8)

    class FakeTensor:
        def __init__(self, data: np.ndarray, qtype: Q) -> None:
            self.name, self.data, self.tensor_type, self.shape = "t", data[None, :], qtype, np.array([32, 1])

    np.testing.assert_array_equal(dequantize_tensor(FakeTensor(q8, Q.Q8_0))[0], 0.5 * np.arange(-16, 16))  # type: ignore[arg-type]
    want = 2.0 * (np.concatenate([np.arange(16), 15 - np.arange(16)]) - 8)
    np.testing.assert_array_equal(dequantize_tensor(FakeTensor(q4, Q.Q4_0))[0], want)  # type: ignore[arg-type]


def test_unpermute_inverts_ggml_permute() -> None:
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    for n_head in (1, 2, 3):
        np.testing.assert_array_equal(unpermute_rope_rows(ggml_permute(w, n_head), n_head), w)
    # One head of 4 rows: GGML stores (x0, x2, x1, x3); HF wants (x0, x1, x2, x3).
    np.testing.assert_array_equal(unpermute_rope_rows(np.array([0.0, 2.0, 1.0, 3.0]), 1), [0, 1, 2, 3])
    with pytest.raises(ModelFormatError):
        unpermute_rope_rows(np.zeros((6, 2)), 2)


@pytest.mark.parametrize("case,match", [
    ({"drop": ("blk.1.ffn_down.weight",)}, "missing"),
    ({"extra": {"blk.0.attn_rot_embd.weight": Q.F32}}, "unsupported GGUF tensor"),
    ({"types": {"blk.0.ffn_down.weight": Q.Q8_K}}, "Q8_K"),
    ({"arch": "gpt2"}, "unsupported GGUF architecture"),
    ({"extra": {"rope_freqs.weight": Q.F32}}, "rope_freq_factors has 1024 values"),  # wrong length
])
def test_inconsistent_files_are_format_errors(tmp_path: Path, case: dict[str, Any], match: str) -> None:
    path = tmp_path / "bad.gguf"
    write_gguf(path, **case)
    with pytest.raises(ModelFormatError, match=match):
        load_model(str(path))


def test_keep_quantized_yields_the_same_weights_as_blocks(tmp_path: Path) -> None:
    """Kernel types (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K) come as raw blocks, rows
    un-permuted; the rest as float32."""
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path)
    got = dict(load_model(str(path)).weights(keep_quantized=True))
    kept = set()
    for name, ref in expected.items():
        tensor = got[to_hf(name)]
        if isinstance(tensor, QuantizedTensor):
            kept.add(name)
            assert tensor.shape == ref.shape
            tensor = tensor.dequantize()
        np.testing.assert_array_equal(tensor.numpy(), ref, err_msg=name)
    assert kept == {n for n, t in DEFAULT_TYPES.items()
                    if t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)}
    assert "blk.1.attn_k.weight" in kept  # a permuted rope projection kept as blocks
