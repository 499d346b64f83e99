"""The naive baseline speaks OpenAI's wire format (the official SDK works) and serves one request at a time."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai


def test_openai_sdk_streams_chat_with_usage(naive_server: Any) -> None:
    client = openai.OpenAI(base_url=naive_server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].message.content == text  # greedy: streaming and not streaming agree
    assert full.usage is not None and full.usage.completion_tokens == 6


def test_completions_and_no_usage_unless_asked(naive_server: Any) -> None:
    client = openai.OpenAI(base_url=naive_server.url + "/v1", api_key="unused")
    chunks = list(client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=4,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bad_request_is_an_openai_400(naive_server: Any) -> None:
    resp = httpx.post(naive_server.url + "/v1/chat/completions", json={"model": "x", "messages": []})
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = httpx.post(naive_server.url + "/v1/completions", json={"prompt": "x", "temperature": 9})
    assert resp.status_code == 400 and "temperature" in resp.json()["error"]["message"]


async def test_requests_are_served_one_at_a_time(naive_server: Any) -> None:
    events: list[tuple[int, str]] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "tiny-llama", "prompt": f"Request {i}", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", naive_server.url + "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append((i, line))

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(one(client, 0), one(client, 1), one(client, 2))
    order = [i for i, _ in events]
    # each request's events form one contiguous run: no interleaving, i.e. no batching
    runs = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    assert sorted(runs) == [0, 1, 2]
