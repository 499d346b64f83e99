"""The draft model of ``draft_model`` speculation: its own weights and KV tensors.

The draft's KV pool has as many blocks of the same size as the target's, and a token's K/V lives
at the same slot in both (``block_ids[p // bs] * bs + p % bs``): the scheduler's one block table
serves both models, so neither a second block manager nor a second allocation exists.

    target k_cache[l]: [num_blocks, bs, Hkv,  D ]      draft k_cache[l]: [num_blocks, bs, Hkv', D']
                           same block ids, same slots, different shapes

The runner drives it: every step the draft runs the same flat batch as the target (prefill
chunks and verified positions, so its KV mirrors the target's wherever the target computed), then
proposes k tokens for each sampling request in k one-token forwards.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from ferry.loader import LoadedModel
from ferry.model.kv_tensors import kv_tensors
from ferry.model.layers.attention import AttentionMetadata
from ferry.model.llama import KVCache
from ferry.model.registry import build_model

logger = logging.getLogger(__name__)


class DraftModel:
    def __init__(self, loaded: LoadedModel, target_vocab_size: int, *, dtype: torch.dtype,
                 device: torch.device, kernels: ModuleType | None, keep_quantized: bool,
                 num_blocks: int, block_size: int) -> None:
        arch = loaded.arch
        if arch.vocab_size != target_vocab_size:
            raise ValueError(f"speculative model {loaded.name} has a vocabulary of "
                             f"{arch.vocab_size} tokens but the target's has {target_vocab_size}: "
                             "a draft model must share the target's vocabulary")
        self.name = loaded.name
        self.arch = arch
        with torch.device("meta"):
            model = build_model(arch)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.kernels = kernels
        quant_ops = kernels if keep_quantized else None
        model.load_weights(loaded.weights(quant_ops is not None), quant_ops)  # type: ignore[operator]
        model.init_buffers(device)  # type: ignore[operator]
        self.model = model.eval()
        shape = (num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        # NOTE: zero-filled as the target's: masked padding must never read a NaN
        self.kv_caches: list[KVCache] = kv_tensors(arch.num_hidden_layers, shape, dtype, device)
        logger.info("speculative draft model %s: %d layers, KV %.1f MiB", loaded.name,
                    arch.num_hidden_layers, self.kv_cache_bytes / 2**20)

    @property
    def kv_cache_bytes(self) -> int:
        k, _ = self.kv_caches[0]
        return 2 * k.numel() * k.element_size() * len(self.kv_caches)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden']; writes the draft's K/V of every row
        return self.model(input_ids, positions, self.kv_caches, meta)  # type: ignore[no-any-return]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden'] -> [N] int64, the draft's most likely next tokens
        return self.model.compute_logits(hidden).argmax(dim=-1)  # type: ignore[operator,no-any-return]
