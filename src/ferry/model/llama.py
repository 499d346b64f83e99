"""The llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as a plain ``nn.Module`` over paged KV.

Tokens of all scheduled sequences are flattened into one batch ``[T]``; attention finds each
sequence's context through ``AttentionMetadata``. q/k/v and gate/up projections are fused into one
matmul each (loaded from the separate Hugging Face tensors).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ferry.config import ArchConfig
from ferry.kernels.packing import QuantizedTensor, concat_rows, pack
from ferry.model.layers.attention import AttentionMetadata, paged_attention
from ferry.model.layers.linear import Linear, PackedWeight, VocabEmbedding
from ferry.model.layers.norm import RMSNorm
from ferry.model.layers.rotary import RotaryEmbedding, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, 1, D]

KVCache = tuple[torch.Tensor, torch.Tensor]

Weight = torch.Tensor | QuantizedTensor


def _same_type_runs(tensors: list[QuantizedTensor]) -> list[QuantizedTensor]:
    """Consecutive row slices of one quant type fused into one tensor each (one kernel call)."""
    runs: list[list[QuantizedTensor]] = []
    for t in tensors:
        if runs and runs[-1][0].qtype == t.qtype and runs[-1][0].shape[1] == t.shape[1]:
            runs[-1].append(t)
        else:
            runs.append([t])
    return [concat_rows(run) for run in runs]


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=arch.attention_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata,
                kernels: ModuleType | None) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if kernels is not None:  # rotate q and k in place, in the fused output
            kernels.rotary_qkv_(qkv, rope[0].squeeze(1), rope[1].squeeze(1), self.num_heads,
                                self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if kernels is None:
            q, k = apply_rotary(q, k, *rope)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kernels)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.intermediate = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: ModuleType | None = None) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        if kernels is not None:
            return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch)

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata,
                kernels: ModuleType | None) -> torch.Tensor:
        if kernels is None:
            x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, None)
            return x + self.mlp(self.post_attention_layernorm(x))
        attn = self.self_attn(self.input_layernorm(x, kernels), rope, kv_cache, meta, kernels)
        x, h = kernels.add_rms_norm(x, attn, self.post_attention_layernorm.weight,
                                    self.post_attention_layernorm.eps)
        return x + self.mlp(h, kernels)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rope = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                    arch.rope_scaling)
        self.lm_head = (None if arch.tie_word_embeddings
                        else Linear(arch.hidden_size, arch.vocab_size, bias=False))
        # ferry's compiled CPU kernels (float32 only), set by the runner; None: PyTorch ops
        self.kernels: ModuleType | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden]
        x = self.embed_tokens.embed(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta, self.kernels)
        return self.norm(x, self.kernels)

    def init_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers after building on the meta device."""
        arch = self.arch
        self.rope = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                    arch.rope_scaling).to(device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits: [N, vocab] float32
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head(hidden).float()

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Weight]],
                     quant_ops: ModuleType | None = None) -> int:
        """Copy Hugging Face-named tensors in, filling the fused q/k/v and gate/up slices.

        ``QuantizedTensor`` weights are kept packed when ``quant_ops`` (the compiled kernels) is
        given and every slice of the layer's weight arrives as one (of any kernel types: each run
        of one type is a part); otherwise they are dequantized like any other. Returns how many
        layers hold packed weights.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        quantized: dict[str, list[tuple[tuple[int, int] | None, QuantizedTensor]]] = (
            defaultdict(list))
        for name, tensor in weights:
            target, rows = self._target(name)
            if target is None:
                continue  # e.g. rotary inv_freq buffers in old checkpoints
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} for {self.arch.architecture}")
            if isinstance(tensor, QuantizedTensor) and quant_ops is not None:
                quantized[target].append((rows, tensor))
            else:
                self._copy_in(name, params[target], rows, tensor)
            loaded.add(f"{target}:{rows}")
        expected = self._expected_slices(params)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}")
        packed = 0
        for target, parts in quantized.items():
            parts.sort(key=lambda p: p[0] or (0, 0))
            layer = self.get_submodule(target.rsplit(".", 1)[0])
            groups = _same_type_runs([t for _, t in parts])
            if (isinstance(layer, Linear) and target.endswith(".weight")
                    and sum(g.shape[0] for g in groups) == params[target].shape[0]
                    and all(g.shape[1] == params[target].shape[1] for g in groups)):
                layer.use_packed([PackedWeight(pack(g), quant_ops) for g in groups])
                packed += 1
            else:  # e.g. q/k quantized but v a float or Q5_K tensor: dequantize them all
                for rows, t in parts:
                    self._copy_in(target, params[target], rows, t)
        return packed

    @staticmethod
    def _copy_in(name: str, param: nn.Parameter, rows: tuple[int, int] | None,
                 tensor: Weight) -> None:
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize()
        with torch.no_grad():
            dst = param.data if rows is None else param.data[rows[0]:rows[1]]
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)

    def _target(self, name: str) -> tuple[str | None, tuple[int, int] | None]:
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            return None, None
        if name == "lm_head.weight" and self.lm_head is None:
            return None, None  # tied: the embedding is the output projection
        attn = self.layers[0].self_attn
        q, kv = attn.q_size, attn.kv_size
        slices = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        inter = self.arch.intermediate_size
        mlp_slices = {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}
        for part, rows in slices.items():
            if f".self_attn.{part}." in name:
                return name.replace(part, "qkv_proj"), rows
        for part, rows in mlp_slices.items():
            if f".mlp.{part}." in name:
                return name.replace(part, "gate_up_proj"), rows
        return name, None

    def _expected_slices(self, params: dict[str, nn.Parameter]) -> set[str]:
        expected = set()
        attn = self.layers[0].self_attn
        q, kv = attn.q_size, attn.kv_size
        inter = self.arch.intermediate_size
        for name in params:
            if "qkv_proj" in name:
                expected |= {f"{name}:{r}" for r in [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]}
            elif "gate_up_proj" in name:
                expected |= {f"{name}:{r}" for r in [(0, inter), (inter, 2 * inter)]}
            else:
                expected.add(f"{name}:None")
        return expected
