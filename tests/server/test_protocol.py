"""Pure unit tests: request validation, error shapes, SSE framing, metrics, admission, CLI flags."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
from pydantic import ValidationError

from ferry.openai_errors import validation_error_to_openai
from ferry.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ferry.server.admission import AdmissionController, AdmissionRejected, RequestTooLarge
from ferry.server.command import add_arguments, configs_from_args, parse_bytes
from ferry.server.metrics import ServerMetrics, parse_prometheus, sample
from ferry.server.protocol import ChatCompletionRequest, CompletionRequest
from ferry.server.stream_merge import merge_streams
from ferry.sse import SSE_DONE, parse_sse, sse_event


def _error(model: type, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error_to_openai(list(info.value.errors())).body()["error"]


MSG = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------------------- protocol


def test_chat_request_maps_to_sampling_params() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": MSG, "max_completion_tokens": 7, "max_tokens": 99,
        "temperature": 0, "top_p": 0.5, "n": 2, "stop": "x", "seed": 3, "logprobs": True,
        "top_logprobs": 4, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True,
        "min_tokens": 2, "stop_token_ids": [7], "skip_special_tokens": False,
        "include_stop_str_in_output": True, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "user": "u"})
    p = req.to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed, p.logprobs) == \
        (7, 0.0, 0.5, 2, ("x",), 3, 4)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos, p.min_tokens) == (5, 0.1, 1.2, True, 2)
    assert (p.stop_token_ids, p.skip_special_tokens, p.include_stop_str_in_output) == ((7,), False, True)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)


def test_defaults_follow_openai() -> None:
    chat = ChatCompletionRequest.model_validate({"messages": MSG}).to_sampling_params()
    assert chat.max_tokens is None and chat.temperature == 1.0 and chat.logprobs is None
    comp = CompletionRequest.model_validate({"prompt": "a"}).to_sampling_params()
    assert comp.max_tokens == 16
    logprob_chat = ChatCompletionRequest.model_validate({"messages": MSG, "logprobs": True})
    assert logprob_chat.to_sampling_params().logprobs == 0


def test_completion_prompt_forms() -> None:
    def prompts(p: object) -> list:
        return CompletionRequest.model_validate({"prompt": p}).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([5, 6]) == [[5, 6]]
    assert prompts([[5], [6, 7]]) == [[5], [6, 7]]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": MSG, "temperature": 3}, "temperature"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "presence_penalty": 5}, "presence_penalty"),
    ({"messages": MSG, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": MSG, "stop": [""]}, "stop"),
    ({"messages": MSG, "min_p": 2}, "min_p"),
])
def test_range_errors_name_the_field(body: dict, param: str) -> None:
    err = _error(ChatCompletionRequest, body)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert err["message"]


def test_missing_field_is_named() -> None:
    err = _error(ChatCompletionRequest, {"model": "m"})
    assert err["param"] == "messages" and "Missing" in err["message"]
    assert _error(CompletionRequest, {"prompt": []})["param"] == "prompt"
    assert _error(CompletionRequest, {"prompt": {"x": 1}})["param"] == "prompt"


@pytest.mark.parametrize(("body", "param", "word"), [
    ({"response_format": {"type": "yaml"}}, "response_format.type", "not supported"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages.0.content.0", "not supported"),
])
def test_unsupported_features_say_so(body: dict, param: str, word: str) -> None:
    err = _error(ChatCompletionRequest, {"messages": MSG, **body})
    assert err["param"] == param
    assert word in err["message"]


def test_text_features_are_accepted() -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]}],
        "response_format": {"type": "text"}, "tool_choice": "none", "tools": []})
    assert req.template_messages() == [{"role": "system", "content": "a\nb"}]


def test_completions_unsupported() -> None:
    assert _error(CompletionRequest, {"prompt": "a", "suffix": "z"})["param"] == "suffix"
    assert _error(CompletionRequest, {"prompt": "a", "best_of": 3})["param"] == "best_of"
    assert _error(CompletionRequest, {"prompt": "a", "logprobs": 50})["param"] == "logprobs"


# ------------------------------------------------------------------------------------- SSE


def test_sse_framing_round_trips() -> None:
    event = sse_event({"a": "line1\nline2", "b": [1, 2]})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert event.count("\n") == 2  # JSON escapes newlines: one data line per event
    body = event + sse_event({"c": None}) + SSE_DONE
    payloads = parse_sse(body)
    assert [json.loads(p) for p in payloads[:2]] == [{"a": "line1\nline2", "b": [1, 2]}, {"c": None}]
    assert payloads[2] == "[DONE]"


async def test_merge_streams_interleaves_and_closes() -> None:
    closed: list[int] = []

    async def gen(k: int, n: int):
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield k * 10 + i
        finally:
            closed.append(k)

    items = [x async for x in merge_streams([gen(1, 3), gen(2, 2)])]
    assert sorted(items) == [(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)]
    assert sorted(closed) == [1, 2]

    closed.clear()
    merged = merge_streams([gen(1, 100), gen(2, 100)])
    await anext(merged)
    await merged.aclose()  # a consumer that stops early closes every source
    assert sorted(closed) == [1, 2]


async def test_merge_streams_reraises() -> None:
    async def bad():
        yield 1
        raise RuntimeError("boom")

    async def good():
        for i in range(3):
            await asyncio.sleep(0)
            yield i

    with pytest.raises(RuntimeError, match="boom"):
        async for _ in merge_streams([bad(), good()]):
            pass


# ------------------------------------------------------------------------------------- metrics


@pytest.fixture
def stats() -> object:
    class S:
        num_running, num_waiting, kv_cache_usage = 2, 1, 0.25
        num_preemptions_total, prefix_cache_queries_total, prefix_cache_hits_total = 3, 40, 16
    return S()


def _out(tokens: list[int], finish: str | None, n_prompt: int = 5) -> RequestOutput:
    return RequestOutput("r", None, list(range(n_prompt)),
                         [CompletionOutput(0, "x" * len(tokens), tokens, finish)], finish is not None,
                         metrics=RequestMetrics(arrival_time=1.0, first_scheduled_time=1.5))


def test_metrics_render_vllm_names(stats: object) -> None:
    m = ServerMetrics("my-model", 2048, lambda: stats)  # type: ignore[arg-type,return-value]
    rec = m.recorder()
    rec.on_output(_out([1], None))
    rec.on_output(_out([1, 2, 3], None))
    rec.on_output(_out([1, 2, 3, 4], "length"))
    m.admission_rejections.labels("my-model").inc()
    s = parse_prometheus(m.render().decode())
    lab = {"model_name": "my-model"}
    assert sample(s, "ferry:num_requests_running", **lab) == 2
    assert sample(s, "ferry:num_requests_waiting", **lab) == 1
    assert sample(s, "ferry:kv_cache_usage_perc", **lab) == 0.25
    assert sample(s, "ferry:num_preemptions_total", **lab) == 3
    assert sample(s, "ferry:prefix_cache_queries_total", **lab) == 40
    assert sample(s, "ferry:prefix_cache_hits_total", **lab) == 16
    assert sample(s, "ferry:prompt_tokens_total", **lab) == 5
    assert sample(s, "ferry:generation_tokens_total", **lab) == 4
    assert sample(s, "ferry:request_success_total", finished_reason="length", **lab) == 1
    assert sample(s, "ferry:admission_rejections_total", **lab) == 1
    assert sample(s, "ferry:time_to_first_token_seconds_count", **lab) == 1
    assert sample(s, "ferry:inter_token_latency_seconds_count", **lab) == 3  # tokens 2, 3, 4
    assert sample(s, "ferry:e2e_request_latency_seconds_count", **lab) == 1
    assert sample(s, "ferry:request_queue_time_seconds_sum", **lab) == 0.5
    assert sample(s, "ferry:request_prompt_tokens_sum", **lab) == 5
    assert sample(s, "ferry:request_generation_tokens_sum", **lab) == 4


def test_request_success_counts_requests_not_choices(stats: object) -> None:
    m = ServerMetrics("m", 2048, lambda: stats)  # type: ignore[arg-type,return-value]
    rec = m.recorder()
    # n=3: choice 1 stops early, then choices 2 and 0 hit the length limit
    outs = [CompletionOutput(i, "", [7] * 2) for i in range(3)]
    outs[1].finish_reason = "stop"
    rec.on_output(RequestOutput("r", None, [1, 2], outs, False))
    outs = [CompletionOutput(i, "", [7] * 4, "length" if i != 1 else "stop") for i in range(3)]
    rec.on_output(RequestOutput("r", None, [1, 2], outs, True))
    rec.on_output(RequestOutput("r", None, [1, 2], outs, True))  # a repeat is not a second request
    aborted = m.recorder()
    aborted.on_output(RequestOutput("a", None, [1], [CompletionOutput(0, "", [7], "abort")], True))
    s = parse_prometheus(m.render().decode())
    assert sample(s, "ferry:request_success_total") == 1
    assert sample(s, "ferry:request_success_total", finished_reason="length") == 1
    assert sample(s, "ferry:generation_tokens_total") == 13


def test_metrics_registries_are_per_app(stats: object) -> None:
    a = ServerMetrics("a", 100, lambda: stats)  # type: ignore[arg-type,return-value]
    b = ServerMetrics("b", 100, lambda: None)
    a.prompt_tokens.labels("a").inc(7)
    assert sample(parse_prometheus(a.render().decode()), "ferry:prompt_tokens_total") == 7
    b_text = b.render().decode()
    assert "ferry:prompt_tokens_total{" not in b_text  # a's series did not leak into b's registry
    assert "ferry:num_requests_running" not in b_text  # no engine yet: no engine series


# ------------------------------------------------------------------------------------- admission


def test_admission_counts_sequences() -> None:
    adm = AdmissionController(max_num_seqs=2, max_queue=1)
    assert adm.capacity == 3
    adm.try_acquire(2)
    assert adm.waiting == 0
    adm.try_acquire(1)
    assert adm.waiting == 1 and adm.in_flight == 3
    with pytest.raises(AdmissionRejected):
        adm.try_acquire(1)
    assert adm.rejections == 1 and adm.in_flight == 3
    adm.release(2)
    with adm.admit(2):
        assert adm.in_flight == 3
    assert adm.in_flight == 1
    with pytest.raises(RequestTooLarge):
        adm.try_acquire(4)
    with pytest.raises(RuntimeError):
        adm.release(5)


def test_admission_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        AdmissionController(0, 1)
    with pytest.raises(ValueError, match="max_queue"):
        AdmissionController(1, -1)


# ------------------------------------------------------------------------------------- CLI


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p, "serve")
    return p.parse_args(list(argv))


def test_cli_builds_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_API_KEY", "sekret")
    engine, server = configs_from_args(_args(
        "--model", "m.gguf", "--port", "9001", "--max-num-seqs", "8", "--max-queue", "3",
        "--kv-cache-memory", "64MiB", "--dtype", "bfloat16", "--block-size", "32",
        "--max-model-len", "1024", "--max-num-batched-tokens", "256", "--log-format", "json",
        "--shutdown-timeout", "5", "--served-model-name", "x", "--no-prefix-caching"))
    assert engine.model.model == "m.gguf" and engine.model.dtype == "bfloat16"
    assert engine.model.max_model_len == 1024
    assert engine.cache.kv_cache_memory == 64 * 2**20 and engine.cache.block_size == 32
    assert not engine.cache.enable_prefix_caching
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == (8, 256)
    assert (server.port, server.max_queue, server.log_format, server.shutdown_timeout) == \
        (9001, 3, "json", 5.0)
    assert server.api_key == "sekret" and server.served_model_name == "x"


def test_cli_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="block_size"):
        configs_from_args(_args("--block-size", "3"))
    with pytest.raises(ValueError, match="max_queue"):
        configs_from_args(_args("--max-queue", "-1"))
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5kb") == 1500
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")
