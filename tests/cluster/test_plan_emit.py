"""`ferry plan --emit` end to end: the emitted cluster.yaml deploys ferry's default model on the tests' local Ray
Serve, a real gateway starts from the emitted gateway.yaml (its on-prem backend pointed at the Ray ingress), and
a request through the gateway is answered by the Ray replica."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from gateway.upstream import ServerThread

from ferry.cli import main
from ferry.cluster.deploy import deploy, shutdown
from ferry.cluster.spec import ClusterSpec, load_spec
from ferry.gateway.app import create_app
from ferry.gateway.config import parse_config

pytestmark = pytest.mark.slow

MASTER = "plan-emit-master"
# ferry's built-in model on a CPU, a small KV pool, one CPU per replica; every request must stay on-prem
PLAN = ["plan", "--model", "smollm2-135m-instruct", "--gpu", "cpu", "--kv-cache-memory", "256MiB", "--context",
        "2048", "--replica-cpus", "1", "--rps", "0.5", "--restricted-share", "1"]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "emit"
    assert main([*PLAN, "--emit", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ray_app(http_port: int, emitted: Path) -> Iterator[str]:
    """The emitted cluster.yaml deployed on the shared Ray instance: its HTTP port instead of the file's, and a
    route prefix of its own beside the folder's other applications."""
    spec = load_spec(emitted / "cluster.yaml")
    (model,) = spec.models
    model = replace(model, route_prefix="/plan-emit")
    deploy(ClusterSpec((model,), "127.0.0.1", http_port, None))
    base = f"http://127.0.0.1:{http_port}/plan-emit"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(base + "/health/replicas", timeout=5)
                if r.status_code == 200 and r.json()["healthy"] == model.num_replicas:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the emitted replica did not become healthy in 60 s"
            time.sleep(0.5)
        yield base
    finally:
        shutdown([model.name])


def test_a_request_through_the_emitted_gateway_reaches_the_emitted_ray_replica(
        emitted: Path, ray_app: str, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    raw = yaml.safe_load((emitted / "gateway.yaml").read_text())
    (onprem,) = raw["backends"]
    assert onprem["location"] == "onprem" and onprem["kind"] == "ferry"
    onprem["url"] = ray_app + "/v1"  # NOTE: the file's URL is the ingress at cluster.yaml's default host:port
    raw["database"] = f"sqlite:///{tmp_path}/gateway.db"
    config = parse_config(raw)
    server = ServerThread(create_app(config, {"FERRY_MASTER_KEY": MASTER})).start()
    try:
        admin = httpx.post(server.url + "/admin/keys", json={"name": "plan-emit"},
                           headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)
        assert admin.status_code == 201, admin.text
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=admin.json()["key"], max_retries=0, timeout=60)
        model = config.models[0].name
        response = client.chat.completions.with_raw_response.create(
            model=model, temperature=0, max_tokens=8, messages=[{"role": "user", "content": "What is 2 + 2?"}])
        assert response.headers["x-ferry-backend"] == onprem["name"]
        assert response.headers["x-ferry-location"] == "onprem"
        completion = response.parse()
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        assert completion.model == model
    finally:
        server.stop()
