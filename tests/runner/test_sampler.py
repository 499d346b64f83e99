"""Sampler on real tensors: greedy, top-k/top-p/min-p, seeds, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from ferry.runner.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_small_top_k_top_p,
    apply_top_k_top_p,
)
from ferry.sampling_params import SamplingParams

CPU = torch.device("cpu")


def build(params: Sequence[SamplingParams], vocab: int, *,
          generators: Sequence[torch.Generator | None] | None = None,
          prompts: Sequence[Sequence[int]] | None = None,
          outputs: Sequence[Sequence[int]] | None = None,
          eos: Sequence[int] = ()) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params, generators if generators is not None else [None] * n,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        eos, vocab, CPU)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=seeded(seed)) * 3


def repeat_row(row: list[float], rows: int) -> torch.Tensor:
    return torch.tensor([row], dtype=torch.float32).repeat(rows, 1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- greedy ---------------------------------------------------------------------------------------

def test_greedy_equals_argmax_and_leaves_logits_untouched() -> None:
    logits = random_logits(7, 100)
    before = logits.clone()
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 7, 100))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    assert torch.equal(logits, before)


def test_top_k_1_is_greedy_even_at_temperature_1() -> None:
    logits = random_logits(64, 50, seed=1) * 0.1  # flat: real sampling would often miss the argmax
    torch.manual_seed(0)
    out = Sampler()(logits, build([SamplingParams(temperature=1.0, top_k=1)] * 64, 50))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_low_temperature_behaves_like_greedy_and_high_temperature_does_not() -> None:
    logits = random_logits(200, 40, seed=2)
    torch.manual_seed(0)
    cold = Sampler()(logits, build([SamplingParams(temperature=1e-4)] * 200, 40))
    assert torch.equal(cold.token_ids, logits.argmax(dim=-1))
    hot = Sampler()(logits, build([SamplingParams(temperature=5.0)] * 200, 40))
    assert (hot.token_ids != logits.argmax(dim=-1)).sum() > 100


# --- truncation: top-k, top-p, min-p --------------------------------------------------------------

@pytest.mark.parametrize("top_k", [5, 300])  # 5: torch.topk path; 300: full-sort path
def test_top_k_restricts_support_to_the_k_largest(top_k: int) -> None:
    vocab, rows = 1000, 400
    row = random_logits(1, vocab, seed=3)[0] * 0.05  # nearly flat, so the cut matters
    logits = row.repeat(rows, 1)
    allowed = set(row.topk(top_k).indices.tolist())
    gens = [seeded(100 + i) for i in range(rows // 2)] + [None] * (rows // 2)
    torch.manual_seed(0)
    out = Sampler()(logits, build([SamplingParams(top_k=top_k)] * rows, vocab, generators=gens))
    drawn = set(out.token_ids.tolist())
    assert drawn <= allowed
    assert len(drawn) >= min(top_k, 100)  # it really samples, not just argmax


def test_top_k_disabled_rows_are_not_cut_by_other_rows() -> None:
    vocab, rows = 200, 300
    row = torch.zeros(vocab)
    logits = row.repeat(rows, 1) + torch.arange(vocab) * 1e-4  # distinct, near-uniform
    params = [SamplingParams(top_k=3), SamplingParams(top_k=-1)] * (rows // 2)
    torch.manual_seed(0)
    out = Sampler()(logits, build(params, vocab))
    top3 = set(range(vocab - 3, vocab))
    assert set(out.token_ids[0::2].tolist()) <= top3
    assert len(set(out.token_ids[1::2].tolist()) - top3) > 50


def test_top_p_keeps_the_nucleus_with_renormalised_frequencies() -> None:
    probs = [0.5, 0.3, 0.1, 0.05, 0.05]
    rows = 4000
    logits = repeat_row([math.log(p) for p in probs], rows)
    torch.manual_seed(0)
    out = Sampler()(logits, build([SamplingParams(top_p=0.75)] * rows, 5))
    counts = torch.bincount(out.token_ids, minlength=5).float()
    assert counts[2:].sum() == 0
    assert chi_square(counts[:2], torch.tensor([0.5, 0.3]) / 0.8) < 15  # 1 dof, p ~ 1e-4


@pytest.mark.parametrize("top_p", [0.05, 1e-9])  # 1e-9: 1 - top_p rounds to 1.0 in float32
def test_top_p_below_the_top_token_keeps_exactly_one(top_p: float) -> None:
    logits = repeat_row([math.log(p) for p in [0.1, 0.6, 0.3]], 200)
    torch.manual_seed(0)
    out = Sampler()(logits, build([SamplingParams(top_p=top_p)] * 200, 3))
    assert out.token_ids.tolist() == [1] * 200


def test_top_k_and_top_p_combine() -> None:
    probs = [0.4, 0.25, 0.2, 0.1, 0.05]
    logits = repeat_row([math.log(p) for p in probs], 2000)
    torch.manual_seed(0)
    # top_k=3 -> {0,1,2} renormalised to 0.47/0.29/0.24; top_p=0.7 then cuts token 2.
    out = Sampler()(logits, build([SamplingParams(top_k=3, top_p=0.7)] * 2000, 5))
    assert set(out.token_ids.tolist()) == {0, 1}


def test_small_k_and_sort_paths_mask_the_same_tokens() -> None:
    logits = random_logits(6, 500, seed=9)
    top_k = torch.tensor([1, 3, 10, 50, 50, 7])
    top_p = torch.tensor([0.5, float("inf"), 0.9, 0.3, float("inf"), 1e-9])
    small = apply_small_top_k_top_p(logits, top_k, top_p, max_k=50)
    full = apply_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(small.isinf(), full.isinf())
    assert torch.equal(small[~small.isinf()], logits[~small.isinf()])
    kept = (~small.isinf()).sum(dim=-1)
    assert kept[1] == 3 and kept[4] == 50 and kept[0] == 1 and kept[5] == 1
    assert 1 < kept[2] < 10  # top-p cut inside the top 10


def test_rows_in_different_truncation_groups_share_a_batch() -> None:
    vocab, rows = 400, 100
    row = random_logits(1, vocab, seed=10)[0] * 0.05
    logits = row.repeat(4 * rows, 1)
    params = [SamplingParams(top_k=3, top_p=0.9), SamplingParams(top_k=350),
              SamplingParams(top_p=0.5), SamplingParams()] * rows
    torch.manual_seed(0)
    tokens = Sampler()(logits, build(params, vocab)).token_ids
    order = row.argsort(descending=True).tolist()
    assert set(tokens[0::4].tolist()) <= set(order[:3])
    assert set(tokens[1::4].tolist()) <= set(order[:350])
    half = torch.softmax(row, -1)[order].cumsum(-1)
    nucleus = order[:int((half < 0.5).sum()) + 1]
    assert set(tokens[2::4].tolist()) <= set(nucleus)
    assert set(tokens[3::4].tolist()) - set(order[:350])  # the untruncated row reaches the tail


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    rows = 4000
    logits = repeat_row([math.log(p) for p in probs], rows)
    torch.manual_seed(0)
    out = Sampler()(logits, build([SamplingParams(min_p=0.3)] * rows, 5))  # threshold 0.12
    counts = torch.bincount(out.token_ids, minlength=5).float()
    assert counts[3:].sum() == 0
    assert chi_square(counts[:3], torch.tensor([0.4, 0.3, 0.15]) / 0.85) < 18  # 2 dof


# --- distribution and seeds -----------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_unseeded_draws_follow_softmax(temperature: float) -> None:
    row = [1.0, 0.5, 0.0, -0.5, 2.0, -1.0]
    rows = 6000
    logits = repeat_row(row, rows)
    torch.manual_seed(1234)
    out = Sampler()(logits, build([SamplingParams(temperature=temperature)] * rows, 6))
    counts = torch.bincount(out.token_ids, minlength=6).float()
    expected = torch.softmax(torch.tensor(row) / temperature, dim=-1)
    assert chi_square(counts, expected) < 25  # 5 dof: p ~ 1e-4


def test_seeded_rows_reproduce_across_batch_compositions_and_orders() -> None:
    vocab, steps = 64, 12
    target = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=7)
    other_seeded = SamplingParams(temperature=1.0, top_p=0.8, seed=8)
    unseeded = SamplingParams(temperature=1.2, top_k=5)
    greedy = SamplingParams(temperature=0.0)
    step_logits = [random_logits(1, vocab, seed=50 + s)[0] * 0.3 for s in range(steps)]
    noise_rows = [random_logits(3, vocab, seed=90 + s) for s in range(steps)]
    sampler = Sampler()

    def run(layout: str) -> list[int]:
        """layout: which rows share the batch with the target ('T'), in order."""
        gens = {"T": seeded(7), "S": seeded(8)}
        kinds = {"T": target, "S": other_seeded, "U": unseeded, "G": greedy}
        tokens = []
        for s in range(steps):
            others = iter(noise_rows[s])
            rows = [step_logits[s] if c == "T" else next(others) for c in layout]
            batch = build([kinds[c] for c in layout], vocab,
                          generators=[gens.get(c) for c in layout])
            out = sampler(torch.stack(rows), batch)
            tokens.append(int(out.token_ids[layout.index("T")]))
        return tokens

    torch.manual_seed(0)
    alone = run("T")
    torch.manual_seed(1)
    assert run("UGTS") == alone
    torch.manual_seed(2)
    assert run("STU") == alone
    assert len(set(alone)) > 3  # really random, not stuck on one token

    def with_seed(seed: int) -> list[int]:
        batch_tokens = []
        gen = seeded(seed)
        for s in range(steps):
            batch = build([SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=seed)], vocab,
                          generators=[gen])
            batch_tokens.append(int(sampler(step_logits[s].unsqueeze(0), batch).token_ids[0]))
        return batch_tokens

    assert with_seed(7) == alone
    assert with_seed(99) != alone


# --- penalties and min_tokens ---------------------------------------------------------------------

def test_penalties_match_hand_computed_logits() -> None:
    row = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]
    logits = repeat_row(row, 5)
    prompt, output = [0, 1], [2, 2, 3]
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=0.25),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    batch = build(params, 6, prompts=[prompt] * 5, outputs=[output] * 5)
    expected = torch.tensor([
        # repetition over prompt+output {0,1,2,3}: positive / 2, negative * 2
        [1.0, -2.0, 0.25, -6.0, 1.0, 0.0],
        # frequency over output counts {2: 2, 3: 1}
        [2.0, -1.0, 0.5 - 1.0, -3.0 - 0.5, 1.0, 0.0],
        # presence over output tokens {2, 3}
        [2.0, -1.0, 0.25, -3.25, 1.0, 0.0],
        # repetition first, then frequency + presence
        [1.0, -2.0, 0.25 - 1.0 - 0.25, -6.0 - 0.5 - 0.25, 1.0, 0.0],
        row,
    ])
    torch.testing.assert_close(apply_penalties(logits, batch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, repeat_row(row, 5), rtol=0, atol=0)


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, frequency_penalty=0.2),
              SamplingParams(temperature=0.0)]
    out = Sampler()(logits, build(params, 4, prompts=[[0]] * 3, outputs=[[0]] * 3))
    assert out.token_ids.tolist() == [1, 1, 0]


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached() -> None:
    eos, stop = 3, 4
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0, 0.5]] * 4)
    ban = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,))
    params = [ban, ban, SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,),
                                       ignore_eos=True), SamplingParams(temperature=0.0)]
    outputs = [[1, 2], [1, 2, 5], [1], [1]]
    batch = build(params, 6, outputs=outputs, eos=[eos])
    out = Sampler()(logits, batch)
    # row 0 under min_tokens -> best non-stop; row 1 reached it; row 2 ignores EOS so only its
    # stop id is banned; row 3 has no min_tokens.
    assert out.token_ids.tolist() == [2, eos, eos, eos]
    penalised = apply_penalties(logits, batch)
    assert penalised[0, eos] == float("-inf") and penalised[0, stop] == float("-inf")
    assert penalised[2, stop] == float("-inf") and penalised[2, eos] == 9.0


def test_min_tokens_ban_holds_while_sampling() -> None:
    rows = 500
    logits = repeat_row([0.0, 0.0, 0.0, 0.5, 0.5], rows)
    params = [SamplingParams(min_tokens=2, stop_token_ids=(4,))] * rows
    torch.manual_seed(0)
    out = Sampler()(logits, build(params, 5, outputs=[[0]] * rows, eos=[3]))
    assert set(out.token_ids.tolist()) == {0, 1, 2}


# --- logprobs -------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_sorted_top_k() -> None:
    vocab = 50
    logits = random_logits(4, vocab, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, logprobs=5),
              SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=1.0, logprobs=0)]
    torch.manual_seed(0)
    out = Sampler()(logits, build(params, vocab, outputs=[[1, 2]] * 4))
    full = torch.log_softmax(logits.double(), dim=-1)
    assert abs(float(full.exp().sum(dim=-1).sub(1).abs().max())) < 1e-4
    assert out.logprobs is not None and out.top_token_ids is not None
    assert out.top_logprobs is not None
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (4,)
    assert out.top_token_ids.shape == (4, 5) and out.top_token_ids.dtype == torch.int64
    # The sampled token's value is its log-prob under the raw (unpenalised, untempered) logits.
    torch.testing.assert_close(out.logprobs.double(), full.gather(1, out.token_ids[:, None])[:, 0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(out.top_logprobs.double(), full.gather(1, out.top_token_ids),
                               rtol=0, atol=1e-5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    torch.testing.assert_close(out.top_logprobs.double(), full.topk(5).values, rtol=0, atol=1e-5)
    # Greedy without penalties: the sampled token is the best one.
    assert int(out.top_token_ids[0, 0]) == int(out.token_ids[0])
    assert float(out.top_logprobs[0, 0]) == pytest.approx(float(out.logprobs[0]))
    # Any sampled token inside the top list carries the same value there.
    for r in range(4):
        hits = (out.top_token_ids[r] == out.token_ids[r]).nonzero()
        for h in hits[:, 0].tolist():
            assert float(out.top_logprobs[r, h]) == pytest.approx(float(out.logprobs[r]))


def test_logprobs_zero_reports_only_the_sampled_token() -> None:
    logits = random_logits(2, 10, seed=6)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0, logprobs=0)] * 2, 10))
    assert out.logprobs is not None and out.top_token_ids is None and out.top_logprobs is None
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).max(dim=-1).values)


# --- mixed batches and validation -----------------------------------------------------------------

def test_mixed_batch_of_greedy_sampled_and_seeded_rows() -> None:
    vocab = 80
    logits = random_logits(6, vocab, seed=8) * 0.3
    params = [SamplingParams(temperature=0.0),
              SamplingParams(top_k=4, seed=11),
              SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(top_k=4),
              SamplingParams(temperature=0.0, presence_penalty=2.0),
              SamplingParams(temperature=0.8, seed=12)]
    gens = [None, seeded(11), None, None, None, seeded(12)]
    outputs = [[], [], [], [], [int(logits[4].argmax())], []]
    torch.manual_seed(0)
    out = Sampler()(logits, build(params, vocab, generators=gens, outputs=outputs))
    tokens = out.token_ids.tolist()
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[2] == int(logits[2].argmax())
    assert tokens[1] in logits[1].topk(4).indices.tolist()
    assert tokens[3] in logits[3].topk(4).indices.tolist()
    penalised = logits[4].clone()
    penalised[outputs[4][0]] -= 2.0
    assert tokens[4] == int(penalised.argmax())
    for row, seed in ((1, 11), (5, 12)):
        alone = Sampler()(logits[row:row + 1],
                          build([params[row]], vocab, generators=[seeded(seed)]))
        assert int(alone.token_ids[0]) == tokens[row]


def test_invalid_inputs_raise_value_error() -> None:
    params = [SamplingParams(), SamplingParams()]
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch.build(params, [None], [[], []], [[], []], [], 10, CPU)
    with pytest.raises(ValueError, match="token ids"):
        build([SamplingParams(frequency_penalty=1.0)], 10, outputs=[[3, 12]])
    batch = build(params, 10)
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, 11), batch)


def test_half_precision_logits_give_float32_logprobs() -> None:
    logits = random_logits(3, 30, seed=12).to(torch.bfloat16)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0, logprobs=2)] * 3, 30))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits.float(), -1).amax(-1))


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, 10), build([], 10))
    assert out.token_ids.shape == (0,)
