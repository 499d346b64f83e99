"""Scheduler and KV cache manager with speculative proposals, on hand-made runner outputs.

Exact token counts, block ids and hashes on tiny pools: what is scheduled (1 + k per decode), what
is computed after a partial acceptance, that proposals never enter a block hash, and that stops
inside an accepted run, preemption and aborts leave the pool whole.
"""

from __future__ import annotations

from ferry.batch.outputs import ModelRunnerOutput, SampledToken, SchedulerOutput
from ferry.batch.request import Request, RequestStatus
from ferry.config import SchedulerConfig, SpeculativeConfig
from ferry.engine.kv_cache import KVCacheManager
from ferry.engine.kv_cache.hashing import hash_block
from ferry.engine.scheduler import Scheduler
from ferry.sampling_params import SamplingParams

BS = 4
NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=2,
                          prompt_lookup_min=1)
# a prompt whose 2-gram (5, 6) reappears: the lookup proposes what followed it, 7 8 9
PROMPT = [5, 6, 7, 8, 9, 1, 5, 6]


def sched_with(num_blocks: int, spec: SpeculativeConfig | None = NGRAM, budget: int = 64,
               max_model_len: int = 1024) -> tuple[Scheduler, KVCacheManager]:
    kv = KVCacheManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget), kv,
                     max_model_len, spec), kv


def step(sched: Scheduler, tokens: dict[str, list[int]]) -> SchedulerOutput:
    """Schedule, then 'sample' the given tokens for each request that samples (a request's list
    is what the runner's verification would return: accepted proposals, then its own token)."""
    out = sched.schedule()
    sampled = {s.request.request_id: [SampledToken(t) for t in tokens[s.request.request_id]]
               for s in out.scheduled if s.samples}
    sched.update(out, ModelRunnerOutput(sampled))
    return out


def test_a_decode_with_proposals_is_scheduled_one_plus_k_and_rolls_back_rejections() -> None:
    sched, _kv = sched_with(16)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (), 20)
    sched.add_request(req)
    out = step(sched, {"a": [5]})  # prefill: no proposals; the sequence ends in "... 5 6 5"
    assert [(s.num_new_tokens, s.spec_token_ids) for s in out.scheduled] == [(8, ())]
    # the last 2-gram (6, 5) does not occur earlier; the 1-gram 5 last occurred at 6 -> 6 5 (the
    # occurrence at index 6 is followed by "6", then the sequence's own "5"): proposal 6 5
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.spec_token_ids == (6, 5)
    assert s.num_new_tokens == 3 and s.start == 8
    assert len(s.block_ids) == 3  # positions 8..10: a third block
    # accept the first proposal (6), reject the second: the target's own token is 1
    sched.update(out, ModelRunnerOutput({"a": [SampledToken(6), SampledToken(1)]}))
    assert req.output_token_ids == [5, 6, 1]
    assert req.num_computed_tokens == 10  # through the accepted 6; the 1 is computed next step
    assert sched.spec_counters is not None
    assert (sched.spec_counters.num_drafts, sched.spec_counters.num_draft_tokens,
            sched.spec_counters.num_accepted_tokens) == (1, 2, 1)
    assert sched.spec_counters.accepted_per_position == [1, 0, 0]


def test_rejected_proposals_never_enter_a_block_hash() -> None:
    spec = SpeculativeConfig(method="draft_model", model="draft", num_speculative_tokens=3)
    sched, kv = sched_with(16, spec)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (), 20)
    sched.add_request(req)

    def run(tokens: list[int], proposals: list[int]) -> SchedulerOutput:
        out = sched.schedule()
        sched.update(out, ModelRunnerOutput({"a": [SampledToken(t) for t in tokens]},
                                            draft_token_ids={"a": proposals}))
        return out

    run([5], [6, 5, 4])  # prompt: blocks 0, 1 full and hashed
    b0, b1 = hash_block(None, PROMPT[:4]), hash_block(hash_block(None, PROMPT[:4]), PROMPT[4:])
    out = run([9], [3, 3, 3])  # positions 8..11 = 5 6 5 4 fill block 2, all proposals rejected
    block2 = kv.pool.blocks[out.scheduled[0].block_ids[2]]
    assert block2.block_hash is None  # 5 6 5 4 is no prefix of the sequence
    assert req.num_computed_tokens == 9  # through the 5; the 9 is computed next
    out = run([3, 3, 7], [1, 1, 1])  # positions 9..12 = 9 3 3 3: two accepted, then 7
    assert out.scheduled[0].num_new_tokens == 4 and block2.block_hash is None
    assert req.output_token_ids == [5, 9, 3, 3, 7] and req.num_computed_tokens == 12
    sched.schedule()  # 13 real tokens: block 2 is full of real ones, hashed from them
    assert block2.block_hash == hash_block(b1, [5, 9, 3, 3])
    hashed = {b.block_hash for b in kv.pool.blocks if b.block_hash is not None}
    assert hashed == {b0, b1, hash_block(b1, [5, 9, 3, 3])}


def test_eos_inside_an_accepted_run_ends_the_sequence_there() -> None:
    sched, kv = sched_with(16)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (6,), 20)  # 6 is EOS
    sched.add_request(req)
    step(sched, {"a": [5]})
    out = sched.schedule()
    assert out.scheduled[0].spec_token_ids == (6, 5)
    sched.update(out, ModelRunnerOutput({"a": [SampledToken(6), SampledToken(5),
                                               SampledToken(8)]}))
    assert req.output_token_ids == [5, 6]  # nothing after the EOS
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert not sched.has_unfinished() and kv.num_free_blocks == 16


def test_proposals_stop_at_max_tokens_and_the_context() -> None:
    sched, _kv = sched_with(16)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=3), (), 3)
    sched.add_request(req)
    step(sched, {"a": [5]})
    out = sched.schedule()
    # 2 tokens left: one proposal and the target's own token at most
    assert out.scheduled[0].spec_token_ids == (6,)
    sched.update(out, ModelRunnerOutput({"a": [SampledToken(6), SampledToken(2)]}))
    assert req.output_token_ids == [5, 6, 2] and req.status == RequestStatus.FINISHED_LENGTH
    # the context: max_model_len 11 leaves room for two more tokens after the prompt and 5
    sched, _kv = sched_with(16, max_model_len=11)
    req = Request("b", list(PROMPT), SamplingParams(max_tokens=3), (), 3)
    sched.add_request(req)
    step(sched, {"b": [5]})
    assert sched.schedule().scheduled[0].spec_token_ids == (6,)


def test_max_tokens_inside_an_accepted_run_truncates_it() -> None:
    # a runner output longer than what is left (it cannot happen with the scheduler's caps, but
    # update must still stop at max_tokens)
    sched, kv = sched_with(16)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=2), (), 2)
    sched.add_request(req)
    step(sched, {"a": [5]})
    out = sched.schedule()
    assert out.scheduled[0].spec_token_ids == ()  # one token left: nothing to propose
    sched.update(out, ModelRunnerOutput({"a": [SampledToken(6), SampledToken(5)]}))
    assert req.output_token_ids == [5, 6] and req.status == RequestStatus.FINISHED_LENGTH
    assert kv.num_free_blocks == 16


def test_proposals_are_dropped_before_anyone_is_preempted() -> None:
    # 3 blocks = 12 slots; the prompt + first token take 9: proposals at 9, 10 fit block 2 ...
    sched, _kv = sched_with(3)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (), 20)
    sched.add_request(req)
    step(sched, {"a": [5]})
    out = sched.schedule()
    assert out.scheduled[0].spec_token_ids == (6, 5)
    sched.update(out, ModelRunnerOutput({"a": [SampledToken(6), SampledToken(5),
                                               SampledToken(7)]}))
    assert req.num_computed_tokens == 11 and req.num_tokens == 12
    # ... now position 11 is the last slot: proposals would need a 4th block, so they are dropped
    out = sched.schedule()
    assert [(s.num_new_tokens, s.spec_token_ids) for s in out.scheduled] == [(1, ())]
    assert out.preempted == []


def test_preemption_with_speculation_recomputes_and_frees_everything() -> None:
    sched, kv = sched_with(6)  # 24 slots
    a = Request("a", list(PROMPT), SamplingParams(max_tokens=12), (), 12)
    b = Request("b", [p + 100 for p in PROMPT], SamplingParams(max_tokens=12), (), 12)
    sched.add_request(a)
    sched.add_request(b)
    preempted: list[str] = []
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        preempted += out.preempted
        sampled = {}
        for s in out.scheduled:
            if s.samples:  # accept every proposal, then a token of the request's own
                own = 1 if s.request is a else 101
                sampled[s.request.request_id] = [SampledToken(t) for t in s.spec_token_ids] + [
                    SampledToken(own)]
        sched.update(out, ModelRunnerOutput(sampled))
        steps += 1
        assert steps < 100
    assert preempted  # the pool could not hold both to the end
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert kv.num_free_blocks == 6


def test_abort_mid_run_frees_every_block() -> None:
    sched, kv = sched_with(16)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (), 20)
    sched.add_request(req)
    step(sched, {"a": [5]})
    out = sched.schedule()
    assert out.scheduled[0].spec_token_ids
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)  # while the step "runs"
    assert sched.update(out, ModelRunnerOutput({"a": [SampledToken(6)]})) == []
    assert kv.num_free_blocks == 16


def test_draft_model_reserves_lookahead_slots_and_uses_its_proposals() -> None:
    spec = SpeculativeConfig(method="draft_model", model="draft", num_speculative_tokens=3)
    sched, _kv = sched_with(16, spec)
    req = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (), 20)
    sched.add_request(req)
    out = sched.schedule()
    # 8 prompt tokens + 3 slots ahead for the draft's feeding: 11 slots -> 3 blocks
    assert len(out.scheduled[0].block_ids) == 3
    sched.update(out, ModelRunnerOutput({"a": [SampledToken(5)]},
                                        draft_token_ids={"a": [1, 2, 3]}))
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.spec_token_ids == (1, 2, 3) and s.num_new_tokens == 4
    # positions 8..11 verified, then up to 3 ahead of position 12: 15 slots -> 4 blocks
    assert len(s.block_ids) == 4


def test_disable_by_batch_size_stops_proposals_while_the_batch_is_that_big() -> None:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=2,
                             prompt_lookup_min=1, disable_by_batch_size=2)
    sched, kv = sched_with(32, spec)
    a = Request("a", list(PROMPT), SamplingParams(max_tokens=20), (), 20)
    b = Request("b", list(PROMPT), SamplingParams(max_tokens=3), (), 3)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, {"a": [5], "b": [5]})  # both prefill
    # two running requests: no proposals, one token each
    out = step(sched, {"a": [6], "b": [6]})
    assert [(s.num_new_tokens, s.spec_token_ids) for s in out.scheduled] == [(1, ()), (1, ())]
    step(sched, {"a": [1], "b": [2]})  # b reaches max_tokens=3 and finishes
    assert [r.request_id for r in sched.running] == ["a"]
    # alone again: the lookup proposes for a
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.spec_token_ids and s.num_new_tokens == 1 + len(s.spec_token_ids)
    assert sched.spec_counters is not None and sched.spec_counters.num_drafts == 0
