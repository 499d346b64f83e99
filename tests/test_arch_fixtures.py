"""The per-architecture fixtures (tests/arch_models.py) and the GGUF converter (tests/gguf_convert.py),
proven against `transformers` alone: no ferry code is involved.

transformers' own GGUF reader loads each converted file and must give the HF folder's logits. Where that
reader drops something llama.cpp keeps, the test hands it over from the file's metadata (and says so):
gemma2's soft-capping keys, gemma/qwen3's head size, the Gemma query scale llama.cpp derives, and Llama
3's `rope_freqs` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from arch_models import (
    EOS_ID,
    KINDS,
    SLIDING,
    build_config,
    gguf_safe_overrides,
    make_tiny,
    sliding_layers,
)
from gguf_convert import convert, permute_rope_rows

PROMPT = "The quick brown fox jumps over the lazy"


@pytest.fixture(scope="session", params=KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         hf_tokenizer_dir: Path) -> tuple[str, Path]:
    kind = request.param
    return kind, make_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}"), tokenizer_dir=hf_tokenizer_dir)


@dataclass(frozen=True)
class Converted:
    kind: str
    folder: Path  # the HF folder
    path: Path  # its GGUF, float32
    fields: dict[str, Any]  # metadata, read once: GGUFReader takes seconds on a 49152-token vocabulary
    tensors: dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer_dir: Path) -> Callable[[str], Converted]:
    """`converted(kind)`: a model made with `gguf_safe_overrides`, its HF folder and its GGUF, built once."""
    cache: dict[str, Converted] = {}

    def get(kind: str) -> Converted:
        if kind not in cache:
            # NOTE: not named plain "mistral": transformers treats general.name == "mistral" as arch
            # mistral and then fails to map its tensors.
            folder = make_tiny(kind, tmp_path_factory.mktemp(f"gguf-{kind}"), tokenizer_dir=hf_tokenizer_dir,
                               **gguf_safe_overrides(kind))
            path = convert(folder, folder / "model.gguf")
            cache[kind] = Converted(kind, folder, path, *_read(path))
        return cache[kind]

    return get


def _read(path: Path) -> tuple[dict[str, Any], dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: (t.tensor_type, np.array(t.data)) for t in reader.tensors}


def _hf(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def _ids(folder: Path, text: str = PROMPT) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt").input_ids


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


# ------------------------------------------------------------------ the HF folders


def test_folder_holds_a_checkpoint_and_tokenizer(tiny: tuple[str, Path]) -> None:
    _, folder = tiny
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names


def test_greedy_tokens_are_varied_and_never_eos(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    model = _hf(folder)
    ids = _ids(folder)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert len(out) == 16, kind
    assert EOS_ID not in out, kind
    assert len(set(out)) >= 6, (kind, out)


def test_sliding_windows_are_as_documented(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    config = _hf(folder).config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    assert window == SLIDING[kind]
    if kind.startswith("gemma"):
        local = {i for i, t in enumerate(config.layer_types) if t == "sliding_attention"}
        assert local == set(sliding_layers(kind, config.num_hidden_layers))
        assert 0 < len(local) < config.num_hidden_layers  # local and global layers both present


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in KINDS if SLIDING[k] is not None])
def test_prompts_past_the_window_feel_it(kind: str, tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    folder = make_tiny(kind, tmp_path / kind, tokenizer_dir=hf_tokenizer_dir)
    ids = _ids(folder, " ".join(["one two three four five six seven eight"] * 4))
    window = SLIDING[kind]
    assert window is not None and ids.shape[1] > window + 4
    windowed, full = _logits(_hf(folder), ids), _logits(_hf(folder, sliding_window=4096), ids)
    torch.testing.assert_close(windowed[:window], full[:window], rtol=0, atol=1e-5)
    assert (windowed[window + 1:] - full[window + 1:]).abs().max() > 1e-3


def test_llama3_scaling_changes_some_frequencies_only() -> None:
    config = build_config("llama3")
    params, head_dim = config.rope_parameters, config.head_dim
    wavelen = [2 * math.pi * params["rope_theta"] ** (i / head_dim) for i in range(0, head_dim, 2)]
    old = params["original_max_position_embeddings"]
    assert min(wavelen) < old / params["high_freq_factor"]  # kept
    assert max(wavelen) > old / params["low_freq_factor"]  # divided by factor
    assert any(old / params["high_freq_factor"] <= w <= old / params["low_freq_factor"] for w in wavelen)


# ------------------------------------------------------------------ the GGUF files vs transformers


def _reader_overrides(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Config values transformers' GGUF reader leaves at its defaults, taken from the file the way
    llama.cpp reads them."""
    arch = fields["general.architecture"]
    if kind == "qwen3":  # no key_length -> head_dim mapping for qwen3 in transformers
        return {"head_dim": fields[f"{arch}.attention.key_length"]}
    if kind.startswith("gemma"):
        # llama.cpp scales queries by 1/sqrt(key_length) (27B aside); transformers' default is 256.
        extra = {"query_pre_attn_scalar": fields[f"{arch}.attention.key_length"]}
        if kind == "gemma2":  # transformers does not read the soft-capping keys
            extra["attn_logit_softcapping"] = fields["gemma2.attn_logit_softcapping"]
            extra["final_logit_softcapping"] = fields["gemma2.final_logit_softcapping"]
        return extra
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_logits_match_the_hf_folder(kind: str, converted: Callable[[str], Converted]) -> None:
    c = converted(kind)
    ids = _ids(c.folder)
    assert ids.shape[1] < 16  # below every sliding window: the GGUF of Mistral has none (llama.cpp)
    ref = _logits(_hf(c.folder), ids)
    model = _hf(c.folder, gguf_file=c.path.name, **_reader_overrides(kind, c.fields))
    if kind == "llama3":
        # transformers ignores rope_freqs; llama.cpp divides each rotary frequency by it.
        assert (_logits(model, ids) - ref).abs().max() > 1e-2  # so the tensor matters
        rotary = model.model.rotary_emb
        rotary.inv_freq = rotary.inv_freq / torch.from_numpy(c.tensors["rope_freqs.weight"][1])
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_architecture_names_and_arch_specific_keys(kind: str, converted: Callable[[str], Converted]) -> None:
    c = converted(kind)
    fields, tensors = c.fields, c.tensors
    arch = {"llama3": "llama", "mistral": "llama"}.get(kind, kind)
    assert fields["general.architecture"] == arch
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon"):
        assert f"{arch}.{key}" in fields, key
    keys = set(fields)
    window = {"gemma2": 16, "gemma3": 16, "phi3": 0}.get(kind)
    assert fields.get(f"{arch}.attention.sliding_window") == window
    assert (f"{arch}.rope.freq_base" in keys) == (kind != "gemma2")
    assert ("gemma2.attn_logit_softcapping" in keys) == (kind == "gemma2")
    assert ("rope.scaling" in " ".join(keys)) == (kind == "phi3")  # llama3's scaling is a tensor only
    assert (f"{arch}.attention.key_length" in keys) == (kind not in ("qwen2", "phi3"))
    assert ("rope_freqs.weight" in tensors) == (kind == "llama3")
    assert ("output.weight" in tensors) == (kind not in ("qwen2", "gemma2", "gemma3"))
    assert all(qtype == gguf.GGMLQuantizationType.F32 for qtype, _ in tensors.values())


@pytest.mark.parametrize("kind", KINDS)
def test_weight_transformations(kind: str, converted: Callable[[str], Converted]) -> None:
    from safetensors.numpy import load_file

    c = converted(kind)
    hf = load_file(str(c.folder / "model.safetensors"))
    tensors = {name: data for name, (_, data) in c.tensors.items()}
    if kind in ("llama", "llama3", "mistral"):
        q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
        np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], permute_rope_rows(q, 4))
        np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], permute_rope_rows(k, 2))
        assert not np.array_equal(tensors["blk.0.attn_q.weight"], q)
    elif kind == "phi3":
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], hf["model.layers.0.self_attn.qkv_proj.weight"])
        np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"], hf["model.layers.0.mlp.gate_up_proj.weight"])
        assert tensors["blk.0.ffn_up.weight"].shape == (256, 64)  # gate rows, then up rows
    else:
        np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    offset = 1.0 if kind.startswith("gemma") else 0.0
    np.testing.assert_array_equal(tensors["output_norm.weight"], hf["model.norm.weight"] + offset)
    if kind in ("qwen3", "gemma3"):
        np.testing.assert_array_equal(tensors["blk.1.attn_k_norm.weight"],
                                      hf["model.layers.1.self_attn.k_norm.weight"] + offset)


def test_llama3_rope_freqs_are_transformers_frequency_divisors(converted: Callable[[str], Converted]) -> None:
    c = converted("llama3")
    model = _hf(c.folder)
    config = model.config
    dims = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
    plain = 1.0 / config.rope_parameters["rope_theta"] ** dims
    factors = c.tensors["rope_freqs.weight"][1]
    np.testing.assert_allclose(factors, (plain / model.model.rotary_emb.inv_freq).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) == 3


@pytest.fixture(scope="module")
def smollm2_fields(smollm2_path: Path) -> dict[str, Any]:
    return _read(smollm2_path)[0]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tokenizer_metadata_matches_the_real_smollm2_gguf(kind: str, converted: Callable[[str], Converted],
                                                          smollm2_fields: dict[str, Any]) -> None:
    ours, real = converted(kind).fields, smollm2_fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert ours[key] == real[key], key
    # llama.cpp turns BOS off for llama-arch 49152-token vocabularies only
    assert ours.get("tokenizer.ggml.add_bos_token") == (False if kind == "llama" else None)


# ------------------------------------------------------------------ quantized files, refusals


@pytest.mark.slow
def test_q8_0_file_quantizes_matrices_only_and_stays_close(converted: Callable[[str], Converted]) -> None:
    c = converted("qwen2")
    path = convert(c.folder, c.folder / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    fields, tensors = _read(path)
    assert set(tensors) == set(c.tensors)
    for name, (qtype, _) in tensors.items():
        matrix = c.tensors[name][1].ndim == 2
        assert qtype == (gguf.GGMLQuantizationType.Q8_0 if matrix else gguf.GGMLQuantizationType.F32), name
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    ids = _ids(c.folder)
    got = _logits(_hf(c.folder, gguf_file=path.name), ids)
    ref = _logits(_hf(c.folder), ids)
    assert 0 < (got - ref).abs().max() < 0.25


def test_unrepresentable_gemma_configs_are_refused(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    gemma2 = make_tiny("gemma2", tmp_path / "gemma2", tokenizer_dir=hf_tokenizer_dir)  # scalar 24 != 32
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        convert(gemma2, tmp_path / "g2.gguf")
    layers = ["sliding_attention", "full_attention"] * 3
    gemma3 = make_tiny("gemma3", tmp_path / "gemma3", tokenizer_dir=hf_tokenizer_dir, layer_types=layers)
    with pytest.raises(ValueError, match="layer_types"):
        convert(gemma3, tmp_path / "g3.gguf")
