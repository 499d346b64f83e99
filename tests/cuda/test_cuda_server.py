"""The real `ferry serve --device cuda` answering the openai client (plain, streamed, concurrent)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from ferry_server import ServerProcess

from ferry import LLM, SamplingParams

PROMPTS = [f"Write one sentence about {t}." for t in ("the sea", "a cat", "coffee", "rain", "trains",
                                                      "the moon", "bread", "owls")]


@pytest.fixture(scope="module")
def cuda_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("cuda-serve") / "serve.log"
    with ServerProcess(smollm2_path, log, "--device", "cuda", "--dtype", "float32", "--gpu-memory-utilization",
                       "0.2", "--max-model-len", "1024", "--served-model-name", "smol",
                       "--log-level", "info") as server:
        yield server


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_answers_on_the_gpu(cuda_server: ServerProcess) -> None:
    r = client(cuda_server).chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    assert "on cuda" in cuda_server.log()  # the KV cache line names the device


def test_concurrent_streams_match_llm_generate_on_cuda(cuda_server: ServerProcess, smollm2_path: Path) -> None:
    llm = LLM(str(smollm2_path), device="cuda", dtype="float32", max_model_len=1024, kv_cache_memory=256 << 20)
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)]
    del llm

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=cuda_server.base_url + "/v1", api_key="none", max_retries=0,
                                     timeout=300)

        async def one(prompt: str) -> str:
            stream = await aclient.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0,
                stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))

    assert asyncio.run(run()) == expected
    idle = cuda_server.wait_idle()
    assert idle  # the pool is whole again
