"""The real `ferry serve` in a subprocess over the tiny random Llama, driven by the openai SDK and httpx.

Speed matters here, so the model is tiny; its text is gibberish but deterministic under greedy
sampling, which is all these behaviours need.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ferry.server.metrics import sample

from .conftest import ServerProcess

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # > one KV block of tokens
LONG = {"max_tokens": 150, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tiny_server(server_factory: Any, tiny_llama_dir: Path) -> ServerProcess:
    server = server_factory(tiny_llama_dir, "--max-num-seqs", "16", "--max-queue", "16",
                            "--kv-cache-memory", "16MiB", "--max-body-bytes", "65536")
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def model_name(tiny_server: ServerProcess) -> str:
    return httpx.get(tiny_server.base_url + "/v1/models").json()["data"][0]["id"]


def sdk(server: ServerProcess, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=60, **kw)


def async_sdk(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                              timeout=60)


def successes(m: dict[str, float]) -> float:
    return sample(m, "ferry:request_success_total")


# ------------------------------------------------------------------------------------- SDK


def test_sync_sdk_chat_and_completions(tiny_server: ServerProcess, model_name: str) -> None:
    client = sdk(tiny_server)
    messages = [{"role": "user", "content": PROMPT}]
    first = client.chat.completions.create(model=model_name, messages=messages, max_tokens=12,
                                           temperature=0)
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")
    choice = first.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    # the same prompt again: identical greedy text, and its full blocks come from the prefix cache
    again = client.chat.completions.create(model=model_name, messages=messages, max_tokens=12,
                                           temperature=0)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 16

    chunks = list(client.chat.completions.create(model=model_name, messages=messages,
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    comp = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0,
                                     logprobs=2, echo=True)
    assert comp.object == "text_completion" and comp.choices[0].text.startswith(PROMPT)
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[-5:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[-5:])

    ids = client.post("/../tokenize", cast_to=httpx.Response, body={"prompt": "Hello there"})
    token_ids = ids.json()["tokens"]
    by_ids = client.completions.create(model=model_name, prompt=token_ids, max_tokens=4,
                                       temperature=0)
    by_text = client.completions.create(model=model_name, prompt="Hello there", max_tokens=4,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


async def test_async_sdk_streaming_n_and_usage(tiny_server: ServerProcess, model_name: str) -> None:
    client = async_sdk(tiny_server)
    stream = await client.completions.create(
        model=model_name, prompt=["Hello", "Goodbye"], n=2, max_tokens=6, temperature=0.8, seed=7,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1, 2, 3] and finish == {i: "length" for i in range(4)}
    assert usage is not None and usage.completion_tokens == 24

    chat = await client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    await client.close()


# ------------------------------------------------------------------------------------- errors


def test_errors_leave_no_block_behind(tiny_server: ServerProcess, model_name: str) -> None:
    url = tiny_server.base_url
    client = sdk(tiny_server)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hi", max_tokens=100_000)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])

    def err(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert err(httpx.post(url + "/v1/completions", content=b"{oops",
                          headers={"content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert err(httpx.post(url + "/v1/completions", json={"prompt": [1, 10**9]}), 400)["param"] == "prompt"
    assert err(httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 0}), 400)["param"] == "n"
    assert err(httpx.post(url + "/v1/completions",
                          json={"prompt": "x" * 70_000}), 413)["code"] == "request_too_large"
    assert err(httpx.post(url + "/v1/completions", json={"prompt": "hi " * 600}), 400)["code"] == \
        "context_length_exceeded"
    assert err(httpx.post(url + "/v1/completions", json={"prompt": "x", "stop_token_ids": [-1]}),
               400)["param"] == "stop_token_ids"
    # the server is still up and fine
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200
    tiny_server.wait_idle()


# ------------------------------------------------------------------------------------- concurrency


async def test_health_and_metrics_answer_while_16_streams_run(tiny_server: ServerProcess,
                                                              model_name: str) -> None:
    client = async_sdk(tiny_server)
    finished = 0
    started = asyncio.Event()
    n_started = 0

    async def one(i: int) -> int:
        nonlocal finished, n_started
        stream = await client.completions.create(model=model_name, prompt=f"story {i}:",
                                                 stream=True, **LONG)
        tokens = 0
        async for chunk in stream:
            if tokens == 0:
                n_started += 1
                if n_started == 16:
                    started.set()
            tokens += 1
        finished += 1
        return tokens

    tasks = [asyncio.create_task(one(i)) for i in range(16)]
    await asyncio.wait_for(started.wait(), 120)
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=30) as http:
        health = await http.get("/health")
        finished_at_health = finished
        metrics = await http.get("/metrics")
        finished_at_metrics = finished
    assert health.status_code == 200 and metrics.status_code == 200
    # both answered while generation was still going on
    assert finished_at_health < 16 and finished_at_metrics < 16
    assert "ferry:num_requests_running" in metrics.text
    counts = await asyncio.gather(*tasks)
    assert all(c > 1 for c in counts)
    await client.close()
    tiny_server.wait_idle()


# ------------------------------------------------------------------------------------- disconnects


def test_stream_disconnect_aborts(tiny_server: ServerProcess, model_name: str) -> None:
    before = successes(tiny_server.wait_idle())
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", timeout=60,
                      json={"model": model_name, "prompt": "abc", "stream": True,
                            "max_tokens": 450, "ignore_eos": True}) as r:
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data:")
            if lines == 3:
                break  # leaving the block closes the connection mid-stream
    after = tiny_server.wait_idle()
    assert successes(after) == before  # aborted, not finished: KV freed, nothing running


def test_non_streaming_disconnect_aborts(tiny_server: ServerProcess, model_name: str) -> None:
    before = successes(tiny_server.wait_idle())
    body = json.dumps({"model": model_name, "prompt": "abc", "max_tokens": 450,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", tiny_server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 60
    while sample(tiny_server.metrics(), "ferry:num_requests_running") < 1:
        assert time.monotonic() < deadline, "request never started"
        time.sleep(0.02)
    sock.close()
    after = tiny_server.wait_idle()
    assert successes(after) == before


# ------------------------------------------------------------------------------------- admission


def test_admission_control_429(server_factory: Any, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, "--max-num-seqs", "2", "--max-queue", "1",
                            "--kv-cache-memory", "16MiB")
    server.wait_ready()

    async def run() -> list[tuple[int, dict[str, str], str]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            async def one(i: int) -> tuple[int, dict[str, str], str]:
                r = await http.post("/v1/completions", json={
                    "prompt": f"request {i}", "max_tokens": 300, "ignore_eos": True})
                return r.status_code, dict(r.headers), r.text
            return await asyncio.gather(*(one(i) for i in range(8)))

    results = asyncio.run(run())
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1
    assert set(statuses) == {200, 429}
    for status, headers, text in results:
        if status == 429:
            assert headers["retry-after"] == "1"
            assert json.loads(text)["error"]["type"] == "rate_limit_error"
        else:
            body = json.loads(text)
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 300
    m = server.wait_idle()
    assert sample(m, "ferry:admission_rejections_total") == statuses.count(429)


# ------------------------------------------------------------------------------------- auth + drain


def test_api_key_and_sigterm_drain(server_factory: Any, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, "--kv-cache-memory", "16MiB",
                            "--shutdown-timeout", "60", env={"FERRY_API_KEY": "s3cret"})
    server.wait_ready()
    with pytest.raises(openai.AuthenticationError):
        sdk(server, api_key="wrong").models.list()
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    client = sdk(server, api_key="s3cret")
    model = client.models.list().data[0].id

    stream = client.completions.create(model=model, prompt="drain me", stream=True, **LONG)
    it = iter(stream)
    text = next(it).choices[0].text
    server.proc.send_signal(signal.SIGTERM)
    # the listener stays open while draining, and new work is refused with 503
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(server.base_url + "/health", headers={"Authorization": "Bearer s3cret"})
        if r.status_code == 503:
            break
        assert time.monotonic() < deadline, "never started draining"
        time.sleep(0.01)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=model, prompt="too late", max_tokens=2)
    assert info.value.status_code == 503
    last = None
    for chunk in it:
        text += chunk.choices[0].text
        last = chunk
    assert last is not None and last.choices[0].finish_reason == "length"
    assert server.proc.wait(60) == 0
