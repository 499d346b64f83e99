"""Gateway test harness: upstreams and gateways as real HTTP servers on 127.0.0.1 free ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from ferry.gateway.app import create_app
from ferry.gateway.config import GatewayConfig, parse_config
from gateway.upstream import ServerThread, UpstreamState, start_upstream

MASTER = "master-secret"
ENV = {"FERRY_MASTER_KEY": MASTER, "CLOUD_API_KEY": "cloud-secret"}


def backend(name: str, server: ServerThread, location: str, kind: str = "ferry", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "url": server.url + "/v1", "location": location, "kind": kind,
                         "max_concurrency": 4, "timeout": 5, "connect_timeout": 1,
                         "input_per_mtok": 0.05 if location == "onprem" else 0.15,
                         "output_per_mtok": 0.10 if location == "onprem" else 0.60}
    if location == "cloud":
        d["api_key_env"] = "CLOUD_API_KEY"
    d.update(kw)
    return d


def config_dict(backends: list[dict[str, Any]], database: str, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "backends": backends,
        "models": [{"name": "chat", "deployments": [{"backend": b["name"], "model": f"{b['name']}-model"}
                                                    for b in backends]}],
        "routing": {"policy": "onprem-first", "queue_timeout": 1.0, "metrics_interval": 0.1},
        "health": {"interval": 0.1, "timeout": 1, "failure_threshold": 2, "cooldown": 0.3},
        "data_classes": {"public": {"locations": ["onprem", "cloud"]},
                         "internal": {"locations": ["onprem", "cloud"]},
                         "restricted": {"locations": ["onprem"]}},
        "default_data_class": "public",
        "pii": {"enabled": True},
        "database": database,
        "master_key_env": "FERRY_MASTER_KEY",
    }
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return data


class GatewayHarness:
    def __init__(self, config: GatewayConfig, instance: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.app = create_app(config, {**ENV, **(env or {})}, instance=instance)
        self.gw = self.app.state.gateway
        self.server = ServerThread(self.app).start()
        self.admin = httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {MASTER}"},
                                  timeout=30)

    @property
    def url(self) -> str:
        return self.server.url

    def create_key(self, **spec: Any) -> str:
        spec.setdefault("name", "k")
        r = self.admin.post("/admin/keys", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def openai(self, key: str) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def ledger(self, settled: bool = True) -> list[dict[str, Any]]:
        """The ledger's rows; ``settled`` waits out rows still in flight (a stream's row is written
        just after its last byte, so a client can finish reading before it lands)."""
        if settled:
            self.wait_for(lambda: all(r["status"] != 0 for r in self.gw.ledger.rows()), what="ledger rows")
        return self.gw.ledger.rows()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def close(self) -> None:
        self.admin.close()
        self.server.stop()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., tuple[UpstreamState, ServerThread]]]:
    started: list[ServerThread] = []

    def start(name: str, **kw: Any) -> tuple[UpstreamState, ServerThread]:
        state, server = start_upstream(name, **kw)
        started.append(server)
        return state, server

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def gateway(tmp_path: Any) -> Iterator[Callable[..., GatewayHarness]]:
    made: list[GatewayHarness] = []

    def make(backends: list[dict[str, Any]], database: str | None = None, instance: str | None = None,
             env: dict[str, str] | None = None, **top: Any) -> GatewayHarness:
        db = database or f"sqlite:///{tmp_path}/gateway.db"
        h = GatewayHarness(parse_config(config_dict(backends, db, **top)), instance, env)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
