"""An HF folder -> GGUF converter for test fixtures, writing llama.cpp's layout (convert_hf_to_gguf.py).

Written from llama.cpp's documented behaviour, for the architectures of tests/arch_models.py:

    HF architecture      GGUF arch  what differs from plain llama
    Llama / Mistral      llama      q/k rows permuted per head (interleaved rotary pairs); Llama 3 rope
                                    scaling becomes a `rope_freqs.weight` tensor of per-frequency divisors
                                    and is NOT in the metadata; Mistral's sliding window is dropped
                                    (llama.cpp runs `llama` with full attention)
    Qwen2                qwen2      no permutation; q/k/v biases as attn_{q,k,v}.bias
    Qwen3                qwen3      no permutation; attn_{q,k}_norm; key/value_length = head_dim
    Gemma2               gemma2     no permutation; every `*norm.weight` stored as 1 + w; no lm_head;
                                    attn/final logit softcapping keys; sliding_window (even layers local,
                                    fixed in llama.cpp); no rope.freq_base (10000 fixed)
    Gemma3               gemma3     as gemma2 for norms (q/k norms too); sliding_window (every 6th layer
                                    global, fixed in llama.cpp; local rope base fixed at 10000);
                                    rope.freq_base = the global layers' theta; embedding rows cut to the
                                    tokenizer's size
    Phi3                 phi3       fused attn_qkv and ffn_up (= gate rows then up rows) kept as they are;
                                    rope.scaling.original_context_length, rope.dimension_count and
                                    sliding_window (0 = none) always written; no key_length

The tokenizer is written as llama.cpp's `_set_vocab_gpt2` does: tokens with types (NORMAL, CONTROL for
special added tokens, USER_DEFINED for other added ones), `tokenizer.ggml.pre`, then `gguf.SpecialVocab`
(the same class llama.cpp uses) for merges, bos/eos/unk/pad ids and the chat template.

NOTE: llama.cpp's converter writes configurations that its runtime cannot honour without saying so
(gemma2/gemma3 query_pre_attn_scalar != head_dim, a gemma3 layer pattern other than 5 local + 1 global,
gemma3 local rope base != 10000, gemma2 rope_theta != 10000). A fixture must mean the same model in both
forms, so `convert` raises ValueError for those instead (see arch_models.gguf_safe_overrides).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}

_FILE_TYPES: dict[gguf.GGMLQuantizationType, gguf.LlamaFileType] = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}

# `tokenizer.ggml.pre` llama.cpp's converter derives (from a hash of sample encodings) for SmolLM2's
# tokenizer, which every fixture uses; the real SmolLM2 GGUF carries the same value.
SMOLLM_PRE = "smollm"
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def convert(hf_dir: Path, out: Path, *, qtype: gguf.GGMLQuantizationType | None = None,
            tokenizer_pre: str = SMOLLM_PRE, extra_metadata: dict[str, int] | None = None,
            split_max_tensors: int = 0) -> Path:
    """Write the GGUF llama.cpp would write for the HF folder `hf_dir`; 2-D weights in `qtype`
    (float32 when None; a tensor whose rows do not split into `qtype` blocks falls back to F16).
    `extra_metadata`: integer keys added beyond llama.cpp's layout (e.g. Mistral's sliding window).
    `split_max_tensors` > 0 splits the file as llama.cpp's gguf-split does (`-00001-of-0000N.gguf`,
    metadata in the first shard); the first shard's path is returned."""
    qtype = qtype or gguf.GGMLQuantizationType.F32
    if qtype not in _FILE_TYPES:
        raise ValueError(f"unsupported qtype {qtype.name}; expected one of {', '.join(t.name for t in _FILE_TYPES)}")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {hf_arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[hf_arch]
    _check_representable(arch, config)

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch], split_max_tensors=split_max_tensors)
    writer.add_name(hf_dir.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_FILE_TYPES[qtype])
    _write_hparams(writer, arch, config)
    _write_vocab(writer, arch, hf_dir, config, tokenizer_pre)
    for key, value in (extra_metadata or {}).items():
        writer.add_uint32(key, value)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for name, data in _tensors(arch, hf_dir, config):
        gguf_name = name if name == ROPE_FREQS else names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {name!r} of {gguf.MODEL_ARCH_NAMES[arch]}")
        _add_tensor(writer, gguf_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(out.parent.glob(f"{out.stem}-00001-of-*.gguf"))
    return shards[0] if split_max_tensors and shards else out


# ------------------------------------------------------------------ metadata


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The (global layers') rope dict: transformers 5's `rope_parameters`, or older `rope_theta` +
    `rope_scaling`."""
    params = config.get("rope_parameters")
    if params is None:
        params = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
    return dict(params.get("full_attention", params))


def _check_representable(arch: gguf.MODEL_ARCH, config: dict[str, Any]) -> None:
    if arch not in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        if arch == gguf.MODEL_ARCH.PHI3 and rope_parameters(config).get("rope_type", "default") != "default":
            raise ValueError("phi3: only unscaled rope is supported by this converter")
        return
    name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    # NOTE: llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (46 / 62 layers),
    # where it uses 1/sqrt(hidden/heads); no GGUF key carries query_pre_attn_scalar.
    big = n_layers == (46 if arch == gguf.MODEL_ARCH.GEMMA2 else 62)
    scale = config["hidden_size"] // config["num_attention_heads"] if big else head_dim
    if config.get("query_pre_attn_scalar", scale) != scale:
        raise ValueError(f"{name}: query_pre_attn_scalar {config['query_pre_attn_scalar']} != {scale}, which "
                         "llama.cpp assumes")
    period = 2 if arch == gguf.MODEL_ARCH.GEMMA2 else 6
    expected = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n_layers)]
    if config.get("layer_types", expected) != expected:
        raise ValueError(f"{name}: layer_types {config['layer_types']} differ from llama.cpp's fixed pattern")
    params = config.get("rope_parameters") or {}
    if arch == gguf.MODEL_ARCH.GEMMA2:
        theta = rope_parameters(config).get("rope_theta", 10000.0)
        what = "rope_theta"
    else:
        theta = (params.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq", 10000.0))
        what = "the local layers' rope_theta"
    if theta != 10000.0:
        raise ValueError(f"{name}: {what} {theta} != 10000, which llama.cpp assumes")


def _write_base(w: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """What llama.cpp's TextModel.set_gguf_parameters writes for these models."""
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    rope = rope_parameters(config)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported by this converter")
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])


def _write_hparams(w: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, config: dict[str, Any]) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3):
        _write_base(w, config)
        if arch == gguf.MODEL_ARCH.LLAMA:
            w.add_vocab_size(config["vocab_size"])
            w.add_rope_dimension_count(head_dim)
    elif arch == gguf.MODEL_ARCH.GEMMA2:
        # NOTE: llama.cpp's Gemma2 writer does not call the base: no rope.freq_base (10000 assumed).
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(config["num_attention_heads"])
        w.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])
    elif arch == gguf.MODEL_ARCH.GEMMA3:
        _write_base(w, config)
        if config.get("attn_logit_softcapping") is not None:
            raise ValueError("gemma3: attn_logit_softcapping is not supported by llama.cpp")
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(config["final_logit_softcapping"])
        if config.get("sliding_window_pattern") != 1:
            w.add_sliding_window(config["sliding_window"])
    elif arch == gguf.MODEL_ARCH.PHI3:
        # NOTE: llama.cpp's Phi3 writer does not call the base either.
        rope = rope_parameters(config)
        n_rot = int(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
                    * config["hidden_size"]) // config["num_attention_heads"]
        w.add_context_length(config["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_head_count(config["num_attention_heads"])
        w.add_head_count_kv(config["num_key_value_heads"])
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
        w.add_rope_dimension_count(n_rot)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(config.get("sliding_window") or 0)


def _write_vocab(w: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, hf_dir: Path, config: dict[str, Any],
                 pre: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab_size = config["vocab_size"]
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)
    if arch == gguf.MODEL_ARCH.LLAMA and vocab_size == 49152:
        # NOTE: llama.cpp's LlamaModel turns BOS off for every 49152-token vocab (meant for Granite; it
        # is why the real SmolLM2 GGUF says add_bos_token = false).
        w.add_add_bos_token(False)


# ------------------------------------------------------------------ tensors


def permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation: per head, rows (first half, second half) -> interleaved pairs."""
    # weight: [n_head * head_dim, ...] -> same shape; row h*D + 2i + j  <-  row h*D + j*D/2 + i
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors llama.cpp keeps as `rope_freqs.weight` for rope_type llama3."""
    rope = rope_parameters(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    # NOTE: llama.cpp reads original_max_position_embeddings from the top level of config.json
    # (default 8192); Llama 3.x checkpoints have 8192 there and in rope_scaling alike. transformers
    # reads it from the rope dict, which is what the model means, so that is used here.
    old_ctx = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _tensors(arch: gguf.MODEL_ARCH, hf_dir: Path, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, or ROPE_FREQS for the generated tensor; float32 data in llama.cpp's form), in its order."""
    from safetensors import safe_open

    if arch == gguf.MODEL_ARCH.LLAMA and rope_parameters(config).get("rope_type") == "llama3":
        yield ROPE_FREQS, llama3_rope_factors(config)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    gemma = arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
    n_vocab = len(json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {hf_dir}")
    for path in files:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                data = f.get_tensor(name).astype(np.float32)
                if name == "lm_head.weight" and (arch == gguf.MODEL_ARCH.GEMMA2 or config.get("tie_word_embeddings")):
                    continue  # tied (llama.cpp's Gemma2 drops it always): the head is token_embd
                if arch == gguf.MODEL_ARCH.LLAMA:
                    if name.endswith(("q_proj.weight", "q_proj.bias")):
                        data = permute_rope_rows(data, n_head)
                    elif name.endswith(("k_proj.weight", "k_proj.bias")):
                        data = permute_rope_rows(data, n_kv)
                if gemma and name.endswith("norm.weight"):
                    data = data + 1.0  # Gemma's RMSNorm multiplies by (1 + w)
                if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("embed_tokens.weight"):
                    data = data[:n_vocab]
                yield name, data


def _add_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, data)
        return
    if qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, data.astype(np.float16))
        return
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.quants.QuantError:
        # NOTE: llama.cpp falls back to F16 when a row does not split into whole blocks.
        w.add_tensor(name, data.astype(np.float16))
        return
    w.add_tensor(name, packed, raw_dtype=qtype)
