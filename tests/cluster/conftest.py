"""One local Ray instance for the whole folder (no dashboard, HTTP on loopback), and one shared
2-replica application that the API, failure and gateway tests use in turn.

NOTE: Ray's CPUs here are logical (8 on a 2-core machine): several small applications sit side by
side, each on its own route prefix, and idle replicas cost next to nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from cluster.ray_cluster import API_KEY, Deployed, deploy, undeploy
from ferry_server import free_port

from ferry.cluster.spec import ModelSpec

SHARED_ARGS = ("smollm2-135m-instruct", "--max-num-seqs", "4", "--api-key", API_KEY)


@pytest.fixture(scope="session")
def http_port() -> Iterator[int]:
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, namespace="serve", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(http_port: int) -> str:
    """The tests' Ray instance, for commands that join it (``--ray-address``)."""
    return str(ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="session")
def shared_app(http_port: int) -> Iterator[Deployed]:
    """2 replicas of SmolLM2 (4 sequences each) with an API key, at /shared."""
    app = deploy(http_port, ModelSpec(name="ferry-shared", serve_args=SHARED_ARGS, num_replicas=2,
                                      route_prefix="/shared"))
    try:
        yield app
    finally:
        undeploy(app)
