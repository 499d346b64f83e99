"""Prometheus metrics in the ``ferry:`` namespace, named like vLLM's so its dashboards map one to one.

Each app owns its own ``CollectorRegistry`` (no process-global default registry), so several apps
can live in one process (tests) without clashing.

Engine-side state (running/waiting, KV usage, preemptions, prefix-cache counters) is read from
``engine.stats()`` at scrape time by a custom collector; request-side series (tokens, latencies,
finish reasons) are recorded by the routes as outputs stream by.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ferry.outputs import FINISH_ABORT, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets copied from vLLM's metrics so histograms line up with its dashboards.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def _token_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's build_1_2_5_buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(out)
            out.append(float(value))
        exponent += 1


class StatsSource(Protocol):
    """What the collector needs from the engine's ``stats()`` result."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    # speculative decoding (None: off); read with getattr, so other sources may leave it out
    # spec_decode: SpecDecodeSource | None


class SpecDecodeSource(Protocol):
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: tuple[int, ...]


class _EngineStatsCollector(Collector):
    def __init__(self, get_stats: Callable[[], StatsSource | None], model_name: str) -> None:
        self._get_stats = get_stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._get_stats()
        if stats is None:  # model still loading: no engine series yet
            return
        labels = ["model_name"]
        values = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("ferry:num_requests_running", "Requests in the engine's running batch.",
                    stats.num_running)
        yield gauge("ferry:num_requests_waiting", "Requests waiting in the engine's queue.",
                    stats.num_waiting)
        yield gauge("ferry:kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.",
                    stats.kv_cache_usage)
        yield counter("ferry:num_preemptions", "Cumulative preemptions by the scheduler.",
                      stats.num_preemptions_total)
        yield counter("ferry:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries_total)
        yield counter("ferry:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits_total)
        spec: SpecDecodeSource | None = getattr(stats, "spec_decode", None)
        if spec is not None:  # NOTE: as vLLM, the spec_decode series exist only when it is on
            yield counter("ferry:spec_decode_num_drafts",
                          "Verification steps with at least one proposed token.", spec.num_drafts)
            yield counter("ferry:spec_decode_num_draft_tokens", "Proposed tokens verified.",
                          spec.num_draft_tokens)
            yield counter("ferry:spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                          spec.num_accepted_tokens)
            per_pos = CounterMetricFamily("ferry:spec_decode_num_accepted_tokens_per_pos",
                                          "Proposed tokens accepted, by position in the proposal.",
                                          labels=[*labels, "position"])
            for position, accepted in enumerate(spec.accepted_per_position):
                per_pos.add_metric([*values, str(position)], accepted)
            yield per_pos


@dataclass
class _SeqState:
    tokens: int = 0


@dataclass
class RequestRecorder:
    """Follows one engine request's cumulative outputs and records its series once."""

    metrics: ServerMetrics
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    seqs: dict[int, _SeqState] = field(default_factory=dict)
    done: bool = False

    @property
    def generated_tokens(self) -> int:
        return sum(s.tokens for s in self.seqs.values())

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    def on_output(self, out: RequestOutput) -> None:
        m = self.metrics
        now = time.monotonic()
        new_tokens = 0
        for comp in out.outputs:
            seq = self.seqs.setdefault(comp.index, _SeqState())
            new_tokens += len(comp.token_ids) - seq.tokens
            seq.tokens = len(comp.token_ids)
        if new_tokens > 0:
            if self.first_token is None:
                self.first_token = now
                self.prompt_tokens = len(out.prompt_token_ids)
                m.prompt_tokens.labels(m.model_name).inc(self.prompt_tokens)
                m.ttft.labels(m.model_name).observe(now - self.start)
                queue = _queue_time(out)
                if queue is not None:
                    m.queue_time.labels(m.model_name).observe(queue)
            elif self.last_token is not None:
                # NOTE: one engine step may bring several tokens (n > 1); each gets an equal share.
                per_token = (now - self.last_token) / new_tokens
                for _ in range(new_tokens):
                    m.itl.labels(m.model_name).observe(per_token)
                    # NOTE: vLLM's time_per_output_token_seconds is this same per-token interval
                    # (its old name for inter_token_latency_seconds, which dashboards still read).
                    m.tpot.labels(m.model_name).observe(per_token)
            self.last_token = now
            m.generation_tokens.labels(m.model_name).inc(new_tokens)
        if out.finished and not self.done:
            self.done = True
            # NOTE: one count per request, as vLLM does, labelled with its first choice's reason;
            # n choices are one request, not n.
            reason = min(out.outputs, key=lambda c: c.index).finish_reason if out.outputs else None
            if reason is not None and reason != FINISH_ABORT:
                m.request_success.labels(m.model_name, reason).inc()
            m.e2e.labels(m.model_name).observe(now - self.start)
            m.request_prompt_tokens.labels(m.model_name).observe(len(out.prompt_token_ids))
            m.request_generation_tokens.labels(m.model_name).observe(self.generated_tokens)
            # NOTE: as vLLM, the longest choice's length: what the request's n choices needed at most.
            m.request_max_generation_tokens.labels(m.model_name).observe(
                max((s.tokens for s in self.seqs.values()), default=0))
            phases = _phase_times(out)
            if phases is not None:
                m.prefill_time.labels(m.model_name).observe(phases[0])
                m.decode_time.labels(m.model_name).observe(phases[1])


def _queue_time(out: RequestOutput) -> float | None:
    mt = out.metrics
    if mt is None or mt.first_scheduled_time is None:
        return None
    return max(0.0, mt.first_scheduled_time - mt.arrival_time)


def _phase_times(out: RequestOutput) -> tuple[float, float] | None:
    """(prefill, decode) of a finished request: first scheduled -> first token -> last token, on the
    engine's clock, as vLLM measures them; None when it never produced a token."""
    mt = out.metrics
    if mt is None or mt.first_token_time is None:
        return None
    scheduled = mt.first_scheduled_time if mt.first_scheduled_time is not None else mt.arrival_time
    last = mt.last_token_time if mt.last_token_time is not None else mt.first_token_time
    return max(0.0, mt.first_token_time - scheduled), max(0.0, last - mt.first_token_time)


class ServerMetrics:
    """All series of one app, in the app's own registry."""

    def __init__(self, model_name: str, max_model_len: int,
                 get_stats: Callable[[], StatsSource | None]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_resident_memory_bytes & co., which `ferry bench` reports beside its figures
        ProcessCollector(registry=r)
        labels = ["model_name"]
        tokens = _token_buckets(max_model_len)
        self.prompt_tokens = Counter("ferry:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=r)
        self.generation_tokens = Counter("ferry:generation_tokens", "Generation tokens produced.",
                                         labels, registry=r)
        self.request_success = Counter(
            "ferry:request_success", "Finished requests, by their first choice's finish reason.",
            [*labels, "finished_reason"], registry=r)
        self.admission_rejections = Counter(
            "ferry:admission_rejections", "Requests answered 429 by admission control.", labels,
            registry=r)
        self.ttft = Histogram("ferry:time_to_first_token_seconds",
                              "Time from request arrival to its first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("ferry:inter_token_latency_seconds", "Time between output tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.tpot = Histogram("ferry:time_per_output_token_seconds",
                              "Time per output token: the same per-token intervals as "
                              "inter_token_latency_seconds, under vLLM's older name.", labels,
                              buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("ferry:e2e_request_latency_seconds",
                             "Time from request arrival to its last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("ferry:request_queue_time_seconds",
                                    "Time a request waited before its first schedule.", labels,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("ferry:request_prefill_time_seconds",
                                      "Time from a request's first schedule to its first token.",
                                      labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("ferry:request_decode_time_seconds",
                                     "Time from a request's first token to its last.", labels,
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("ferry:request_prompt_tokens",
                                               "Prompt tokens per request.", labels,
                                               buckets=tokens, registry=r)
        self.request_generation_tokens = Histogram("ferry:request_generation_tokens",
                                                   "Generated tokens per request.", labels,
                                                   buckets=tokens, registry=r)
        self.request_max_generation_tokens = Histogram(
            "ferry:request_max_num_generation_tokens",
            "Generated tokens of a request's longest choice (of its n).", labels, buckets=tokens,
            registry=r)
        r.register(_EngineStatsCollector(get_stats, model_name))

    def recorder(self) -> RequestRecorder:
        return RequestRecorder(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_prometheus(text: str) -> dict[str, float]:
    """Tiny parser for tests and tools: ``'name{labels}' -> value`` for each sample line."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def sample(samples: dict[str, float], name: str, **labels: Any) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
