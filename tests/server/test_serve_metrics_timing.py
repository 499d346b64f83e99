"""The request-phase histograms vLLM's reference Grafana dashboard reads, on a real `ferry serve`.

``ferry:time_per_output_token_seconds`` (per token, as vLLM's), ``ferry:request_prefill_time_seconds``,
``ferry:request_decode_time_seconds`` and ``ferry:request_max_num_generation_tokens``: their counts
against the requests sent with the official SDK, and their sums against each other and the older series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ferry.server.metrics import sample

from .conftest import ServerProcess

PROMPT = "Count the boats in the harbour and name each one. "
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(server_factory: Any, tiny_llama_dir: Path) -> ServerProcess:
    s = server_factory(tiny_llama_dir, "--max-num-seqs", "8", "--kv-cache-memory", "16MiB")
    s.wait_ready()
    return s


@pytest.fixture(scope="module")
def model(server: ServerProcess) -> str:
    return str(httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"])


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def hist(m: dict[str, float], name: str) -> tuple[float, float]:
    """(count, sum) of a histogram over every label set."""
    return sample(m, name + "_count"), sample(m, name + "_sum")


NEW = ("ferry:time_per_output_token_seconds", "ferry:request_prefill_time_seconds",
       "ferry:request_decode_time_seconds", "ferry:request_max_num_generation_tokens")


def delta(before: dict[str, float], after: dict[str, float], name: str) -> tuple[float, float]:
    c0, s0 = hist(before, name)
    c1, s1 = hist(after, name)
    return c1 - c0, s1 - s0


def test_new_histograms_are_exported_with_the_model_label(server: ServerProcess, model: str) -> None:
    text = httpx.get(server.base_url + "/metrics").text
    for name in NEW:
        assert f"# TYPE {name} histogram" in text
    # labelled children appear once a request has run; the label is the served model's name
    openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0).completions.create(
        model=model, prompt=PROMPT, max_tokens=2, temperature=0, extra_body=IGNORE_EOS)
    text = httpx.get(server.base_url + "/metrics").text
    for name in NEW:
        assert f'{name}_count{{model_name="{model}"}}' in text


def test_one_request_phases(server: ServerProcess, model: str, client: openai.OpenAI) -> None:
    before = server.wait_idle()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=7, temperature=0, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    after = server.wait_idle()

    # seven tokens, one per step: six intervals, in both per-token series alike
    assert delta(before, after, "ferry:time_per_output_token_seconds")[0] == 6
    assert delta(before, after, "ferry:time_per_output_token_seconds") == \
        delta(before, after, "ferry:inter_token_latency_seconds")
    assert delta(before, after, "ferry:request_max_num_generation_tokens") == (1, 7)
    prefill_n, prefill = delta(before, after, "ferry:request_prefill_time_seconds")
    decode_n, decode = delta(before, after, "ferry:request_decode_time_seconds")
    assert prefill_n == decode_n == 1
    assert prefill > 0 and decode > 0
    _, ttft = delta(before, after, "ferry:time_to_first_token_seconds")
    _, queue = delta(before, after, "ferry:request_queue_time_seconds")
    _, e2e = delta(before, after, "ferry:e2e_request_latency_seconds")
    # the phases tile the request: waiting + prefill within TTFT, prefill + decode within E2E
    assert queue + prefill <= ttft + 1e-9
    assert prefill + decode <= e2e + 1e-9
    # six decode steps took the decode phase: the per-token intervals add up to it
    _, tpot = delta(before, after, "ferry:time_per_output_token_seconds")
    assert tpot <= e2e - ttft + 1e-9


def test_mixed_requests_counts_and_sums(server: ServerProcess, model: str, client: openai.OpenAI) -> None:
    before = server.wait_idle()
    sent_max = 0  # what ferry:request_max_num_generation_tokens must add up to
    prompts = 0

    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=6, temperature=0, extra_body=IGNORE_EOS)
    sent_max, prompts = sent_max + 6, prompts + 1
    assert r.usage.completion_tokens == 6

    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0,
                                       stream=True, extra_body=IGNORE_EOS)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    sent_max, prompts = sent_max + 5, prompts + 1

    # n = 2: one request, its longest choice counted once (both run to max_tokens here)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0,
                                  seed=3, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 8
    sent_max, prompts = sent_max + 4, prompts + 1

    # a batch of two prompts: two requests
    r = client.completions.create(model=model, prompt=[PROMPT, PROMPT + "Again."], max_tokens=3,
                                  temperature=0, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 6
    sent_max, prompts = sent_max + 3 + 3, prompts + 2

    # without ignore_eos the model may stop early: what it generated counts, not max_tokens
    r = client.completions.create(model=model, prompt="Hello", max_tokens=9, temperature=0.8, seed=11)
    generated = r.usage.completion_tokens
    assert 1 <= generated <= 9
    prompts += 1

    after = server.wait_idle()
    assert delta(before, after, "ferry:request_max_num_generation_tokens") == (prompts, sent_max + generated)
    for name in ("ferry:request_prefill_time_seconds", "ferry:request_decode_time_seconds"):
        assert delta(before, after, name)[0] == prompts, name
    assert delta(before, after, "ferry:e2e_request_latency_seconds")[0] == prompts

    tpot = delta(before, after, "ferry:time_per_output_token_seconds")
    assert tpot == delta(before, after, "ferry:inter_token_latency_seconds")
    generated_total = delta(before, after, "ferry:request_generation_tokens")[1]
    assert generated_total == sent_max + 4 + generated  # the n = 2 request's second choice
    # every token but each request's first-step tokens has an interval
    assert prompts <= generated_total - tpot[0] <= prompts + 1  # + 1: n = 2 may start in one step

    _, prefill = delta(before, after, "ferry:request_prefill_time_seconds")
    _, decode = delta(before, after, "ferry:request_decode_time_seconds")
    _, e2e = delta(before, after, "ferry:e2e_request_latency_seconds")
    _, ttft = delta(before, after, "ferry:time_to_first_token_seconds")
    _, queue = delta(before, after, "ferry:request_queue_time_seconds")
    assert prefill + decode <= e2e + 1e-9
    assert queue + prefill <= ttft + 1e-9
