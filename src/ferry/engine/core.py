"""EngineCore.step(): schedule -> execute -> update. No tokenizer, no asyncio."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ferry.batch.outputs import EngineCoreOutput
from ferry.batch.request import Request, RequestStatus
from ferry.config import ArchConfig, EngineConfig
from ferry.engine.kv_cache import KVCacheManager
from ferry.engine.scheduler import Scheduler
from ferry.loader import LoadedModel, load_model
from ferry.runner.model_runner import ModelRunner, WeightSource
from ferry.spec import DraftModel

logger = logging.getLogger(__name__)


class StepError(RuntimeError):
    """The model step failed; the requests it carried were finished (aborted) and freed."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 share of blocks held by requests
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up
    prefix_cache_hits_total: int  # prompt tokens found cached
    spec_decode: SpecDecodeStats | None = None  # None: no speculative decoding


@dataclass(frozen=True)
class SpecDecodeStats:
    """Speculative decoding counters (vLLM's spec_decode_* series)."""

    num_drafts: int  # verifications of at least one proposed token
    num_draft_tokens: int  # proposed tokens verified
    num_accepted_tokens: int  # of those, accepted
    accepted_per_position: tuple[int, ...]  # accepted at proposal position 0, 1, ... k-1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification step: the accepted proposals plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


class EngineCore:
    def __init__(self, config: EngineConfig, arch: ArchConfig, weights: WeightSource) -> None:
        self.config = config
        self.arch = arch
        asked_len = resolve_max_model_len(arch, config.model.max_model_len)  # before the weights
        spec = config.speculative
        # NOTE: the draft's file is read before the pool is sized: its KV shares the budget
        draft = (load_model(spec.model, download_dir=config.model.download_dir)
                 if spec is not None and spec.method == "draft_model" and spec.model else None)
        self.runner = ModelRunner(arch, config.model, config.cache, weights,
                                  demand_tokens=config.scheduler.max_num_seqs * asked_len,
                                  draft_arch=None if draft is None else draft.arch)
        self.max_model_len = fit_max_model_len(asked_len, self.runner.num_blocks,
                                               config.cache.block_size)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching, sliding_window=arch.kv_window)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len,
                                   config.speculative)
        if spec is not None and draft is not None:
            self.runner.attach_draft(self._build_draft(draft, config), spec.num_speculative_tokens,
                                     spec.disable_by_batch_size)
        if spec is not None:
            logger.info("speculative decoding: %s, up to %d proposed tokens per step%s",
                        spec.method, spec.num_speculative_tokens,
                        "" if spec.disable_by_batch_size is None else
                        f", none in steps of {spec.disable_by_batch_size} running requests or more")

    def _build_draft(self, loaded: LoadedModel, config: EngineConfig) -> DraftModel:
        m = config.model
        runner = self.runner
        return DraftModel(loaded, self.arch.vocab_size, dtype=runner.dtype, device=runner.device,
                          kernels=runner.kernels, keep_quantized=m.weight_format == "auto",
                          num_blocks=runner.num_blocks, block_size=config.cache.block_size)

    def step(self) -> list[EngineCoreOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            runner_out = self.runner.execute(out)
        except Exception as exc:  # the batch fails; the engine and other requests go on
            ids = [s.request.request_id for s in out.scheduled]
            for request_id in ids:
                self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
            # NOTE: the step's blocks were hashed when scheduled; their KV may never have been
            # written, so a later prompt must not hit them.
            self.kv.reset_prefix_cache()
            logger.exception("engine step failed; aborted %s", ids)
            raise StepError(ids, exc) from exc
        return self.scheduler.update(out, runner_out)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError when one sequence could never fit the KV pool, even running alone."""
        needed = self.kv.num_blocks_needed(num_prompt_tokens + max_tokens)
        if needed > self.runner.num_blocks:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {needed} "
                f"KV blocks but the pool has {self.runner.num_blocks}; lower max_tokens or raise "
                f"kv_cache_memory")

    def add_request(self, request: Request) -> None:
        self.check_fits(request.num_prompt_tokens, request.max_tokens)
        self.scheduler.add_request(request)

    def finish_request(self, request_id: str, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        self.scheduler.finish_request(request_id, status, stop_reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        prefix = self.kv.prefix_cache_stats
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv.usage, num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.runner.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=prefix.queries, prefix_cache_hits_total=prefix.hits,
            spec_decode=self._spec_stats())

    def _spec_stats(self) -> SpecDecodeStats | None:
        c = self.scheduler.spec_counters
        if c is None:
            return None
        return SpecDecodeStats(c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens,
                               tuple(c.accepted_per_position))


def resolve_max_model_len(arch: ArchConfig, asked: int | None) -> int:
    if asked is None:
        return arch.max_position_embeddings
    if asked > arch.max_position_embeddings:
        raise ValueError(f"max_model_len={asked} exceeds the model's context length "
                         f"{arch.max_position_embeddings}")
    return asked


def fit_max_model_len(max_model_len: int, num_blocks: int, block_size: int) -> int:
    """``max_model_len``, or less with a warning when the KV pool cannot hold one such sequence.

    NOTE: as vLLM does: a pool smaller than one max-length sequence would otherwise refuse every
    request that omits max_tokens (it may run to the end of the context), so the context is cut to
    what the pool holds and the start-up log says so once.
    """
    pool_tokens = num_blocks * block_size
    if max_model_len <= pool_tokens:
        return max_model_len
    logger.warning(
        "the KV cache holds %d tokens (%d blocks of %d), fewer than max_model_len=%d: reducing "
        "max_model_len to %d; raise --kv-cache-memory (or lower --max-model-len) to silence this",
        pool_tokens, num_blocks, block_size, max_model_len, pool_tokens)
    return pool_tokens
