"""Prometheus metrics in the ``ferry_gateway:`` namespace, on a registry owned by one app."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from ferry.gateway.backends.base import Backend

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# NOTE: the states of ``health.BackendStates``, spelled here so that metrics need not import health
BACKEND_STATES = ("unknown", "up", "down")


class _BackendCollector(Collector):
    """In-flight counts and states read live at scrape time, so they can never drift."""

    def __init__(self, backends: Mapping[str, Backend], state: Callable[[Backend], str]) -> None:
        self._backends = backends
        self._state = state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        inflight = GaugeMetricFamily("ferry_gateway:backend_inflight", "requests in flight to a backend",
                                     labels=["backend", "location"])
        up = GaugeMetricFamily("ferry_gateway:backend_up", "1 while a backend is known up: its circuit is "
                               "closed and it has answered (0 while unknown)", labels=["backend", "location"])
        states = GaugeMetricFamily("ferry_gateway:backend_state", "1 for a backend's current state: unknown "
                                   "(not answered yet), up or down", labels=["backend", "location", "state"])
        for b in self._backends.values():
            inflight.add_metric([b.name, b.location], b.inflight)
            current = self._state(b)
            up.add_metric([b.name, b.location], 1.0 if current == "up" else 0.0)
            for s in BACKEND_STATES:
                states.add_metric([b.name, b.location, s], 1.0 if current == s else 0.0)
        yield inflight
        yield up
        yield states


class GatewayMetrics:
    def __init__(self, backends: Mapping[str, Backend],
                 state: Callable[[Backend], str] = lambda b: "up" if b.up else "down") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ferry_gateway:requests", "requests by outcome",
                                ["backend", "location", "data_class", "status"], registry=r)
        self.overflow = Counter("ferry_gateway:overflow", "requests sent to the cloud because on-prem was full",
                                registry=r)
        self.blocked = Counter("ferry_gateway:blocked", "requests refused before any backend", ["reason"],
                               registry=r)
        # NOTE: one count per detector that fired on a request (several per request at most);
        # "scan_failed:<reason>" counts bodies that could not be classified and were kept on-prem.
        self.pii_detections = Counter("ferry_gateway:pii_detections", "requests on which a PII detector fired",
                                      ["detector"], registry=r)
        self.failovers = Counter("ferry_gateway:failovers", "attempts that failed and moved on", ["backend"],
                                 registry=r)
        self.cost = Counter("ferry_gateway:cost_usd", "spend in USD, on-prem amortized cost included",
                            ["backend", "location"], registry=r)
        self.prompt_tokens = Counter("ferry_gateway:prompt_tokens", "prompt tokens by backend", ["backend"],
                                     registry=r)
        self.completion_tokens = Counter("ferry_gateway:completion_tokens", "completion tokens by backend",
                                         ["backend"], registry=r)
        self.latency = Histogram("ferry_gateway:request_latency_seconds", "end-to-end latency", ["backend"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ferry_gateway:time_to_first_token_seconds", "time to the first streamed byte",
                              ["backend"], buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_BackendCollector(backends, state))


def counter_total(counter: MetricWrapperBase, **labels: str) -> float:
    """A counter's ``_total`` summed over its label sets that match ``labels``."""
    return sum(sample.value for metric in counter.collect() for sample in metric.samples
               if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()))


class GatewayStats:
    """The periodic log line: requests, refusals, overflow share and spend over the interval, and the
    backends' states now (``ferry gateway --log-stats-interval``)."""

    def __init__(self, metrics: GatewayMetrics, backends: Mapping[str, Backend],
                 state: Callable[[Backend], str]) -> None:
        self._metrics = metrics
        self._backends = backends
        self._state = state
        self._last: tuple[float, ...] | None = None
        self._was_idle = False

    def _totals(self) -> tuple[float, ...]:
        m = self._metrics
        return (counter_total(m.requests), counter_total(m.requests, status="200"), counter_total(m.blocked),
                counter_total(m.overflow), counter_total(m.cost))

    def summary(self, seconds: float) -> str | None:
        now = self._totals()
        last = self._last or tuple(0.0 for _ in now)
        self._last = now
        requests, ok, refused, overflow, spend = (a - b for a, b in zip(now, last))
        inflight = sum(b.inflight for b in self._backends.values())
        idle = not (requests or refused or inflight)
        if idle and self._was_idle:
            return None  # NOTE: one idle line, then quiet until something happens
        self._was_idle = idle
        states = [self._state(b) for b in self._backends.values()]
        share = overflow / ok * 100 if ok else 0.0
        return (f"Requests: {requests:.0f} ({requests / seconds:.1f}/s), ok: {ok:.0f}, refused: {refused:.0f}, "
                f"in flight: {inflight}, overflow to cloud: {overflow:.0f} ({share:.1f}% of ok), "
                f"spend: ${spend:.6f} (${spend / seconds * 3600:.4f}/h), backends: {states.count('up')} up, "
                f"{states.count('unknown')} unknown, {states.count('down')} down")
