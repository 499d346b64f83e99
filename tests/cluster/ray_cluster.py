"""Deploy a ferry application on the tests' local Ray instance, and remove it again."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


from ferry.cluster.deploy import build_application, shutdown
from ferry.cluster.spec import ModelSpec

API_KEY = "cluster-test-key"


@dataclass
class Deployed:
    name: str
    base_url: str

    def replicas(self) -> list[dict]:
        return httpx.get(self.base_url + "/health/replicas", timeout=10).json()["replicas"]


def deploy(port: int, spec: ModelSpec, timeout: float = 300.0) -> Deployed:
    serve.run(build_application(spec), name=spec.name, route_prefix=spec.route_prefix,
              blocking=False)
    app = Deployed(spec.name, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(app.base_url + "/health/replicas", timeout=5)
            if r.status_code == 200 and r.json()["healthy"] == spec.num_replicas:
                return app
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{spec.name}: replicas not healthy in {timeout}s")


def undeploy(app: Deployed) -> None:
    shutdown([app.name])
