"""The metadata of a tiny synthetic llama-family GGUF: sizes and a byte-level BPE vocabulary whose
last two tokens are the control bos/eos. Shared by the loader, quant-type and fake-Hub tests."""

from __future__ import annotations

import gguf


def write_llama_header(w: gguf.GGUFWriter, *, context: int, hidden: int, layers: int, inter: int,
                       heads: int, kv_heads: int, tokens: list[str], merges: list[str]) -> None:
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
