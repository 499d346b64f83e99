"""Prometheus metrics in the ``ferry_gateway:`` namespace, on a registry owned by one app."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ferry.gateway.backends.base import Backend

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _BackendCollector(Collector):
    """In-flight counts and up/down read live at scrape time, so they can never drift."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = backends

    def collect(self) -> Iterable[GaugeMetricFamily]:
        inflight = GaugeMetricFamily("ferry_gateway:backend_inflight", "requests in flight to a backend",
                                     labels=["backend", "location"])
        up = GaugeMetricFamily("ferry_gateway:backend_up", "1 while a backend's circuit is closed",
                               labels=["backend", "location"])
        for b in self._backends.values():
            inflight.add_metric([b.name, b.location], b.inflight)
            up.add_metric([b.name, b.location], 1.0 if b.up else 0.0)
        yield inflight
        yield up


class GatewayMetrics:
    def __init__(self, backends: Mapping[str, Backend]) -> None:
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
        r.register(_BackendCollector(backends))
