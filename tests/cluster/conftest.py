"""One local Ray instance (2 logical CPUs, no dashboard, HTTP on loopback) for the whole folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from ferry_server import free_port


@pytest.fixture(scope="session")
def http_port() -> Iterator[int]:
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
