"""SchedulerOutput -> tensors -> one forward over the whole batch -> sampled tokens.

Owns the model, the KV tensors and the sampler. Rows of the flat batch are ordered decodes first
(one token each, batched attention), then prefill chunks (one attention call each). Block tables
come with each ``ScheduledRequest``: the runner never asks the KV cache manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from types import ModuleType

import torch

from ferry.batch.outputs import (
    ModelRunnerOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
)
from ferry.batch.request import Request
from ferry.config import ArchConfig, CacheConfig, ModelConfig
from ferry.kernels.build import KernelUnavailableError, load_cpu_kernels
from ferry.model.layers.attention import AttentionMetadata, PrefillSeq
from ferry.model.layers.linear import PackedWeight
from ferry.model.llama import KVCache, Weight
from ferry.model.registry import build_model
from ferry.outputs import Logprob
from ferry.runner.memory import num_kv_blocks
from ferry.runner.sampler import Sampler, SamplerOutput, SamplingBatch
from ferry.structured import BitmaskFiller

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ``LoadedModel.weights``: (HF name, tensor) pairs; with True, GGUF blocks may stay quantized
WeightSource = Callable[[bool], Iterable[tuple[str, Weight]]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return device


class ModelRunner:
    def __init__(self, arch: ArchConfig, model_config: ModelConfig, cache_config: CacheConfig,
                 weights: WeightSource) -> None:
        self.arch = arch
        self.device = resolve_device(model_config.device)
        self.dtype = _DTYPES[model_config.dtype]
        self.block_size = cache_config.block_size
        # NOTE: built on the meta device and cast there, so the weights are materialized once,
        # directly in the target dtype on the target device (no float32 copy on the GPU).
        with torch.device("meta"):
            model = build_model(arch)
        model = model.to(dtype=self.dtype).to_empty(device=self.device)
        self.kernels = self._cpu_kernels()
        model.kernels = self.kernels
        quant_ops = self.kernels if model_config.weight_format == "auto" else None
        self.num_packed_layers: int = model.load_weights(  # type: ignore[operator]
            weights(quant_ops is not None), quant_ops)
        if quant_ops is not None:
            logger.info("%d layers run on GGUF quantized blocks (CPU kernels)",
                        self.num_packed_layers)
        model.init_buffers(self.device)  # type: ignore[operator]  # rotary tables stay float32
        self.model = model.eval()
        # NOTE: on CPU the packed GGUF blocks count as packed; on a GPU the allocator is asked
        self.num_blocks = num_kv_blocks(
            arch, cache_config, self.dtype, self.device,
            weight_bytes=None if self.device.type == "cuda" else self.weight_bytes)
        shape = (self.num_blocks, self.block_size, arch.num_key_value_heads, arch.head_dim)
        # NOTE: zero-filled, not empty: padded attention reads stale slots under a mask, and a NaN
        # there would survive a zero attention weight.
        self.kv_caches: list[KVCache] = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(arch.num_hidden_layers)]
        self.sampler = Sampler()
        self.bitmasks = BitmaskFiller()  # grammar masks of constrained requests
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB) on %s", self.num_blocks,
                    self.block_size, self.kv_cache_bytes / 2**20, self.device)

    def _cpu_kernels(self) -> ModuleType | None:
        """ferry's compiled kernels (quantized linear layers, decode attention), which run
        float32 on CPU; None elsewhere or when they cannot be built."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            logger.info("GGUF weights are dequantized to %s and attention runs on PyTorch ops "
                        "(ferry's kernels run float32 on CPU only)", self.dtype)
            return None
        try:
            kernels = load_cpu_kernels()
        except KernelUnavailableError as e:
            logger.warning("%s; GGUF weights are dequantized to float32 instead", e)
            return None
        if not kernels.vectorized():
            # NOTE: the portable build is a correctness fallback, several times slower than
            # PyTorch's matmuls; without AVX-512 the dense path is the fast one.
            logger.warning("ferry's CPU kernels need AVX-512, which this CPU lacks; GGUF weights "
                           "are dequantized to float32 and attention runs on PyTorch ops")
            return None
        return kernels

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights hold as loaded: dense parameters, and packed GGUF blocks as packed."""
        # NOTE: the rope tables are buffers too, but no weights (the file does not hold them)
        packed = [b for m in self.model.modules() if isinstance(m, PackedWeight) for b in m.buffers()]
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *packed])

    @property
    def kv_cache_bytes(self) -> int:
        k, v = self.kv_caches[0]
        return 2 * k.numel() * k.element_size() * len(self.kv_caches)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        order = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first
        input_ids, positions, meta, sample_rows = self._prepare(order)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampling = [s for s in order if s.samples]
        if not sampling:
            return ModelRunnerOutput({})
        logits = self.model.compute_logits(hidden[sample_rows])  # type: ignore[operator]
        requests = [s.request for s in sampling]
        # NOTE: ~10 us per constrained row, in llguidance's threads without the GIL; the matchers
        # already took every token appended so far (Scheduler.update -> Request.append_token).
        token_mask = self.bitmasks.fill([r.grammar for r in requests])
        batch = SamplingBatch.build(
            [r.sampling_params for r in requests], [r.generator for r in requests],
            [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests],
            self._eos_ids(requests), logits.shape[-1], self.device, token_mask)
        result = self.sampler(logits, batch)
        return ModelRunnerOutput(self._to_tokens(requests, result))

    @torch.inference_mode()
    def all_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits for every scheduled token (prompt scoring and parity checks), writing the KV
        cache as a normal step would. Rows follow ``out.scheduled`` when it holds no decodes."""
        order = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        input_ids, positions, meta, _ = self._prepare(order)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)  # type: ignore[operator]  # [T, vocab]

    @staticmethod
    def _eos_ids(requests: list[Request]) -> list[int]:
        """Every id that would end one of these sequences (min_tokens must block them all)."""
        ids: set[int] = set()
        for r in requests:
            ids.update(r.eos_token_ids)
        return sorted(ids)

    def _prepare(self, order: list[ScheduledRequest]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        for s in order:
            req = s.request
            start, n = s.start, s.num_new_tokens
            blocks = s.block_ids
            row = len(ids)
            ids.extend(req.token_ids(start, start + n))
            pos.extend(range(start, start + n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx = start + n
            if n == 1:
                decode_tables.append(blocks[:-(-ctx // bs)])
                decode_lens.append(ctx)
            else:
                prefills.append(self._prefill_seq(row, start, n, blocks))
            if s.samples:
                sample_rows.append(row + n - 1)
        dev = self.device
        table = mask = lens = None
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                 dtype=torch.long, device=dev)
            lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            if self.kernels is None:
                mask = (torch.arange(width * bs, device=dev)[None, :]
                        < lens[:, None])[:, None, None, :]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decode_tables), decode_block_table=table, decode_mask=mask,
            prefills=tuple(prefills), decode_context_lens=lens,
            max_context_len=max(s.start + s.num_new_tokens for s in order) if order else 0)
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(pos, dtype=torch.long, device=dev), meta,
                torch.tensor(sample_rows, dtype=torch.long, device=dev))

    def _prefill_seq(self, row: int, start: int, n: int, blocks: list[int]) -> PrefillSeq:
        if start == 0:
            return PrefillSeq(row, row + n, 0, None, None)
        ctx = start + n
        dev = self.device
        block_ids = torch.tensor(blocks[:-(-ctx // self.block_size)], dtype=torch.long, device=dev)
        q_pos = torch.arange(start, ctx, device=dev)
        mask = torch.arange(ctx, device=dev)[None, :] <= q_pos[:, None]  # [n, ctx]
        return PrefillSeq(row, row + n, start, block_ids, mask)

    @staticmethod
    def _to_tokens(requests: list[Request], result: SamplerOutput) -> dict[str, SampledToken]:
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        out: dict[str, SampledToken] = {}
        for i, req in enumerate(requests):
            lp = None
            k = req.sampling_params.logprobs
            if k is not None and logprobs is not None:
                top = {}
                if k and top_ids is not None and top_lps is not None:
                    top = dict(zip(top_ids[i][:k], top_lps[i][:k]))
                lp = Logprob(token_ids[i], logprobs[i], top)
            out[req.request_id] = SampledToken(token_ids[i], lp)
        return out
