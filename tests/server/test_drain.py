"""SIGTERM on a real `ferry serve` with long streams in flight: a clean drain.

What must hold, whatever moment the signal lands at:
- every running stream keeps receiving tokens after the signal, and ends either with its
  finish_reason and [DONE] (it finished within --shutdown-timeout) or with an in-band
  ``server_shutting_down`` error event and [DONE] (it did not): never with a dropped connection;
- new requests get 503 ``server_shutting_down`` meanwhile;
- the process exits 0 within the timeout plus a few seconds.

The engine loop owns the server's main thread, which is also where Python runs signal handlers, so
these tests are also the ones that would see a signal handler stalling the engine. Every wait is
bounded; only exits get (generous) time bounds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferry.config import CacheConfig, EngineConfig, ModelConfig
from ferry.engine import async_engine
from ferry.sampling_params import SamplingParams
from ferry.server.command import DrainingServer
from ferry.server.metrics import parse_prometheus, sample
from ferry.sse import DONE, aiter_sse_data

from .conftest import ServerProcess

SERVER_FLAGS = ("--max-num-seqs", "16", "--kv-cache-memory", "16MiB")
EXIT_SLACK_S = 8.0  # "a few seconds" past the timeout: process teardown on a loaded CI machine
WAIT_S = 120.0  # the bound on any single wait for tokens


@dataclass
class StreamLog:
    """One streamed completion as the client saw it: each SSE payload with its arrival time."""

    status: int | None = None
    events: list[tuple[float, str]] = field(default_factory=list)
    body: bytes = b""  # the body of a non-200 answer
    transport_error: str | None = None  # a dropped connection, a timeout

    @property
    def chunks(self) -> int:
        return sum(1 for _, data in self.events if data != DONE)

    def chunks_after(self, t: float) -> int:
        return sum(1 for at, data in self.events if at > t and data != DONE)

    def outcome(self) -> str:
        """'finished' (finish_reason, then [DONE]) or 'ended' (a shutdown error event, [DONE])."""
        assert self.transport_error is None, f"the stream broke: {self.transport_error}"
        assert self.status == 200, (self.status, self.body)
        assert self.events and self.events[-1][1] == DONE, f"no [DONE] at the end: {self.events[-2:]}"
        payloads = [json.loads(data) for _, data in self.events[:-1]]
        assert payloads, "no chunk before [DONE]"
        assert all("error" not in p for p in payloads[:-1]), "an error event before the last one"
        last = payloads[-1]
        if "error" in last:
            assert_shutting_down(last)
            return "ended"
        assert last["choices"][0]["finish_reason"] == "length", last
        return "finished"


def assert_shutting_down(body: dict[str, Any]) -> None:
    error = body["error"]
    assert error["code"] == "server_shutting_down", body
    assert error["type"] == "service_unavailable" and error["message"], body


async def run_stream(client: httpx.AsyncClient, log: StreamLog, max_tokens: int, i: int) -> None:
    body = {"model": "m", "prompt": f"Stream number {i} tells a long story:", "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            log.status = r.status_code
            if r.status_code != 200:
                log.body = await r.aread()
                return
            async for data in aiter_sse_data(r):
                log.events.append((time.monotonic(), data))
    except httpx.TransportError as exc:
        log.transport_error = repr(exc)


async def until(predicate: Any, what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate()`` (a bool, or an awaitable of one) until true, for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        ok = predicate()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def draining(client: httpx.AsyncClient) -> bool:
    return (await client.get("/health")).status_code == 503


async def running(client: httpx.AsyncClient) -> float:
    r = await client.get("/metrics")
    return sample(parse_prometheus(r.text), "ferry:num_requests_running")


async def wait_exit(server: ServerProcess, timeout: float) -> int:
    assert server.proc is not None
    try:
        return await asyncio.to_thread(server.proc.wait, timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"server still running {timeout:.0f}s after the signal:\n"
                             f"{server.log()[-3000:]}") from exc


@pytest.fixture
async def started(server_factory: Any, tiny_llama_dir: Path) -> AsyncIterator[Any]:
    """start(timeout) -> a ready server on the tiny model, with an httpx client on it."""
    clients: list[httpx.AsyncClient] = []

    async def start(shutdown_timeout: float) -> tuple[ServerProcess, httpx.AsyncClient]:
        server = server_factory(tiny_llama_dir, *SERVER_FLAGS, "--served-model-name", "m",
                                "--shutdown-timeout", str(shutdown_timeout))
        await asyncio.to_thread(server.wait_ready)
        client = httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(WAIT_S),
                                   limits=httpx.Limits(max_connections=32))
        clients.append(client)
        return server, client

    yield start
    for c in clients:
        await c.aclose()


def streams(client: httpx.AsyncClient, logs: list[StreamLog],
            max_tokens: int, first: int = 0) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(run_stream(client, log, max_tokens, first + i))
            for i, log in enumerate(logs)]


async def finish(tasks: list[asyncio.Task[None]], timeout: float = WAIT_S) -> None:
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    assert not pending, f"{len(pending)} streams still open after {timeout:.0f}s"
    for t in done:
        t.result()


# ------------------------------------------------------------------------------ streams finish


@pytest.mark.parametrize("moment", ["first_token", "mid_stream", "staggered"])
async def test_running_streams_keep_receiving_tokens_and_finish(started: Any, moment: str) -> None:
    """The signal lands at the first token, mid-way, or with streams at different points; with a
    long --shutdown-timeout every stream runs to its finish_reason."""
    server, client = await started(60)
    max_tokens = 300
    logs = [StreamLog() for _ in range(4)]
    if moment == "staggered":
        tasks = streams(client, logs[:2], max_tokens)
        await until(lambda: min(log.chunks for log in logs[:2]) >= 60, "the first wave")
        tasks += streams(client, logs[2:], max_tokens, first=2)
        await until(lambda: min(log.chunks for log in logs[2:]) >= 1, "the second wave")
    else:
        tasks = streams(client, logs, max_tokens)
        need = 1 if moment == "first_token" else max_tokens // 3
        await until(lambda: min(log.chunks for log in logs) >= need, f"{need} chunks each")

    t_signal = time.monotonic()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)

    # draining: /health and new requests get 503 while the streams go on
    await until(lambda: draining(client), "/health to say 503")
    late = await client.post("/v1/completions", json={"model": "m", "prompt": "too late",
                                                       "max_tokens": 2})
    assert late.status_code == 503
    assert_shutting_down(late.json())

    await finish(tasks)
    t_end = time.monotonic()
    for log in logs:
        assert log.outcome() == "finished"
        assert log.chunks_after(t_signal) >= 1, "no token after the signal"
    assert await wait_exit(server, EXIT_SLACK_S + DrainingServer.GRACE_S) == 0
    assert time.monotonic() - t_end < EXIT_SLACK_S + DrainingServer.GRACE_S


# ------------------------------------------------------------------------------ timeout passes


@pytest.mark.parametrize("shutdown_timeout", [0.0, 1.0])
async def test_streams_past_the_timeout_end_with_an_error_event(started: Any,
                                                                shutdown_timeout: float) -> None:
    """Streams too long for --shutdown-timeout get a server_shutting_down error event and [DONE]
    (a non-streaming request a 503), and the process exits soon after the timeout."""
    server, client = await started(shutdown_timeout)
    max_tokens = 480  # the tiny model's context is 512
    logs = [StreamLog() for _ in range(4)]
    tasks = streams(client, logs, max_tokens)
    blocking = asyncio.create_task(client.post("/v1/completions", json={
        "model": "m", "prompt": "A blocking request", "max_tokens": max_tokens,
        "ignore_eos": True}))
    await until(lambda: min(log.chunks for log in logs) >= 1, "a first token on every stream")

    async def all_running() -> bool:
        return await running(client) >= len(logs) + 1

    await until(all_running, "the blocking request to run")

    t_signal = time.monotonic()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    await finish(tasks)
    rc = await wait_exit(server, shutdown_timeout + DrainingServer.GRACE_S + EXIT_SLACK_S)
    assert rc == 0
    assert time.monotonic() - t_signal < shutdown_timeout + DrainingServer.GRACE_S + EXIT_SLACK_S

    outcomes = [log.outcome() for log in logs]
    answer = await asyncio.wait_for(blocking, WAIT_S)
    if shutdown_timeout == 0:
        # NOTE: 479 tokens to go at the signal: none can finish before an immediate deadline
        assert outcomes == ["ended"] * len(logs)
        assert answer.status_code == 503
        assert_shutting_down(answer.json())
    else:
        for log in logs:  # the streams went on until the deadline
            assert log.chunks_after(t_signal) >= 1, "no token after the signal"
        assert answer.status_code in (200, 503)
        if answer.status_code == 503:
            assert_shutting_down(answer.json())


async def test_a_second_signal_ends_the_streams_at_once(started: Any) -> None:
    server, client = await started(60)
    logs = [StreamLog() for _ in range(3)]
    tasks = streams(client, logs, 480)
    await until(lambda: min(log.chunks for log in logs) >= 1, "a first token on every stream")
    assert server.proc is not None
    t_first = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    await until(lambda: min(log.chunks_after(t_first) for log in logs) >= 5,
                "tokens after the first signal")
    t_second = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    await finish(tasks)
    assert [log.outcome() for log in logs] == ["ended"] * len(logs)
    assert await wait_exit(server, DrainingServer.GRACE_S + EXIT_SLACK_S) == 0
    assert time.monotonic() - t_second < DrainingServer.GRACE_S + EXIT_SLACK_S


# ------------------------------------------------------------------------------ the engine side


@pytest.fixture
def engine(tiny_llama_dir: Path) -> Iterator[async_engine.AsyncEngine]:
    eng = async_engine.AsyncEngine.from_config(
        EngineConfig(ModelConfig(str(tiny_llama_dir)), CacheConfig(kv_cache_memory=8 << 20)))
    eng.start()
    yield eng
    eng.shutdown()


async def test_shutdown_fails_open_streams_even_while_a_step_runs(
        engine: async_engine.AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streams end at shutdown() itself, not when the engine thread gets to it: a long step
    (here one held on a gate) cannot delay the shutdown error past the drain deadline."""
    stream = engine.generate("a long story", SamplingParams(max_tokens=400, ignore_eos=True), "x")
    await anext(stream)
    gate, in_step = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def held_step() -> list[Any]:
        in_step.set()
        gate.wait(WAIT_S)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", held_step)
    try:
        assert await asyncio.to_thread(in_step.wait, WAIT_S)
        engine.shutdown(timeout=0, reason="bye now")
        with pytest.raises(async_engine.EngineStoppedError, match="bye now"):
            async with asyncio.timeout(WAIT_S):
                while True:
                    await anext(stream)
        with pytest.raises(async_engine.EngineStoppedError, match="bye now"):
            await anext(engine.generate("too late", SamplingParams(max_tokens=2), "y"))
    finally:
        gate.set()
    await until(lambda: not engine.is_running, "the engine thread to return")
    assert engine.dead_reason is None  # stopped, not crashed
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_shutdown_before_the_loop_runs_makes_it_return_at_once(tiny_llama_dir: Path) -> None:
    """`ferry serve` loads on the main thread, then runs the loop there; a SIGTERM during the load
    shuts the engine down from the HTTP thread before the loop runs. The loop must then return at
    once instead of running on with nobody left to stop it (the process would never exit)."""
    eng = async_engine.AsyncEngine.from_config(
        EngineConfig(ModelConfig(str(tiny_llama_dir)), CacheConfig(kv_cache_memory=8 << 20)))
    eng.shutdown(timeout=0)
    loop = threading.Thread(target=eng.run_forever, name="late-loop", daemon=True)
    loop.start()
    loop.join(30)
    assert not loop.is_alive(), "run_forever() ignored the earlier shutdown()"
    assert not eng.is_running
