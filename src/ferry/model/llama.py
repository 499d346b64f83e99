"""The one decoder: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3, Phi-3 and SmolLM as a plain
``nn.Module`` over paged KV.

Tokens of all scheduled sequences are flattened into one batch ``[T]``; attention finds each
sequence's context through ``AttentionMetadata``. q/k/v and gate/up projections are fused into one
matmul each (loaded from the separate Hugging Face tensors, or as they are from Phi-3's fused ones).
The architectures differ only by ``ArchConfig`` flags: q/k norms (Qwen3, Gemma 3), sandwich norms,
GeGLU, embedding scale and soft-capping (Gemma), sliding-window layers with their own rope base
(Mistral, Gemma, Phi-3) and rope scalings (llama3, longrope).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferry.config import ArchConfig
from ferry.kernels.packing import QuantizedTensor, concat_rows, pack
from ferry.model.kv_tensors import KVCache
from ferry.model.layers.attention import AttentionMetadata, paged_attention
from ferry.model.layers.linear import Linear, PackedWeight, VocabEmbedding
from ferry.model.layers.norm import RMSNorm
from ferry.model.layers.rotary import RotaryEmbedding, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, 1, D]

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
    def __init__(self, arch: ArchConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=arch.attention_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)
        self.scale = (arch.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.window = arch.layer_window(layer)
        self.softcap = arch.attn_logit_softcapping
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def _norm_qk(self, qkv: torch.Tensor) -> None:
        """RMSNorm over each q and k head (Qwen3, Gemma 3), in place, before rope."""
        assert self.q_norm is not None and self.k_norm is not None
        t = qkv.shape[0]
        q = qkv[:, :self.q_size].reshape(t * self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].reshape(t * self.num_kv_heads, self.head_dim)
        qkv[:, :self.q_size] = self.q_norm(q).view(t, self.q_size)
        qkv[:, self.q_size:self.q_size + self.kv_size] = self.k_norm(k).view(t, self.kv_size)

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata,
                kernels: ModuleType | None) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            self._norm_qk(qkv)
        if kernels is not None:  # rotate q and k in place, in the fused output
            kernels.rotary_qkv_(qkv, rope[0].squeeze(1), rope[1].squeeze(1), self.num_heads,
                                self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if kernels is None:
            q, k = apply_rotary(q, k, *rope)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kernels,
                            window=self.window, softcap=self.softcap)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.intermediate = arch.intermediate_size
        self.gelu = arch.hidden_act == "gelu_pytorch_tanh"  # Gemma's GeGLU
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: ModuleType | None = None) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        if kernels is not None and not self.gelu:
            return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, layer)
        # NOTE: in Gemma's sandwich layout this norms the attention output, and the MLP's input
        # norm is pre_feedforward_layernorm; in Llama's it is the MLP's input norm.
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch)
        self.sandwich = arch.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.local_rope = arch.rope_local_theta is not None and arch.layer_window(layer) is not None

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata,
                kernels: ModuleType | None) -> torch.Tensor:
        if self.sandwich:
            h = self.self_attn(self.input_layernorm(x, kernels), rope, kv_cache, meta, kernels)
            x = x + self.post_attention_layernorm(h, kernels)
            h = self.mlp(self.pre_feedforward_layernorm(x, kernels), kernels)
            return x + self.post_feedforward_layernorm(h, kernels)
        if kernels is None:
            x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, None)
            return x + self.mlp(self.post_attention_layernorm(x))
        attn = self.self_attn(self.input_layernorm(x, kernels), rope, kv_cache, meta, kernels)
        x, h = kernels.add_rms_norm(x, attn, self.post_attention_layernorm.weight,
                                    self.post_attention_layernorm.eps)
        return x + self.mlp(h, kernels)


def _linear_spec(ops: ModuleType, linear: Linear) -> Any:
    if linear.packed is None:
        return ops.LinearSpec([], [], [], [], [], linear.weight, linear.bias, 0)
    parts = list(linear.packed)
    kept = [p.bf16_weight for p in parts if p.bf16_weight is not None]
    return ops.LinearSpec([p.codes for p in parts], [p.d for p in parts], [p.m for p in parts],
                          [p.type_id for p in parts], [p.out_features for p in parts], None,
                          linear.bias, parts[0].bf16_rows or 0,
                          kept if len(kept) == len(parts) else [])


def _build_stack(ops: ModuleType, layers: nn.ModuleList) -> Any:
    """The kernels' DecodeStack over these layers' weights (shared, not copied)."""
    attn = layers[0].self_attn
    stack = ops.DecodeStack(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                        layer.input_layernorm.eps, _linear_spec(ops, a.qkv_proj),
                        _linear_spec(ops, a.o_proj), _linear_spec(ops, mlp.gate_up_proj),
                        _linear_spec(ops, mlp.down_proj))
    return stack


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i) for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rope, self.local_rope = self._rope_tables()
        self.lm_head = (None if arch.tie_word_embeddings
                        else Linear(arch.hidden_size, arch.vocab_size, bias=False))
        # ferry's compiled CPU kernels (float32 only), set by the runner; None: PyTorch ops
        self.kernels: ModuleType | None = None
        # run all-decode steps in one native call (kernels/decode_step.cpp) where the layers allow
        self.fused_decode = True
        self._stack: Any = None  # the kernels' DecodeStack, built on the first all-decode step
        self._stack_kernels: ModuleType | None = None  # the kernels it was built with

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden]
        x = self.embed_tokens.embed(input_ids)
        if self.arch.embedding_scale is not None:
            # NOTE: Gemma rounds the scale to the activation dtype first, as here.
            x = x * torch.tensor(self.arch.embedding_scale, dtype=x.dtype)
        rope = self.rope(positions, x.dtype)
        # NOTE: every row a single-token decode (a one-token prefill chunk counts as one too)
        stack = self._decode_stack() if meta.num_decodes == input_ids.shape[0] else None
        if stack is not None and meta.decode_context_lens is not None:
            assert meta.decode_block_table is not None
            x = stack.forward(x, rope[0].squeeze(1), rope[1].squeeze(1), [k for k, _ in kv_caches],
                              [v for _, v in kv_caches], meta.slot_mapping,
                              meta.decode_block_table, meta.decode_context_lens)
            return self.norm(x, self.kernels)
        local = self.local_rope(positions, x.dtype) if self.local_rope is not None else rope
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, local if layer.local_rope else rope, kv_cache, meta, self.kernels)
        return self.norm(x, self.kernels)

    def _decode_stack(self) -> Any:
        """The native decode step over every layer, or None where a layer needs the Python path
        (no kernels, sliding windows, soft-capping, q/k or sandwich norms, GeGLU)."""
        ops = self.kernels
        if ops is None or not self.fused_decode:
            return None
        if self._stack_kernels is ops:
            return self._stack
        arch = self.arch
        plain = (not arch.sandwich_norm and not arch.qk_norm and arch.hidden_act != "gelu_pytorch_tanh"
                 and arch.attn_logit_softcapping is None
                 and all(layer.self_attn.window is None for layer in self.layers))
        self._stack, self._stack_kernels = (_build_stack(ops, self.layers) if plain else None), ops
        return self._stack

    def init_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers (rope tables) after building on the meta device."""
        rope, local = self._rope_tables()
        self.rope = rope.to(device)
        self.local_rope = None if local is None else local.to(device)

    def _rope_tables(self) -> tuple[RotaryEmbedding, RotaryEmbedding | None]:
        """The rope of full-attention layers, and of sliding ones when theirs differs (Gemma 3:
        their own base, no scaling)."""
        arch = self.arch
        rope = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                               arch.rope_scaling, arch.rope_freq_factors)
        local = (None if arch.rope_local_theta is None else RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_local_theta))
        return rope, local

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits: [N, vocab] float32
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = head(hidden).float()
        cap = self.arch.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

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
            if rows is None:  # a whole fused tensor (Phi-3's qkv_proj, gate_up_proj) fills every slice
                loaded |= {f"{target}:{r}" for r in self._slices(target)}
            else:
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

    def _slices(self, name: str) -> list[tuple[int, int] | None]:
        """The row ranges the loader fills one by one in a parameter (None: the whole of it)."""
        attn = self.layers[0].self_attn
        q, kv = attn.q_size, attn.kv_size
        inter = self.arch.intermediate_size
        if "qkv_proj" in name:
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        if "gate_up_proj" in name:
            return [(0, inter), (inter, 2 * inter)]
        return [None]

    def _expected_slices(self, params: dict[str, nn.Parameter]) -> set[str]:
        return {f"{name}:{r}" for name in params for r in self._slices(name)}
