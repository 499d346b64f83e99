"""Drives load: closed-loop (N requests in flight at all times) or open-loop (Poisson arrivals at a rate).

Each load point is bounded by a request count and/or a duration; after the duration no new request is
sent and the ones in flight finish (each bounded by its own timeout), so a run always ends.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Iterator

import httpx

from ferry.bench.client import RequestResult, SendOptions, Target, send_request
from ferry.bench.memory import MemorySample, PointMemory, scrape_memory
from ferry.bench.metrics import SLO, LoadPointMetrics, compute_metrics
from ferry.bench.workload import RequestSpec, TokenCounter, WorkloadConfig, iter_arrivals, iter_requests

MODES = ("concurrency", "rate")

# Reads a server's memory before and after each load point; None: unknown.
MemoryProbe = Callable[[Target], Awaitable[MemorySample | None]]


async def metrics_probe(target: Target) -> MemorySample | None:
    """The default probe: ``process_resident_memory_bytes`` from the server's ``/metrics``."""
    async with httpx.AsyncClient() as client:
        return await scrape_memory(client, target.base_url, target.headers())


@dataclass(frozen=True)
class LoadPoint:
    """``concurrency``: ``value`` requests kept in flight; ``rate``: ``value`` requests/s (inf: all at once)."""

    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.value > 0:
            raise ValueError(f"{self.mode} must be positive, got {self.value}")
        if self.mode == "concurrency" and (math.isinf(self.value) or self.value != int(self.value)):
            raise ValueError(f"concurrency must be a whole number, got {self.value}")

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c={int(self.value)}"
        return "rate=inf" if math.isinf(self.value) else f"rate={self.value:g}/s"

    def to_json_value(self) -> float | int | str:
        if self.mode == "concurrency":
            return int(self.value)
        return "inf" if math.isinf(self.value) else self.value


@dataclass(frozen=True)
class PointResult:
    target: Target
    load: LoadPoint
    results: tuple[RequestResult, ...]
    metrics: LoadPointMetrics
    memory: PointMemory | None = None  # None: no probe was run


class _Progress:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm  # NOTE: lazy: tests and --no-progress runs never import it

            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def update(self, r: RequestResult) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if not r.ok:
                self._bar.set_postfix_str(f"last error: {r.error_kind}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _client(max_connections: int | None, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s))


def _options_for(opts: SendOptions, index: int) -> SendOptions:
    # NOTE: with sampling, each request gets its own seed (base + index) so reruns send the same requests.
    if opts.temperature > 0 and opts.seed is not None:
        return replace(opts, seed=opts.seed + index)
    return opts


async def _closed_loop(client: httpx.AsyncClient, target: Target, concurrency: int, requests: Iterator[RequestSpec],
                       limit: int | None, deadline: float | None, opts: SendOptions,
                       tokenizer: TokenCounter | None, on_result: Callable[[RequestResult], None]) -> None:
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (limit is None or issued < limit) and (deadline is None or time.perf_counter() < deadline):
            index, spec = issued, next(requests)
            issued += 1  # NOTE: no await between the check and this increment, so workers never overshoot
            on_result(await send_request(client, target, spec, _options_for(opts, index), tokenizer))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(client: httpx.AsyncClient, target: Target, rate: float, requests: Iterator[RequestSpec],
                     limit: int | None, deadline: float | None, start: float, seed: int, opts: SendOptions,
                     tokenizer: TokenCounter | None, on_result: Callable[[RequestResult], None]) -> None:
    async def one(index: int, spec: RequestSpec) -> None:
        on_result(await send_request(client, target, spec, _options_for(opts, index), tokenizer))

    tasks = []
    for index, at in enumerate(iter_arrivals(rate, seed)):
        if limit is not None and index >= limit:
            break
        if deadline is not None and start + at >= deadline:
            break
        delay = start + at - time.perf_counter()
        await asyncio.sleep(max(delay, 0.0))  # NOTE: sleep(0) still lets running streams progress
        tasks.append(asyncio.create_task(one(index, next(requests))))
    await asyncio.gather(*tasks)


async def run_load_point(target: Target, load: LoadPoint, workload: WorkloadConfig, opts: SendOptions,
                         slo: SLO = SLO(), tokenizer: TokenCounter | None = None,
                         progress: bool = False, memory_probe: MemoryProbe | None = None) -> PointResult:
    """Runs one load point against one server and aggregates it; with ``memory_probe``, reads the
    server's memory just before and just after."""
    if load.mode == "rate" and math.isinf(load.value) and workload.num_requests is None:
        raise ValueError("request rate inf needs --num-requests (it would send without end)")
    before = await memory_probe(target) if memory_probe is not None else None
    requests = iter_requests(workload, tokenizer)
    results: list[RequestResult] = []
    bar = _Progress(progress, workload.num_requests, f"{target.label} {load.label}")

    def on_result(r: RequestResult) -> None:
        results.append(r)
        bar.update(r)

    start = time.perf_counter()
    deadline = start + workload.duration_s if workload.duration_s is not None else None
    try:
        if load.mode == "concurrency":
            async with _client(int(load.value), opts.timeout_s) as client:
                await _closed_loop(client, target, int(load.value), requests, workload.num_requests, deadline,
                                   opts, tokenizer, on_result)
        else:
            async with _client(None, opts.timeout_s) as client:
                await _open_loop(client, target, load.value, requests, workload.num_requests, deadline, start,
                                 workload.seed, opts, tokenizer, on_result)
    finally:
        bar.close()
    end = max((r.start + (r.e2e or 0.0) for r in results), default=start)
    metrics = compute_metrics(results, end - start, slo)
    memory = None
    if memory_probe is not None:
        memory = PointMemory(before=before, after=await memory_probe(target))
    return PointResult(target=target, load=load, results=tuple(results), metrics=metrics, memory=memory)


async def warm_up(target: Target, workload: WorkloadConfig, opts: SendOptions, n: int,
                  tokenizer: TokenCounter | None = None) -> list[RequestResult]:
    """Sends ``n`` requests one after another and discards their timings (first-request compile, caches)."""
    requests = iter_requests(workload, tokenizer)
    out = []
    async with _client(1, opts.timeout_s) as client:
        for index in range(n):
            out.append(await send_request(client, target, next(requests), _options_for(opts, index), tokenizer))
    return out


async def run_benchmark(targets: list[Target], loads: list[LoadPoint], workload: WorkloadConfig,
                        opts: SendOptions, slo: SLO = SLO(), tokenizer: TokenCounter | None = None,
                        progress: bool = False, warmup: int = 0,
                        on_point: Callable[[PointResult], None] | None = None,
                        memory_probe: MemoryProbe | None = metrics_probe) -> list[PointResult]:
    """Every target (one after another, so they never compete for the machine) at every load point."""
    out = []
    for target in targets:
        if warmup > 0:
            await warm_up(target, workload, opts, warmup, tokenizer)
        for load in loads:
            point = await run_load_point(target, load, workload, opts, slo, tokenizer, progress,
                                         memory_probe)
            out.append(point)
            if on_point is not None:
                on_point(point)
    return out
