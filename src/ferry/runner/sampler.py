"""Token sampling for one engine step: penalties, greedy/temperature/top-k/top-p/min-p, seeds,
logprobs.

One row of ``logits`` is one sequence sampled this step. The order of operations follows vLLM / HF /
OpenAI:

    raw logits --(grammar token mask: forbidden tokens of constrained rows = -inf)
        |
        +--(log_softmax)--> reported logprobs
        |
        v
    repetition penalty (HF, prompt + output ids) -> frequency/presence (OpenAI, output counts)
        -> min_tokens ban (EOS + stop_token_ids = -inf)
        |
        +-- greedy rows (temperature == 0 or top_k == 1): argmax
        +-- random rows: / temperature -> top-k -> top-p -> min-p -> exponential race

Everything is vectorised over rows and vocabulary; the only Python loop is over seeded rows, which
draw their noise from their own ``torch.Generator`` so that a seed reproduces the same tokens
whatever else shares the batch.

Logprobs of a constrained row are those of the masked distribution (as vLLM v1 reports them: the
grammar's bitmask is applied before its raw logprobs): forbidden tokens get -inf, and the allowed
ones share the whole probability mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from ferry.sampling_params import SamplingParams
from ferry.structured import TokenMask

# NOTE: rows with top_k <= this take torch.topk and apply top-p to those k values only; others sort
# the whole vocabulary. The choice depends on the row's own parameters only, never on its
# neighbours, so a seeded row takes the same arithmetic (and tokens) whatever batch it is in.
_SMALL_TOP_K = 256


@dataclass(frozen=True)
class TruncationGroup:
    """Random rows that share one top-k/top-p kernel; parameters are indexed like ``rows``."""

    rows: torch.Tensor  # [G] int64, positions among the random rows
    top_k: torch.Tensor | None  # [G] int64, vocab_size where disabled; None: no row uses top-k
    top_p: torch.Tensor | None  # [G] float32, +inf where disabled; None: no row uses top-p
    max_k: int  # largest enabled top_k in the group, 0 when none
    covers_all: bool  # the group is every random row: no gather/scatter needed


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling state for one step, tensors on the logits' device.

    B = rows in the batch, R = rows that sample randomly (not greedy), V = vocabulary size. The
    per-random-row tensors (``temperature``, ``min_p``) are indexed by position in
    ``random_rows``, so the sampling path never gathers parameters at call time.
    """

    vocab_size: int
    num_rows: int
    greedy_rows: torch.Tensor  # [B - R] int64
    random_rows: torch.Tensor  # [R] int64
    temperature: torch.Tensor  # [R] float32, > 0
    min_p: torch.Tensor  # [R] float32, 0.0 where disabled
    # (position in random_rows, generator) for seeded random rows.
    seeded: tuple[tuple[int, torch.Generator], ...]
    num_unseeded: int  # random rows drawing from the device's default generator
    small_k_group: TruncationGroup | None  # rows with 0 < top_k <= _SMALL_TOP_K (top-p optional)
    sort_group: TruncationGroup | None  # other rows with top_k or top_p enabled
    need_min_p: bool
    # Penalties; None when no row uses them.
    repetition_penalty: torch.Tensor | None  # [B, 1] float32
    seen_mask: torch.Tensor | None  # [B, V] bool: token occurs in prompt or output
    frequency_penalty: torch.Tensor | None  # [B, 1] float32
    presence_penalty: torch.Tensor | None  # [B, 1] float32
    output_counts: torch.Tensor | None  # [B, V] float32: occurrences in the output so far
    # min_tokens: (row, token id) pairs whose logit is set to -inf; None when no row is banned.
    banned_rows: torch.Tensor | None  # [N] int64
    banned_token_ids: torch.Tensor | None  # [N] int64
    max_num_logprobs: int | None  # None: no row asked for logprobs
    token_mask: TokenMask | None = None  # constrained rows' allowed tokens; None: no such row

    @property
    def all_greedy(self) -> bool:
        return self.random_rows.numel() == 0

    @property
    def all_random(self) -> bool:
        return self.greedy_rows.numel() == 0

    @property
    def needs_logit_processing(self) -> bool:
        return (self.repetition_penalty is not None or self.frequency_penalty is not None
                or self.banned_rows is not None)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              prompt_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[Sequence[int]],
              eos_token_ids: Sequence[int], vocab_size: int, device: torch.device,
              token_mask: TokenMask | None = None) -> SamplingBatch:
        """Row i = one sequence; ``generators[i]`` is its seeded generator or None;
        ``token_mask``: the grammar masks of the constrained rows."""
        num_rows = len(params)
        for name, seq in (("generators", generators), ("prompt_token_ids", prompt_token_ids),
                          ("output_token_ids", output_token_ids)):
            if len(seq) != num_rows:
                raise ValueError(f"{name} has {len(seq)} rows, params has {num_rows}")
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        device = torch.device(device)

        greedy = [p.greedy for p in params]
        random_idx = [i for i, g in enumerate(greedy) if not g]
        greedy_idx = [i for i, g in enumerate(greedy) if g]
        rand_params = [params[i] for i in random_idx]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in rand_params]
        top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in rand_params]
        small_pos = [j for j, k in enumerate(top_k) if k <= _SMALL_TOP_K and k < vocab_size]
        small_set = set(small_pos)
        sort_pos = [j for j, (k, tp) in enumerate(zip(top_k, top_p))
                    if j not in small_set and (k < vocab_size or tp < 1.0)]
        seeded: list[tuple[int, torch.Generator]] = []
        for pos, i in enumerate(random_idx):
            gen = generators[i]
            if gen is None:
                continue
            if gen.device.type != device.type:
                raise ValueError(f"generators[{i}] is on {gen.device}, logits are on {device}")
            seeded.append((pos, gen))

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        pen_rows = [i for i, p in enumerate(params)
                    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        rep_penalty = seen_mask = freq_penalty = pres_penalty = counts = None
        if rep_rows:
            rep_penalty = f32([p.repetition_penalty for p in params]).unsqueeze(1)
            seen_mask = _token_counts(
                [list(prompt_token_ids[i]) + list(output_token_ids[i]) for i in rep_rows],
                rep_rows, num_rows, vocab_size, device) > 0
        if pen_rows:
            freq_penalty = f32([p.frequency_penalty for p in params]).unsqueeze(1)
            pres_penalty = f32([p.presence_penalty for p in params]).unsqueeze(1)
            counts = _token_counts([output_token_ids[i] for i in pen_rows], pen_rows, num_rows,
                                   vocab_size, device)

        banned_rows: list[int] = []
        banned_ids: list[int] = []
        done_rows = token_mask.done_rows if token_mask is not None else frozenset()
        for i, p in enumerate(params):
            # NOTE: a complete constraint allows only EOS: the grammar wins over min_tokens.
            if len(output_token_ids[i]) >= p.min_tokens or i in done_rows:
                continue
            # NOTE: with ignore_eos, EOS is not a stop token for this request (as in vLLM), so
            # min_tokens only bans its own stop_token_ids. Ids past the vocabulary can never be
            # sampled.
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            ids = sorted(t for t in stops if 0 <= t < vocab_size)
            banned_rows.extend([i] * len(ids))
            banned_ids.extend(ids)

        def group(pos: list[int]) -> TruncationGroup | None:
            if not pos:
                return None
            ks = [top_k[j] for j in pos]
            ps = [top_p[j] for j in pos]
            enabled = [k for k in ks if k < vocab_size]
            return TruncationGroup(
                rows=i64(pos), top_k=i64(ks) if enabled else None,
                top_p=f32(ps) if any(tp < 1.0 for tp in ps) else None,
                max_k=max(enabled, default=0), covers_all=len(pos) == len(random_idx))

        requested = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            vocab_size=vocab_size,
            num_rows=num_rows,
            greedy_rows=i64(greedy_idx),
            random_rows=i64(random_idx),
            temperature=f32([p.temperature for p in rand_params]),
            min_p=f32([p.min_p for p in rand_params]),
            seeded=tuple(seeded),
            num_unseeded=len(random_idx) - len(seeded),
            small_k_group=group(small_pos),
            sort_group=group(sort_pos),
            need_min_p=any(p.min_p > 0.0 for p in rand_params),
            repetition_penalty=rep_penalty,
            seen_mask=seen_mask,
            frequency_penalty=freq_penalty,
            presence_penalty=pres_penalty,
            output_counts=counts,
            banned_rows=i64(banned_rows) if banned_rows else None,
            banned_token_ids=i64(banned_ids) if banned_ids else None,
            max_num_logprobs=max(requested) if requested else None,
            token_mask=token_mask,
        )


def _token_counts(token_ids: Sequence[Sequence[int]], rows: Sequence[int], num_rows: int,
                  vocab_size: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token per row; rows not listed stay zero. -> [num_rows, V] float32."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64)
    # NOTE: checked on the CPU copy, so a bad id is a clear error instead of a device-side assert.
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {int(flat.min())}.."
                         f"{int(flat.max())}")
    row_ids = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.int64), lengths)
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
    counts.index_put_((row_ids.to(device), flat.to(device)),
                      torch.ones((), dtype=torch.float32, device=device), accumulate=True)
    return counts


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, the sampled tokens
    # [B] float32: log-prob of the sampled token under log_softmax(raw logits, grammar-masked for
    # constrained rows); None when no row asked for logprobs.
    logprobs: torch.Tensor | None
    # [B, K] int64 / float32, best first, K = max params.logprobs over rows; None when K == 0 or no
    # row asked. Rows that asked for fewer use their first k.
    top_token_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency/presence penalties and the min_tokens ban, on a copy of ``logits``.

    logits: [B, V] float32 -> [B, V] float32 (the input is left untouched).
    """
    out = logits.clone()
    if batch.repetition_penalty is not None and batch.seen_mask is not None:
        # HF: a seen token's positive logit is divided by the penalty, a negative one multiplied.
        penalty = torch.where(batch.seen_mask, batch.repetition_penalty, 1.0)  # [B, V]
        out = torch.where(out > 0, out / penalty, out * penalty)
    if batch.output_counts is not None and batch.frequency_penalty is not None \
            and batch.presence_penalty is not None:
        # OpenAI: logit -= frequency * count + presence * (count > 0), over generated tokens only.
        out -= batch.frequency_penalty * batch.output_counts
        out -= batch.presence_penalty * (batch.output_counts > 0).to(out.dtype)
    if batch.banned_rows is not None and batch.banned_token_ids is not None:
        out[batch.banned_rows, batch.banned_token_ids] = float("-inf")
    return out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus with -inf by sorting the whole vocabulary.

    logits: [G, V]; top_k: [G] int64 (>= V: disabled) or None; top_p: [G] float32 (>= 1: disabled)
    or None. Tokens tied with the k-th largest logit are kept (as in vLLM); one token always
    survives.
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # ascending: [G, V]
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(0, vocab - 1).unsqueeze(1))  # [G, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [G, V]
        # A token is dropped when the tokens strictly more likely than it already reach top_p.
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always survives
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_small_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None,
                            max_k: int) -> torch.Tensor:
    """Same masking via torch.topk(max_k), for rows whose top_k is small: top-p only sees k values.

    logits: [G, V]; top_k: [G] int64 in [1, max_k]; top_p: [G] float32 (+inf: disabled) or None.
    Exactly k tokens survive top-k (ties broken by torch.topk).
    """
    values, indices = logits.topk(max_k, dim=-1)  # [G, K], descending
    rank = torch.arange(max_k, device=logits.device).unsqueeze(0)  # [1, K]
    values.masked_fill_(rank >= top_k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = values.softmax(dim=-1)  # [G, K]
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        values.masked_fill_(before >= top_p.unsqueeze(1), float("-inf"))  # rank 0 has before == 0
    return torch.full_like(logits, float("-inf")).scatter_(1, indices, values)


def _truncate(logits: torch.Tensor, group: TruncationGroup | None, small_k: bool) -> torch.Tensor:
    # logits: [R, V], a tensor the sampler owns -> [R, V]
    if group is None:
        return logits
    rows = logits if group.covers_all else logits[group.rows]  # [G, V]
    if small_k and group.top_k is not None:
        rows = apply_small_top_k_top_p(rows, group.top_k, group.top_p, group.max_k)
    else:
        rows = apply_top_k_top_p(rows, group.top_k, group.top_p)
    if group.covers_all:
        return rows
    logits[group.rows] = rows
    return logits


class Sampler:
    """Samples one token per row; stateless, all per-request state lives in ``SamplingBatch``."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [B, V] float32 (or half, upcast) -> token_ids [B]
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows \
                or logits.shape[1] != batch.vocab_size:
            raise ValueError(f"logits must be [{batch.num_rows}, {batch.vocab_size}], "
                             f"got {list(logits.shape)}")
        # NOTE: a half-precision lm_head still gets float32 sampling and logprobs; no-op for float32.
        logits = logits.float()
        if batch.token_mask is not None:
            logits = batch.token_mask.apply(logits)  # a copy; unconstrained rows are unchanged
        raw = logits
        if batch.needs_logit_processing:
            logits = apply_penalties(logits, batch)
        if batch.all_greedy:
            # NOTE: the common benchmark case ends here: one argmax, no copies without penalties.
            token_ids = logits.argmax(dim=-1)
        elif batch.all_random:
            token_ids = self._sample(logits, batch)
        else:
            token_ids = torch.empty(batch.num_rows, dtype=torch.int64, device=logits.device)
            token_ids[batch.greedy_rows] = logits[batch.greedy_rows].argmax(dim=-1)
            token_ids[batch.random_rows] = self._sample(logits[batch.random_rows], batch)
        return self._with_logprobs(raw, token_ids, batch.max_num_logprobs)

    @staticmethod
    def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # logits: [R, V] penalised logits of the random rows -> [R] int64
        logits = logits / batch.temperature.unsqueeze(1)
        logits = _truncate(logits, batch.small_k_group, small_k=True)
        logits = _truncate(logits, batch.sort_group, small_k=False)
        probs = logits.softmax(dim=-1)  # [R, V]
        if batch.need_min_p:
            threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)  # [R, 1]
            probs.masked_fill_(probs < threshold, 0.0)
        # Exponential race: argmax(p / E), E ~ Exp(1), picks token i with probability p_i / sum(p),
        # so the masked probabilities need no renormalisation.
        noise = torch.empty_like(probs)
        if batch.num_unseeded:
            noise.exponential_()
        for pos, gen in batch.seeded:
            noise[pos].exponential_(generator=gen)
        # NOTE: exponential_ may return exactly 0; 0/0 would be NaN and argmax prefers NaN.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    @staticmethod
    def _with_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor,
                       max_num_logprobs: int | None) -> SamplerOutput:
        # raw_logits: [B, V]; token_ids: [B]
        if max_num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        logprobs = raw_logits.log_softmax(dim=-1)  # [B, V], before any penalty or temperature
        sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
        num_top = min(max_num_logprobs, logprobs.shape[-1])
        if num_top == 0:
            return SamplerOutput(token_ids, sampled, None, None)
        top = logprobs.topk(num_top, dim=-1)  # sorted, best first
        return SamplerOutput(token_ids, sampled, top.indices, top.values)


__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "TruncationGroup", "apply_penalties",
           "apply_small_top_k_top_p", "apply_top_k_top_p"]
