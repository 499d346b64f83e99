"""The real `ferry serve` over SmolLM2-135M-Instruct: real text, and 32 concurrent streaming clients
that must each get exactly what the offline ``LLM.generate`` gives for the same greedy request."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from ferry import LLM, SamplingParams

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a cat", "mountains", "coffee", "rain", "a library", "trains", "the moon",
          "bread", "winter", "a violin", "gardens", "bees", "a lighthouse", "chess", "snow",
          "a river", "clocks", "the desert", "owls", "tea", "a bridge", "autumn", "maps",
          "a forest", "stars", "a market", "whales", "candles", "the wind", "a castle", "apples"]
PROMPTS = [f"Write one sentence about {t}." for t in TOPICS]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smol_server(server_factory: Any, smollm2_path: Path) -> Any:
    server = server_factory(smollm2_path, "--max-num-seqs", "32", "--kv-cache-memory", "256MiB",
                            "--max-model-len", "512", "--served-model-name", "smol")
    server.wait_ready()
    return server


def test_real_text_over_the_sdk(smol_server: Any) -> None:
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    assert [m.id for m in client.models.list().data] == ["smol"]
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model ends its answer with <|im_end|>


def test_32_concurrent_streams_match_llm_generate(smol_server: Any, smollm2_path: Path) -> None:
    llm = LLM(str(smollm2_path), max_model_len=512, kv_cache_memory=256 * 2**20)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    expected = [o.outputs[0].text for o in llm.chat(conversations, params)]
    del llm

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=smol_server.base_url + "/v1", api_key="none",
                                    max_retries=0, timeout=300)

        async def one(prompt: str) -> str:
            stream = await client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in PROMPTS))
        finally:
            await client.close()

    got = asyncio.run(run())
    assert len(set(expected)) > 16  # different prompts, different answers: a mix-up would show
    for prompt, want, have in zip(PROMPTS, expected, got):
        assert have == want, prompt
    smol_server.wait_idle()
