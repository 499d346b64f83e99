"""The grammar mask inside ferry's batched sampler: constrained rows sample allowed tokens only,
free rows are untouched, logprobs are those of the masked distribution, and min_tokens never bans
the EOS a complete grammar requires."""

from __future__ import annotations

import torch

from ferry.runner.sampler import Sampler, SamplingBatch
from ferry.sampling_params import SamplingParams
from ferry.structured import TokenMask

V = 70  # three bitmask words, the last one partly used


def mask_of(rows: list[int], allowed: list[list[int]], done: frozenset[int] = frozenset()) -> TokenMask:
    bitmask = torch.zeros(len(rows), 3, dtype=torch.int32)
    for k, tokens in enumerate(allowed):
        for t in tokens:
            word = int(bitmask[k, t // 32]) | (1 << (t % 32))
            bitmask[k, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return TokenMask(torch.tensor(rows), bitmask, done)


def build(params: list[SamplingParams], mask: TokenMask | None,
          outputs: list[list[int]] | None = None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, [None] * n, [[5]] * n, outputs or [[]] * n, [2], V,
                               torch.device("cpu"), mask)


def test_constrained_rows_sample_allowed_tokens_and_free_rows_are_unchanged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    greedy = SamplingParams(temperature=0, logprobs=3)
    hot = SamplingParams(temperature=1.5, logprobs=3)
    params = [greedy, greedy, hot, hot]
    mask = mask_of([1, 3], [[7, 40, 66], [31, 63]])
    free = Sampler()(logits, build(params, None))
    out = Sampler()(logits, build(params, mask))
    assert out.token_ids[0] == free.token_ids[0] == logits[0].argmax()
    assert out.logprobs is not None and free.logprobs is not None
    assert out.top_logprobs is not None and free.top_logprobs is not None
    assert torch.equal(out.logprobs[0], free.logprobs[0])
    assert torch.equal(out.top_logprobs[0], free.top_logprobs[0])
    assert int(out.token_ids[1]) == max((7, 40, 66), key=lambda t: float(logits[1, t]))
    for _ in range(20):
        assert int(Sampler()(logits, build(params, mask)).token_ids[3]) in (31, 63)
    # the masked distribution: the allowed tokens share all the mass
    row = logits[1, [7, 40, 66]].log_softmax(-1)
    assert torch.allclose(out.logprobs[1], row.max())
    assert out.top_token_ids is not None
    assert sorted(out.top_token_ids[1].tolist()) == [7, 40, 66]
    assert torch.allclose(out.top_logprobs[1].exp().sum(), torch.tensor(1.0))


def test_min_tokens_yields_to_a_complete_grammar() -> None:
    logits = torch.zeros(2, V)
    logits[:, 9] = 5.0
    params = [SamplingParams(temperature=0, min_tokens=5)] * 2
    # row 0: grammar allows 9 or EOS (not done): min_tokens bans EOS, 9 wins anyway
    # row 1: grammar complete, only EOS allowed: min_tokens must not ban it
    mask = mask_of([0, 1], [[9, 2], [2]], done=frozenset({1}))
    batch = build(params, mask, outputs=[[9], [9]])
    assert batch.banned_rows is not None and batch.banned_rows.tolist() == [0]
    assert Sampler()(logits, batch).token_ids.tolist() == [9, 2]
