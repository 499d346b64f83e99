"""Deploy a ferry application on the tests' local Ray instance, and remove it again."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


from ferry.cluster.deploy import build_application, shutdown
from ferry.cluster.spec import ModelSpec
from ferry.server.metrics import parse_prometheus

API_KEY = "cluster-test-key"


@dataclass
class Deployed:
    name: str
    base_url: str  # the application's root (its route prefix included)

    def replicas(self) -> list[dict]:
        return httpx.get(self.base_url + "/health/replicas", timeout=10).json()["replicas"]

    def healthy(self) -> list[dict]:
        return [r for r in self.replicas() if r["healthy"]]

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(httpx.get(self.base_url + "/metrics", timeout=10).text)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns a true value (returned); AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = predicate()
        except (httpx.TransportError, KeyError, ValueError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def deploy(port: int, spec: ModelSpec, timeout: float = 300.0, healthy: int | None = None) -> Deployed:
    serve.run(build_application(spec), name=spec.name, route_prefix=spec.route_prefix,
              blocking=False)
    app = Deployed(spec.name, f"http://127.0.0.1:{port}{spec.route_prefix.rstrip('/')}")
    want = healthy if healthy is not None else spec.num_replicas

    def ready() -> bool:
        r = httpx.get(app.base_url + "/health/replicas", timeout=5)
        return r.status_code == 200 and r.json()["healthy"] == want

    wait_for(ready, timeout, f"{spec.name}: {want} healthy replica(s)")
    return app


def undeploy(app: Deployed) -> None:
    shutdown([app.name])
