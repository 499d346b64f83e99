"""Scheduler: token budget, chunked prefill, max_num_seqs, preemption of the newest request."""

from __future__ import annotations

from ferry.batch.outputs import ModelRunnerOutput, SampledToken, SchedulerOutput
from ferry.batch.request import Request, RequestStatus
from ferry.config import SchedulerConfig
from ferry.engine.kv_cache import KVCacheManager
from ferry.engine.scheduler import Scheduler
from ferry.sampling_params import SamplingParams

BS = 4


def make(rid: str, n_prompt: int, max_tokens: int = 4, eos: tuple[int, ...] = ()) -> Request:
    base = 1000 * (ord(rid[0]) - ord("a") + 1)  # distinct prompts: no accidental prefix hits
    return Request(rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=max_tokens),
                   eos, max_tokens)


def run_step(sched: Scheduler, token: int = 7) -> tuple[list[tuple[str, int]], list[str]]:
    out = sched.schedule()
    sampled = {s.request.request_id: [SampledToken(token)] for s in out.scheduled if s.samples}
    sched.update(out, ModelRunnerOutput(sampled))
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled], out.preempted


def run_step_blocks(sched: Scheduler) -> tuple[SchedulerOutput, list[tuple[str, int, list[int]]]]:
    """One step; the output and each scheduled request's (id, new tokens, block ids)."""
    out = sched.schedule()
    sched.update(out, ModelRunnerOutput(
        {s.request.request_id: [SampledToken(7)] for s in out.scheduled if s.samples}))
    return out, [(s.request.request_id, s.num_new_tokens, s.block_ids) for s in out.scheduled]


def test_scheduled_requests_carry_exact_block_ids() -> None:
    kv = KVCacheManager(8, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv, 1024)
    a = make("a", 10, max_tokens=1)
    sched.add_request(a)
    assert run_step_blocks(sched)[1] == [("a", 10, [0, 1, 2])]
    # a finished and freed its blocks tail first: free queue [3, 4, 5, 6, 7, 2, 1, 0], with 0 and 1
    # still cached under a's first two blocks.
    assert kv.pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    b = Request("b", a.prompt_token_ids[:8] + [1, 2, 3], SamplingParams(max_tokens=2), (), 2)
    sched.add_request(b)
    out, scheduled = run_step_blocks(sched)
    assert scheduled == [("b", 3, [0, 1, 3])]  # two hit blocks, then the oldest free one
    assert b.num_cached_tokens == 8
    assert run_step_blocks(sched)[1] == [("b", 1, [0, 1, 3])]  # the decode fits block 3
    # The block ids are the step's own list: later allocations do not change a past step.
    assert out.scheduled[0].block_ids == [0, 1, 3]
    assert kv.num_free_blocks == 8


def test_block_ids_after_preemption_and_recompute() -> None:
    kv = KVCacheManager(4, BS)  # 16 token slots
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv, 1024)
    a, b = make("a", 7, max_tokens=6), make("b", 7, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step_blocks(sched)[1] == [("a", 7, [0, 1]), ("b", 7, [2, 3])]
    before, scheduled = run_step_blocks(sched)
    assert scheduled == [("a", 1, [0, 1]), ("b", 1, [2, 3])]
    # a needs a third block: b is preempted and frees [3, 2] (tail first); a takes block 3.
    out, scheduled = run_step_blocks(sched)
    assert out.preempted == ["b"]
    assert scheduled == [("a", 1, [0, 1, 3])]
    assert before.scheduled[0].block_ids == [0, 1]  # a past step's table is not extended
    while a.status == RequestStatus.RUNNING:
        _, scheduled = run_step_blocks(sched)
        assert [blocks for _, _, blocks in scheduled] == [[0, 1, 3]]
    # a freed [3, 1, 0] behind the still-cached block 2 (b's first block): b hits block 2 and takes
    # 3 and 1 for the 5 tokens it recomputes.
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    assert run_step_blocks(sched)[1] == [("b", 5, [2, 3, 1])]
    while sched.has_unfinished():
        run_step_blocks(sched)
    assert kv.num_free_blocks == 4


def test_chunked_prefill_mixes_with_decodes_under_the_budget() -> None:
    kv = KVCacheManager(64, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8), kv, 1024)
    sched.add_request(make("a", 3))
    sched.add_request(make("b", 10))
    assert run_step(sched)[0] == [("a", 3), ("b", 5)]  # b's prefill is chunked
    assert run_step(sched)[0] == [("a", 1), ("b", 5)]  # a decodes, b finishes its prefill
    a, b = sched.requests["a"], sched.requests["b"]
    assert a.num_output_tokens == 2 and b.num_output_tokens == 1
    assert b.num_computed_tokens == 10
    assert run_step(sched)[0] == [("a", 1), ("b", 1)]


def test_max_num_seqs_caps_the_running_set() -> None:
    kv = KVCacheManager(64, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), kv, 1024)
    for rid in "abc":
        sched.add_request(make(rid, 2))
    assert [r for r, _ in run_step(sched)[0]] == ["a", "b"]
    assert sched.num_waiting == 1


def test_requests_finish_at_max_tokens_and_free_their_blocks() -> None:
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv, 1024)
    req = make("a", 5, max_tokens=3)
    sched.add_request(req)
    for _ in range(3):
        run_step(sched)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == [7, 7, 7]
    assert not sched.has_unfinished()
    assert kv.num_free_blocks == 16


def test_eos_stops_unless_ignored_or_under_min_tokens() -> None:
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(), kv, 1024)
    req = make("a", 5, max_tokens=10, eos=(7,))
    sched.add_request(req)
    run_step(sched)
    assert req.status == RequestStatus.FINISHED_STOPPED and req.output_token_ids == [7]
    ignoring = Request("b", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), (7,), 3)
    sched.add_request(ignoring)
    for _ in range(3):
        run_step(sched)
    assert ignoring.status == RequestStatus.FINISHED_LENGTH
    assert kv.num_free_blocks == 16


def test_preemption_frees_the_newest_request_and_recomputes_it() -> None:
    kv = KVCacheManager(4, BS)  # 16 token slots
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv, 1024)
    a, b = make("a", 7, max_tokens=6), make("b", 7, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched)[0] == [("a", 7), ("b", 7)]  # 2 blocks each: the pool is full
    assert run_step(sched)[0] == [("a", 1), ("b", 1)]  # token 8 of each still fits
    scheduled, preempted = run_step(sched)  # a needs a 3rd block: b (newest) is preempted
    assert preempted == ["b"]
    assert scheduled == [("a", 1)]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert kv.block_ids("b") == []
    assert list(sched.waiting) == [b]
    while a.status == RequestStatus.RUNNING:
        run_step(sched)
    assert a.status == RequestStatus.FINISHED_LENGTH
    # b comes back: of its 9 tokens (prompt + 2 generated), block 0 is still cached (a took only
    # one of b's freed blocks), so 5 are recomputed in one chunk.
    assert run_step(sched)[0] == [("b", 5)]
    while sched.has_unfinished():
        run_step(sched)
    assert b.num_output_tokens == 6 and b.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert kv.num_free_blocks == 4


def test_finish_request_aborts_waiting_and_running() -> None:
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), kv, 1024)
    sched.add_request(make("a", 5))
    sched.add_request(make("b", 5))
    run_step(sched)
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished()
    assert kv.num_free_blocks == 16


def test_context_limit_finishes_with_length() -> None:
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(), kv, max_model_len=7)
    req = make("a", 5, max_tokens=100)
    sched.add_request(req)
    while sched.has_unfinished():
        run_step(sched)
    assert req.num_tokens == 7 and req.status == RequestStatus.FINISHED_LENGTH


def test_unchunked_prefill_longer_than_the_budget_still_runs() -> None:
    # Without chunked prefill a prompt over max_num_batched_tokens can never fit one step: it is
    # chunked rather than waiting forever (and blocking every request queued behind it).
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8,
                                      enable_chunked_prefill=False), kv, 1024)
    sched.add_request(make("a", 10, max_tokens=2))
    sched.add_request(make("b", 3, max_tokens=2))
    assert run_step(sched)[0] == [("a", 8)]
    assert run_step(sched)[0] == [("a", 2), ("b", 3)]
    for _ in range(10):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert not sched.has_unfinished()
    assert kv.num_free_blocks == 16


def test_unchunked_prefill_waits_for_a_step_with_room() -> None:
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8,
                                      enable_chunked_prefill=False), kv, 1024)
    sched.add_request(make("a", 5, max_tokens=3))
    sched.add_request(make("b", 6, max_tokens=3))
    assert run_step(sched)[0] == [("a", 5)]  # b (6 tokens) does not fit the 3 left
    assert run_step(sched)[0] == [("a", 1), ("b", 6)]
