"""Every architecture ferry runs, from a Hugging Face folder and from GGUF, against `transformers`.

For each kind of tests/arch_models.py a tiny random model is saved as a safetensors folder and
written as GGUF in llama.cpp's layout (tests/gguf_convert.py: q/k permutation, ``rope_freqs``,
Gemma's +1 norms, Phi-3's fused tensors). Both must give the reference's prefill logits (within
1e-3) and its greedy tokens: alone, batched with prompts of other lengths, again from the prefix
cache, and in a pool so small that requests are preempted and recomputed. Prompts run past the
sliding window of the windowed kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from arch_models import KINDS, SLIDING, gguf_safe_overrides, make_tiny
from engine.test_parity import ferry_prompt_logits, hf_prompt_logits
from gguf_convert import convert
from hf_reference import hf_greedy, load_hf

from ferry import LLM, SamplingParams

NEW_TOKENS = 24
TEXTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a dragon who loved to eat apples and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])  # the first ten numbers of the sequence, printed",
]
FORMATS = ("safetensors", "gguf")


class Reference:
    """One kind's folder, GGUF file, transformers model and expected greedy tokens."""

    def __init__(self, kind: str, root: Path, tokenizer_dir: Path, overrides: dict[str, Any]) -> None:
        self.kind = kind
        self.window: int | None = overrides.get("sliding_window", SLIDING[kind])
        self.folder = make_tiny(kind, root / kind, tokenizer_dir=tokenizer_dir, **overrides)
        # NOTE: llama.cpp's converter drops Mistral's window; ferry honours the key when a file has it
        extra = {"llama.attention.sliding_window": self.window} if kind == "mistral" else {}
        self.gguf = convert(self.folder, root / f"{kind}.gguf", extra_metadata=extra)
        self.hf = load_hf(self.folder)
        self._expected: dict[tuple[int, ...], list[int]] = {}

    def greedy(self, ids: list[int]) -> list[int]:
        key = tuple(ids)
        if key not in self._expected:
            self._expected[key] = hf_greedy(self.hf, ids, NEW_TOKENS)
        return self._expected[key]

    def path(self, fmt: str) -> str:
        return str(self.folder if fmt == "safetensors" else self.gguf)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer_dir: Path) -> dict[str, Reference]:
    root = tmp_path_factory.mktemp("architectures")
    refs = {kind: Reference(kind, root, hf_tokenizer_dir, gguf_safe_overrides(kind)) for kind in KINDS}
    # Phi-3 with a sliding window too (Phi-3-mini's config has one), so the window is tested on a
    # second all-layers-sliding model besides Mistral.
    refs["phi3-window"] = Reference("phi3", root / "w", hf_tokenizer_dir, {"sliding_window": 16})
    return refs


CASES = [(kind, fmt) for kind in (*KINDS, "phi3-window") for fmt in FORMATS]
WINDOWED = {"mistral", "gemma2", "gemma3", "phi3-window"}


def _params() -> SamplingParams:
    # min_tokens bans EOS exactly as the reference's min_new_tokens does
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("kind,fmt", CASES)
def test_matches_transformers(references: dict[str, Reference], kind: str, fmt: str) -> None:
    ref = references[kind]
    llm = LLM(ref.path(fmt), kv_cache_memory=32 << 20, block_size=4)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    if kind in WINDOWED:
        assert ref.window is not None and len(prompts[2]) > 2 * ref.window + NEW_TOKENS  # prompts and outputs pass the window

    diff = (ferry_prompt_logits(llm, prompts[2]) - hf_prompt_logits(ref.hf, prompts[2])).abs().max().item()
    assert diff < 1e-3, f"{kind} ({fmt}): prefill logits differ by {diff}"

    expected = [ref.greedy(ids) for ids in prompts]
    assert len(set(expected[1])) > 3, "degenerate reference output: the test would prove little"
    alone = llm.generate({"prompt_token_ids": prompts[1]}, _params())[0]
    assert alone.outputs[0].token_ids == expected[1]
    batch = llm.generate([{"prompt_token_ids": ids} for ids in prompts], _params())
    assert [o.outputs[0].token_ids for o in batch] == expected

    hits_before = llm.engine.core.kv.prefix_cache_stats.hits
    again = llm.generate([{"prompt_token_ids": ids} for ids in prompts], _params())
    assert [o.outputs[0].token_ids for o in again] == expected
    assert llm.engine.core.kv.prefix_cache_stats.hits > hits_before  # served from the prefix cache
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, "phi3-window"])
def test_preempted_requests_match_transformers(references: dict[str, Reference], kind: str) -> None:
    """A pool too small for the batch: requests are preempted, recomputed, and still exact."""
    ref = references[kind]
    llm = LLM(ref.path("safetensors"), block_size=4, num_gpu_blocks_override=48, max_num_seqs=8,
              max_num_batched_tokens=32)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS] * 2
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], _params())
    assert [o.outputs[0].token_ids for o in outs] == [ref.greedy(ids) for ids in prompts]
    if ref.window is None or kind.startswith("gemma"):
        # NOTE: all-sliding models give back the blocks behind their window, so this pool may be
        # enough for them without preemption; the others must have been preempted.
        assert llm.engine.core.scheduler.num_preemptions > 0
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "phi3-window"])
def test_sliding_window_models_hold_only_the_window(references: dict[str, Reference], kind: str) -> None:
    """While decoding past the window, a request holds the window's blocks, not its whole context."""
    ref = references[kind]
    llm = LLM(ref.path("safetensors"), block_size=4, num_gpu_blocks_override=64)
    engine = llm.engine
    ids = llm.tokenizer.encode(TEXTS[2])
    engine.add_request("r", {"prompt_token_ids": ids}, _params())
    held: list[int] = []
    while engine.has_unfinished():
        engine.step()
        held.append(engine.stats().num_total_blocks - engine.stats().num_free_blocks)
    assert ref.window is not None
    window_blocks = ref.window // 4 + 2  # the window, its partial edge and the block being written
    assert max(held[1:]) <= window_blocks < -(-(len(ids) + NEW_TOKENS) // 4)
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_hybrid_models_keep_every_block(references: dict[str, Reference]) -> None:
    """Gemma mixes sliding and global layers in one block table: the global ones read it all."""
    from ferry.loader import load_model

    for kind in ("gemma2", "gemma3"):
        arch = load_model(references[kind].path("safetensors")).arch
        assert arch.sliding_window == SLIDING[kind] and arch.kv_window is None
        assert any(arch.layer_window(i) is None for i in range(arch.num_hidden_layers))
    assert load_model(references["mistral"].path("gguf")).arch.kv_window == SLIDING["mistral"]


@pytest.mark.parametrize("kind", ["llama3", "gemma2", "gemma3", "qwen3", "phi3"])
def test_gguf_and_folder_read_the_same_config(references: dict[str, Reference], kind: str) -> None:
    """The variant fields ferry reads from GGUF metadata equal those it reads from config.json."""
    from ferry.loader import load_model

    folder = load_model(references[kind].path("safetensors")).arch
    gguf = load_model(references[kind].path("gguf")).arch
    for field in ("architecture", "qk_norm", "sandwich_norm", "hidden_act", "embedding_scale",
                  "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "sliding_window", "sliding_layers", "rope_local_theta", "head_dim"):
        assert getattr(gguf, field) == getattr(folder, field), field
    if kind == "llama3":
        # the folder computes llama3 scaling from its numbers; the GGUF divides by rope_freqs
        assert folder.rope_scaling is not None and gguf.rope_freq_factors is not None
        assert torch.tensor(gguf.rope_freq_factors).max().item() == pytest.approx(8.0)


@pytest.mark.slow
def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    """Gemma 3 4B and larger ship as Gemma3ForConditionalGeneration: ferry serves the text model
    inside (weights under ``language_model.``), skipping the vision tower and projector."""
    import shutil

    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    text = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                            initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=56, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=3, eoi_token_index=4, image_token_index=5)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(str(tmp_path))
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    hf = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    llm = LLM(str(tmp_path), kv_cache_memory=16 << 20)
    assert llm.engine.arch.architecture == "Gemma3ForCausalLM"
    ids = llm.tokenizer.encode(TEXTS[1])
    with torch.inference_mode():
        want = hf(input_ids=torch.tensor([ids])).logits[0].float()
    assert (ferry_prompt_logits(llm, ids) - want).abs().max().item() < 1e-3


@pytest.mark.slow
def test_phi3_longrope_matches_transformers_within_the_original_context(
        tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    """Phi-3.5's longrope: short factors and the magnitude sqrt(1 + ln(s) / ln(original)).

    NOTE: past the original context transformers switches the whole sequence to the long factors,
    ferry (as vLLM) only the positions past it; below it they agree, which is what is compared.
    """
    half = 8  # head_dim 16
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
               "long_factor": [2.0 + 0.5 * i for i in range(half)], "original_max_position_embeddings": 128}
    folder = make_tiny("phi3", tmp_path / "phi3-longrope", tokenizer_dir=hf_tokenizer_dir,
                       original_max_position_embeddings=128,
                       rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.0, **scaling})
    hf = load_hf(folder)
    llm = LLM(str(folder), kv_cache_memory=16 << 20)
    assert llm.engine.arch.rope_scaling is not None and llm.engine.arch.rope_scaling["rope_type"] == "longrope"
    ids = llm.tokenizer.encode(TEXTS[2])[:100]
    diff = (ferry_prompt_logits(llm, ids) - hf_prompt_logits(hf, ids)).abs().max().item()
    assert diff < 1e-3
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    short = ids[:60]
    assert llm.generate({"prompt_token_ids": short}, params)[0].outputs[0].token_ids == hf_greedy(hf, short, 16)


def test_split_gguf_loads_like_the_single_file(references: dict[str, Reference], tmp_path: Path) -> None:
    """A GGUF split as llama.cpp's gguf-split does (metadata in the first shard) loads from its
    first shard; another shard or a missing one is a clear error."""
    from ferry.loader import ModelFormatError, load_model

    first = convert(references["qwen3"].folder, tmp_path / "qwen3.gguf", split_max_tensors=6)
    shards = sorted(tmp_path.glob("qwen3-*-of-*.gguf"))
    assert first == shards[0] and first.name.endswith("-00001-of-%05d.gguf" % len(shards)) and len(shards) > 2
    whole = dict(load_model(references["qwen3"].path("gguf")).weights())
    split = dict(load_model(str(first)).weights())
    assert split.keys() == whole.keys()
    assert all(torch.equal(split[k], whole[k]) for k in whole)
    with pytest.raises(ModelFormatError, match="pass the first"):
        load_model(str(shards[1]))
    shards[-1].unlink()
    with pytest.raises(ModelFormatError, match="missing its shards"):
        load_model(str(first))
