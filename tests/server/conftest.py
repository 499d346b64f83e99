"""Server test fixtures.

- ``FakeEngine``: a deterministic in-process engine with the ``AsyncEngine`` API (byte tokenizer,
  output = the prompt's bytes repeated), with a gate that holds requests, so in-process tests of the
  wire format, errors and admission are exact and fast.
- ``ServerProcess``: the real `ferry serve` in a subprocess on a free 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from ferry_server import ServerProcess

from ferry.config import ServerConfig
from ferry.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.server import build_app


class FakeEngineError(RuntimeError):
    """Stands in for ``ferry.engine.async_engine.EngineError`` (a RuntimeError)."""


class ByteTokenizer:
    """id = byte + 3; 0 <pad>, 1 <bos>, 2 <eos> are special."""

    vocab_size = 259
    eos_token_ids = (2,)
    _SPECIAL = {0: "<pad>", 1: "<bos>", 2: "<eos>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i >= 3:
                buf.append(i - 3)
                continue
            out.append(buf.decode(errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._SPECIAL[i])
        out.append(buf.decode(errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0


@dataclass
class FakeEngine:
    """Choice i of a request generates the prompt's tokens cyclically, starting at position i.

    A prompt containing "FAIL" fails after its first token (like an engine step error). While
    ``gate`` is clear, admitted requests wait before producing anything.
    """

    is_running = True
    dead_reason: str | None = None

    max_model_len: int = 256
    model_name: str = "fake-model"
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)
    gate: asyncio.Event | None = None
    running: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    num_total_blocks: int = 64
    started: bool = False
    shut_down: bool = False

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds the context")
        if request_id in self.running:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.running.add(request_id)
        done = False
        metrics = RequestMetrics(arrival_time=time.monotonic())
        try:
            if self.gate is not None:
                await self.gate.wait()
            metrics.first_scheduled_time = time.monotonic()
            outs = [CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None else None)
                    for i in range(params.n)]
            fail = self.tokenizer.encode("FAIL")
            failing = any(ids[k:k + 4] == fail for k in range(len(ids)))
            for step in range(max_tokens):
                await asyncio.sleep(0)
                if failing and step == 1:
                    raise FakeEngineError("step failed")
                for c in outs:
                    if c.finish_reason is not None:
                        continue
                    tok = ids[(c.index + step) % len(ids)]
                    c.token_ids.append(tok)
                    if c.logprobs is not None:
                        top = {tok: -0.25, (tok + 1) % self.tokenizer.vocab_size: -1.5}
                        c.logprobs.append(Logprob(tok, -0.25, dict(list(top.items())[:max(params.logprobs or 0, 1)])))
                    c.text = self.tokenizer.decode(c.token_ids)
                    for s in params.stop:
                        if s in c.text:
                            c.text = c.text[:c.text.index(s)] + (s if params.include_stop_str_in_output else "")
                            c.finish_reason = "stop"
                            break
                    if c.finish_reason is None and len(c.token_ids) >= max_tokens:
                        c.finish_reason = "length"
                done = all(c.finish_reason is not None for c in outs)
                yield RequestOutput(
                    request_id, prompt if isinstance(prompt, str) else None, ids,
                    [CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, None,
                                      list(c.logprobs) if c.logprobs is not None else None)
                     for c in outs],
                    done, num_cached_tokens=min(len(ids), 2), metrics=metrics)
                if done:
                    self.finished.append(request_id)
                    return
        finally:
            self.running.discard(request_id)
            if not done:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.running.discard(request_id)

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.shut_down = True

    def stats(self) -> FakeStats:
        used = len(self.running)
        return FakeStats(num_running=used, num_waiting=0,
                         kv_cache_usage=used / self.num_total_blocks,
                         num_free_blocks=self.num_total_blocks - used,
                         num_total_blocks=self.num_total_blocks)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


def make_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(fake_engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(fake_engine, ServerConfig(), max_num_seqs=4)
    async with make_client(app) as c:
        yield c


# --------------------------------------------------------------------------------------------------
# Real server in a subprocess (tests/ferry_server.py)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(model: str | Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(model, log, *extra, env=env)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()
