"""Tiny random Hugging Face models, one per architecture ferry serves, saved as safetensors folders.

`make_tiny(kind, out, tokenizer_dir=...)` builds `AutoModelForCausalLM.from_config(...)` in float32 with a
fixed seed and saves what a real checkpoint folder holds: model.safetensors, config.json,
generation_config.json and the tokenizer files copied from `tokenizer_dir` (SmolLM2's byte-level BPE in
the `hf_tokenizer_dir` fixture, vocab 49152). Each kind switches on the features its architecture is
about, at sizes that keep a forward pass in milliseconds:

    kind     class                 what is on
    llama    LlamaForCausalLM      plain: GQA 4/2, untied head
    llama3   LlamaForCausalLM      rope_type llama3 (factor 8, low 1, high 4, original ctx 64: at
                                   head_dim 16 one frequency is kept, one smoothed, six divided by 8)
    mistral  MistralForCausalLM    sliding window 16 on every layer
    qwen2    Qwen2ForCausalLM      q/k/v bias, tied embeddings
    qwen3    Qwen3ForCausalLM      q/k RMSNorm, head_dim 32 != hidden/heads 16
    gemma2   Gemma2ForCausalLM     soft-capping (attn 1, final 2: both change the logits), window 16 on
                                   even layers, query_pre_attn_scalar 24 != head_dim 32, tied, (1+w) norms
    gemma3   Gemma3ForCausalLM     text-only; 6 layers = 5 sliding (window 16, rope base 10k) + 1 global
                                   (rope base 1M), q/k norm, head_dim 32 != 16, tied
    phi3     Phi3ForCausalLM       fused qkv_proj and gate_up_proj; `sliding_window=16` on request

`SLIDING[kind]` is each kind's sliding window in tokens (None: full attention everywhere) and
`sliding_layers(kind, n_layers)` says which layers use it.

NOTE: some defaults cannot be written in llama.cpp's GGUF layout (see tests/gguf_convert.py): gemma2's
query_pre_attn_scalar != head_dim (llama.cpp scales by 1/sqrt(head_dim) unless the model is the 46-layer
27B). `gguf_safe_overrides(kind)` gives the overrides that make a kind convertible without loss.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

KINDS: tuple[str, ...] = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

VOCAB_SIZE = 49152
BOS_ID = 1  # <|im_start|> in SmolLM2's tokenizer
EOS_ID = 2  # <|im_end|>: checked by the tests never to come up in the first greedy tokens
WINDOW = 16
# NOTE: transformers' default init std 0.02 gives logits so flat that greedy decoding of a 2-layer
# model repeats one token; 0.1 gives varied tokens for every kind (tests/test_arch_fixtures.py checks).
INIT_STD = 0.1
NORM_STD = 0.3
TIED_EMBED_STD = 0.03

SLIDING: Mapping[str, int | None] = MappingProxyType({
    "llama": None, "llama3": None, "mistral": WINDOW, "qwen2": None, "qwen3": None,
    "gemma2": WINDOW, "gemma3": WINDOW, "phi3": None,
})


def _common() -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "initializer_range": INIT_STD, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }


def _spec(kind: str) -> tuple[str, dict[str, Any]]:
    """(config class name in `transformers`, its keyword arguments) for `kind`."""
    c = _common()
    if kind == "llama":
        return "LlamaConfig", {**c, "head_dim": 16, "rms_norm_eps": 1e-5,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if kind == "llama3":
        return "LlamaConfig", {**c, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    if kind == "mistral":
        return "MistralConfig", {**c, "head_dim": 16, "rms_norm_eps": 1e-5, "sliding_window": WINDOW,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if kind == "qwen2":
        return "Qwen2Config", {**c, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    if kind == "qwen3":
        return "Qwen3Config", {**c, "head_dim": 32, "rms_norm_eps": 1e-6,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    if kind == "gemma2":
        return "Gemma2Config", {**c, "head_dim": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                                "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
                                "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0,
                                "hidden_activation": "gelu_pytorch_tanh",
                                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if kind == "gemma3":
        layers = 6
        return "Gemma3TextConfig", {
            **c, "num_hidden_layers": layers, "head_dim": 32, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True, "query_pre_attn_scalar": 32, "sliding_window": WINDOW,
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention" if i in sliding_layers("gemma3", layers) else "full_attention"
                            for i in range(layers)],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
    if kind == "phi3":
        return "Phi3Config", {**c, "rms_norm_eps": 1e-5, "original_max_position_embeddings": 512,
                              "sliding_window": None, "pad_token_id": 0,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 1.0}}
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def sliding_layers(kind: str, n_layers: int) -> frozenset[int]:
    """Indices of the layers that use the sliding window when the model has one (llama.cpp's and
    transformers' pattern alike); phi3 has none unless made with `sliding_window=...`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind in ("llama", "llama3", "qwen2", "qwen3"):
        return frozenset()
    if kind == "gemma2":  # even layers local, odd layers global
        return frozenset(i for i in range(n_layers) if i % 2 == 0)
    if kind == "gemma3":  # every sixth layer global
        return frozenset(i for i in range(n_layers) if i % 6 != 5)
    return frozenset(range(n_layers))  # mistral, phi3: every layer


def gguf_safe_overrides(kind: str) -> dict[str, Any]:
    """Overrides under which `kind` converts to llama.cpp's GGUF layout with nothing lost."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "gemma2":
        return {"query_pre_attn_scalar": 32}  # == head_dim
    return {}


def build_config(kind: str, **overrides: Any) -> Any:
    """The `transformers` config for `kind`, with `overrides` applied to its keyword arguments."""
    import transformers

    class_name, kwargs = _spec(kind)
    kwargs.update(overrides)
    return getattr(transformers, class_name)(**kwargs)


def make_tiny(kind: str, out: Path, *, tokenizer_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random float32 model of `kind` (see the module doc) as an HF folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = build_config(kind, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model, kind, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def _spread_weights(model: Any, kind: str, seed: int) -> None:
    """Give norms and biases random values and shrink tied embeddings.

    NOTE: transformers initialises every RMSNorm to 1 (Gemma's to 0, used as 1 + w) and every bias to 0;
    a loader that dropped a norm, mapped q_norm onto k_norm or ignored Qwen2's biases would then still
    match. Random values make each of those tensors count. With a tied head at std 0.1 a token's own
    embedding dominates its logits (Gemma also scales it by sqrt(hidden)) and greedy decoding repeats one
    token, so tied embeddings get a smaller std.
    """
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    gemma = kind.startswith("gemma")
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("norm.weight"):
                param.copy_(noise * NORM_STD + (0.0 if gemma else 1.0))
            elif name.endswith(".bias"):
                param.copy_(noise * INIT_STD)
            elif tied and name.endswith("embed_tokens.weight"):
                param.copy_(noise * TIED_EMBED_STD)
