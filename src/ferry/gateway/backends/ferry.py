"""A `ferry serve` replica (or vLLM): OpenAI-compatible, plus Prometheus load signals at /metrics."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ferry.gateway.backends.base import Backend, LoadSignals, UpstreamError

_WANTED = {"ferry:num_requests_running": "running", "ferry:num_requests_waiting": "waiting",
           "ferry:kv_cache_usage_perc": "kv_cache_usage",
           # vLLM publishes the same gauges under its own namespace
           "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_cache_usage", "vllm:gpu_cache_usage_perc": "kv_cache_usage"}


def parse_load(text: str) -> LoadSignals:
    """Sum each gauge over its label sets (one per served model)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = _WANTED.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name == family.name:
                found[field] = found.get(field, 0.0) + float(sample.value)
    return LoadSignals(**found)


class FerryBackend(Backend):
    async def scrape(self) -> None:
        url = self.config.scrape_url
        assert url is not None  # NOTE: BackendConfig derives it for every ferry backend
        try:
            resp = await self.client.get(url, timeout=self._health_timeout)
            resp.raise_for_status()
        except httpx.HTTPError as e:
            # NOTE: stale signals would keep routing on a load we can no longer see; forget them.
            self.signals = LoadSignals()
            raise UpstreamError(self.name, "metrics", str(e) or type(e).__name__) from e
        try:
            self.signals = parse_load(resp.text)
        except ValueError as e:
            # NOTE: a 200 that is not Prometheus text (a proxy's HTML page) must fail this scrape only;
            # raised on, it would stop the scrape loop (and the gateway's start-up) for every backend.
            self.signals = LoadSignals()
            raise UpstreamError(self.name, "metrics", f"not Prometheus text: {e}") from e
