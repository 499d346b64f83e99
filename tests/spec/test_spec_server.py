"""`ferry serve --speculative-config` (n-gram) over the real SmolLM2 with the official openai client:
greedy answers, streamed and not, equal plain decoding's; the spec_decode counters on /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from ferry_server import ServerProcess

from ferry import LLM, SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape.",
    "Rewrite this code with x renamed to y:\ndef f(x):\n    return x * x + 2 * x + 1\n",
    "Copy this sentence twice: The quick brown fox jumps over the lazy dog.",
    "Write one sentence about the sea.",
]
MAX_TOKENS = 64
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, ' \
        '"prompt_lookup_min": 1}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("spec-server") / "server.log"
    with ServerProcess(smollm2_path, log, "--kv-cache-memory", "64MiB", "--max-model-len", "1024",
                       "--served-model-name", "smol", "--speculative-config", NGRAM) as s:
        yield s


@pytest.fixture(scope="module")
def expected(smollm2_path: Path) -> list[str]:
    llm = LLM(str(smollm2_path), max_model_len=1024, kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": m}]
                                                  for m in MESSAGES], params)]


def test_answers_and_streams_equal_plain_decoding(server: ServerProcess,
                                                  expected: list[str]) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    for message, want in zip(MESSAGES, expected):
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": message}],
            max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].message.content == want

    async def streams() -> list[tuple[str, int]]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none",
                                     max_retries=0, timeout=300)

        async def one(message: str) -> tuple[str, int]:
            stream = await aclient.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": message}],
                max_tokens=MAX_TOKENS, temperature=0, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return "".join(parts), len(parts)

        return await asyncio.gather(*(one(m) for m in MESSAGES))

    got = asyncio.run(streams())
    assert [text for text, _ in got] == expected  # all four at once: verified in one batch
    m = server.wait_idle()
    drafts = sum(v for k, v in m.items() if k.startswith("ferry:spec_decode_num_drafts_total{"))
    proposed = sum(v for k, v in m.items() if k.startswith("ferry:spec_decode_num_draft_tokens_total{"))
    accepted = sum(v for k, v in m.items()
                   if k.startswith("ferry:spec_decode_num_accepted_tokens_total{"))
    per_pos = {k: v for k, v in m.items()
               if k.startswith("ferry:spec_decode_num_accepted_tokens_per_pos_total{")}
    assert 0 < accepted <= proposed and drafts > 0
    assert len(per_pos) == 4 and sum(per_pos.values()) == accepted
    # several tokens per step: fewer steps than tokens, so the generation counter still counts
    # every token the clients got
    generated = sum(v for k, v in m.items() if k.startswith("ferry:generation_tokens_total"))
    assert generated >= accepted


def test_completions_stream_with_a_stop_string(server: ServerProcess, expected: list[str]) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    want = expected[0]
    stop = "date"
    assert stop in want
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": MESSAGES[0]}], max_tokens=MAX_TOKENS,
        temperature=0, stop=[stop], stream=True)
    chunks = list(r)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want[:want.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
