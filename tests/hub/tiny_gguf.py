"""A tiny one-layer llama GGUF (byte-level BPE vocabulary) written with gguf-py, for Hub repos."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from gguf_header import write_llama_header

HIDDEN, HEADS, KV_HEADS, INTER, CONTEXT = 64, 4, 2, 128, 256


def _tokens() -> list[str]:
    from ferry.tokenizer import _bytes_to_unicode

    return [*_bytes_to_unicode().values(), "Ġt", "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(path: Path, *, matrix_type: Q = Q.F32, seed: int = 0) -> Path:
    """2-D weights stored as ``matrix_type`` (F32 or Q8_0), norms as F32."""
    rng = np.random.default_rng(seed)
    tokens = _tokens()
    w = gguf.GGUFWriter(str(path), "llama")
    write_llama_header(w, context=CONTEXT, hidden=HIDDEN, layers=1, inter=INTER, heads=HEADS,
                       kv_heads=KV_HEADS, tokens=tokens, merges=["Ġ t"])
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,),
              "output.weight": (len(tokens), HIDDEN), "blk.0.attn_norm.weight": (HIDDEN,),
              "blk.0.ffn_norm.weight": (HIDDEN,), "blk.0.attn_q.weight": (HEADS * head_dim, HIDDEN),
              "blk.0.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
              "blk.0.attn_output.weight": (HIDDEN, HEADS * head_dim), "blk.0.ffn_gate.weight": (INTER, HIDDEN),
              "blk.0.ffn_up.weight": (INTER, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, INTER)}
    for name, shape in shapes.items():
        values = rng.normal(0, 0.1, size=shape).astype(np.float32)
        if len(shape) == 2 and matrix_type != Q.F32:
            w.add_tensor(name, quantize(values, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
