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
from ferry.kernels.build import KernelUnavailableError, cpu_flags, load_cpu_kernels
from ferry.model.kv_tensors import kv_tensors
from ferry.model.layers.attention import AttentionMetadata, PrefillSeq
from ferry.model.layers.linear import PackedWeight
from ferry.model.llama import KVCache, Weight
from ferry.model.registry import build_model
from ferry.outputs import Logprob
from ferry.runner.memory import available_cpu_memory, num_kv_blocks
from ferry.runner.sampler import Sampler, SamplerOutput, SamplingBatch
from ferry.spec import DraftModel, speculates
from ferry.structured import BitmaskFiller

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# NOTE: below this many rows the float32 kernel reads the packed weight once and wins; above it,
# dequantizing the weight for a bfloat16 GEMM costs less than float32 FMAs over every row. Measured
# on SmolLM2 (2-core Sapphire Rapids): at 32 rows a c=32 decode ran at 0.66x float32's tok/s; with
# 64 prompts offline, 1.25x.
BF16_MATMUL_ROWS = 64
# NOTE: with each weight's bfloat16 copy kept beside its blocks (2 bytes a weight), a bfloat16 GEMM
# is the product alone: on one Sapphire Rapids core, SmolLM2's seven matmuls of a layer took
# 762 us in bfloat16 against 956 us for the float32 kernel at 16 rows (942 / 1899 us at 32, but
# 714 / 526 us at 8), so kept copies pay from 16 rows.
BF16_KEPT_ROWS = 16
# the bfloat16 copies are kept when they take at most this share of the available memory
BF16_KEEP_SHARE = 0.25
BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}

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
                 weights: WeightSource, demand_tokens: int | None = None,
                 draft_arch: ArchConfig | None = None) -> None:
        """``demand_tokens``: max_num_seqs x max_model_len, which bounds the default KV pool;
        ``draft_arch``: the draft model that will be attached (its KV shares the pool's budget)."""
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
        if model_config.matmul_dtype == "bfloat16":
            self._use_bf16_matmuls(model)
        model.init_buffers(self.device)  # type: ignore[operator]  # rotary tables stay float32
        self.model = model.eval()
        # NOTE: on CPU the packed GGUF blocks count as packed; on a GPU the allocator is asked
        self.num_blocks = num_kv_blocks(
            arch, cache_config, self.dtype, self.device,
            weight_bytes=None if self.device.type == "cuda" else self.weight_bytes,
            demand_tokens=demand_tokens, draft=draft_arch)
        shape = (self.num_blocks, self.block_size, arch.num_key_value_heads, arch.head_dim)
        # NOTE: zeros, not empty: padded attention reads stale slots under a mask, and a NaN there
        # would survive a zero attention weight. On CPU the zeros are committed page by page.
        self.kv_caches: list[KVCache] = kv_tensors(arch.num_hidden_layers, shape, self.dtype,
                                                   self.device)
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
            # PyTorch's matmuls; without AVX2 the dense path is the fast one.
            logger.warning("ferry's CPU kernels need AVX2 + FMA or AVX-512, which this CPU lacks; "
                           "GGUF weights are dequantized to float32 and attention runs on PyTorch ops")
            return None
        logger.info("ferry's CPU kernels: %s", kernels.isa())
        return kernels

    def _use_bf16_matmuls(self, model: torch.nn.Module) -> None:
        """Steps of ``BF16_MATMUL_ROWS`` rows or more multiply in bfloat16 over the packed weights
        (dequantized for the call), where the CPU has bfloat16 matrix units; the rest stays float32."""
        packed = [m for m in model.modules() if isinstance(m, PackedWeight)]
        if self.kernels is None or not packed:
            logger.warning("--dtype bfloat16 over packed weights needs ferry's CPU kernels and GGUF "
                           "quantized weights; running float32")
            return
        if not BF16_CPU_FLAGS & cpu_flags():
            logger.warning("this CPU has no bfloat16 matrix units (AMX-BF16 or AVX512-BF16); "
                           "running float32")
            return
        copies = sum(2 * w.out_features * w.in_features for w in packed)
        keep = copies <= BF16_KEEP_SHARE * available_cpu_memory()
        rows = BF16_KEPT_ROWS if keep else BF16_MATMUL_ROWS
        for weight in packed:
            if keep:
                weight.keep_bf16()
            weight.bf16_rows = rows
        how = (f"bfloat16 copies of the weights kept ({copies / 2**20:.0f} MiB)" if keep else
               f"weights dequantized per call (their {copies / 2**20:.0f} MiB of bfloat16 copies "
               f"exceed {BF16_KEEP_SHARE:.0%} of available memory)")
        logger.info("bfloat16 matmuls for steps of %d rows or more, %s; smaller steps, attention "
                    "and the KV cache stay float32", rows, how)

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

    # draft_model speculation: set by ``attach_draft`` (None: no draft)
    draft: DraftModel | None = None
    num_speculative_tokens: int = 0
    draft_disable_by_batch_size: int | None = None

    def attach_draft(self, draft: DraftModel, num_speculative_tokens: int,
                     disable_by_batch_size: int | None = None) -> None:
        """Run ``draft`` beside the model: it mirrors every step's batch into its own KV (same
        block ids) and proposes ``num_speculative_tokens`` tokens after each sampled request,
        unless the step ran ``disable_by_batch_size`` requests or more (the scheduler would not
        verify them)."""
        self.draft = draft
        self.num_speculative_tokens = num_speculative_tokens
        self.draft_disable_by_batch_size = disable_by_batch_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        order = sorted(out.scheduled, key=lambda s: not _decodes(s))  # decodes first
        input_ids, positions, meta, sample_rows = self._prepare(order)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if self.draft is not None:
            # NOTE: the draft's KV mirrors the target's at every position computed this step
            # (prompts, prefix-cache blocks, recomputation after preemption), so its proposals
            # see the same context; rejected positions are rewritten later in both.
            self.draft.forward(input_ids, positions, meta)
        sampling = [s for s in order if s.samples]
        if not sampling:
            return ModelRunnerOutput({})
        logits = self.model.compute_logits(hidden[sample_rows])  # type: ignore[operator]
        # One row per sampling request, plus one per proposed token: row j of a request with
        # proposals x_1..x_m is sampled as if x_1..x_j had been generated (min_tokens, penalties
        # and logprobs see that output), which is what sequential decoding would have sampled.
        requests: list[Request] = []
        outputs: list[list[int]] = []
        for s in sampling:
            r = s.request
            requests.append(r)
            outputs.append(r.output_token_ids)
            for j in range(1, len(s.spec_token_ids) + 1):
                requests.append(r)
                outputs.append(r.output_token_ids + list(s.spec_token_ids[:j]))
        # NOTE: ~10 us per constrained row, in llguidance's threads without the GIL; the matchers
        # already took every token appended so far (Scheduler.update -> Request.append_token).
        # Constrained requests never speculate (ferry.spec.policy), so they have one row each.
        token_mask = self.bitmasks.fill([r.grammar for r in requests])
        batch = SamplingBatch.build(
            [r.sampling_params for r in requests], [r.generator for r in requests],
            [r.prompt_token_ids for r in requests], outputs,
            self._eos_ids(requests), logits.shape[-1], self.device, token_mask)
        result = self.sampler(logits, batch)
        sampled = self._verify(sampling, self._to_tokens(requests, result))
        limit = self.draft_disable_by_batch_size
        # NOTE: skipping the proposals leaves the draft's KV whole: it mirrors every step's
        # inputs above, so the tokens sampled now enter it with the next step.
        proposing = self.draft is not None and (limit is None or len(order) < limit)
        drafts = self._propose(sampling, sampled) if proposing else {}
        return ModelRunnerOutput(sampled, drafts)

    @staticmethod
    def _verify(sampling: list[ScheduledRequest], rows: list[SampledToken]
                ) -> dict[str, list[SampledToken]]:
        """Each request's tokens: its proposals up to the first one its own row did not sample,
        then the token sampled at that row (or after the last proposal).

        NOTE: this is speculative decoding's rejection sampling for proposers that put all their
        mass on one token (q = one-hot: n-gram lookup, and the draft model, which proposes its
        argmax): accepting x with probability min(1, p(x) / q(x)) = p(x) and otherwise sampling
        from normalize(max(p - q, 0)) is the same law as sampling y ~ p and accepting x iff y == x
        (else emitting y). Each row samples from its own p with the request's generator, so greedy
        rows accept exactly while the argmax equals the proposal, and the output's distribution is
        the target's own, token for token.
        """
        out: dict[str, list[SampledToken]] = {}
        i = 0
        for s in sampling:
            spec = s.spec_token_ids
            accepted = 0
            while accepted < len(spec) and rows[i + accepted].token_id == spec[accepted]:
                accepted += 1
            out[s.request.request_id] = rows[i:i + accepted + 1]
            i += len(spec) + 1
        return out

    def _propose(self, sampling: list[ScheduledRequest], sampled: dict[str, list[SampledToken]]
                 ) -> dict[str, list[int]]:
        """The draft's k greedy proposals after each sampled request's new last token: k
        one-token forwards of the draft, batched over the requests.

        The new last token sits where the step's last accepted token ended; it and the draft's
        guesses are fed at the following positions, into the slots the scheduler reserved ahead
        (``Scheduler._lookahead``): a request proposes only as many as its block table holds.
        """
        assert self.draft is not None
        bs = self.block_size
        # [request id, next position, block table, proposals wanted, token to feed]
        rows: list[tuple[str, int, list[int], int]] = []
        feed: list[int] = []
        for s in sampling:
            if not speculates(s.request):
                continue
            tokens = sampled[s.request.request_id]
            pos = s.start + s.num_new_tokens - len(s.spec_token_ids) + len(tokens) - 1
            n = min(self.num_speculative_tokens, len(s.block_ids) * bs - pos)
            if n > 0:
                rows.append((s.request.request_id, pos, s.block_ids, n))
                feed.append(tokens[-1].token_id)
        proposals: dict[str, list[int]] = {rid: [] for rid, *_ in rows}
        for step in range(self.num_speculative_tokens):
            active = [i for i, r in enumerate(rows) if r[3] > step]
            if not active:
                break
            positions = [rows[i][1] + step for i in active]
            meta = self._decode_meta(positions, [rows[i][2] for i in active])
            dev = self.device
            hidden = self.draft.forward(
                torch.tensor([feed[i] for i in active], dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta)
            for i, token in zip(active, self.draft.greedy(hidden).tolist()):
                proposals[rows[i][0]].append(token)
                feed[i] = token
        return proposals

    def _decode_meta(self, positions: list[int], tables: list[list[int]]) -> AttentionMetadata:
        """Metadata of a batch of one-token rows: row i at ``positions[i]`` over ``tables[i]``."""
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs for p, t in zip(positions, tables)]
        lens = [p + 1 for p in positions]
        table, lens_t, mask = self._decode_tables([t[:-(-n // bs)] for t, n in zip(tables, lens)],
                                                  lens)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decodes=len(positions), decode_block_table=table, decode_mask=mask, prefills=(),
            decode_context_lens=lens_t, max_context_len=max(lens))

    @torch.inference_mode()
    def all_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits for every scheduled token (prompt scoring and parity checks), writing the KV
        cache as a normal step would. Rows follow ``out.scheduled`` when it holds no decodes."""
        order = sorted(out.scheduled, key=lambda s: not _decodes(s))
        input_ids, positions, meta, _ = self._prepare(order)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if self.draft is not None:
            self.draft.forward(input_ids, positions, meta)
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
            spec = s.spec_token_ids
            blocks = s.block_ids
            row = len(ids)
            ids.extend(req.token_ids(start, start + n - len(spec)))
            ids.extend(spec)
            pos.extend(range(start, start + n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx = start + n
            if _decodes(s):
                # NOTE: a decode with proposals is one decode row per position, each over its own
                # context length: the step writes every row's K/V before any row attends, so row
                # j sees the proposals before it, as sequential decoding would have.
                table = blocks[:-(-ctx // bs)]
                for p in range(start, ctx):
                    decode_tables.append(table)
                    decode_lens.append(p + 1)
            else:
                prefills.append(self._prefill_seq(row, start, n, blocks))
            if s.samples:
                sample_rows.extend(range(row + n - 1 - len(spec), row + n))
        dev = self.device
        table_t, lens, mask = self._decode_tables(decode_tables, decode_lens)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decode_tables), decode_block_table=table_t, decode_mask=mask,
            prefills=tuple(prefills), decode_context_lens=lens,
            max_context_len=max(s.start + s.num_new_tokens for s in order) if order else 0)
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(pos, dtype=torch.long, device=dev), meta,
                torch.tensor(sample_rows, dtype=torch.long, device=dev))

    def _decode_tables(self, tables: list[list[int]], lens: list[int]
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Padded block tables [B, W], context lengths [B] and (SDPA path) the mask of the
        decode rows; Nones when there are none."""
        if not tables:
            return None, None, None
        dev = self.device
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long,
                             device=dev)
        lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
        mask = None
        if self.kernels is None:
            mask = (torch.arange(width * self.block_size, device=dev)[None, :]
                    < lens_t[:, None])[:, None, None, :]
        return table, lens_t, mask

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
    def _to_tokens(requests: list[Request], result: SamplerOutput) -> list[SampledToken]:
        """Row i's token (and logprobs when its request asked) for ``requests[i]``."""
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        out: list[SampledToken] = []
        for i, req in enumerate(requests):
            lp = None
            k = req.sampling_params.logprobs
            if k is not None and logprobs is not None:
                top = {}
                if k and top_ids is not None and top_lps is not None:
                    top = dict(zip(top_ids[i][:k], top_lps[i][:k]))
                lp = Logprob(token_ids[i], logprobs[i], top)
            out.append(SampledToken(token_ids[i], lp))
        return out


def _decodes(s: ScheduledRequest) -> bool:
    """One-token rows: a decode, or a decode with proposals to verify (one row per position)."""
    return s.num_new_tokens == 1 or bool(s.spec_token_ids)
