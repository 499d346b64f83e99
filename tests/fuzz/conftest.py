"""Real servers for the hostile-input tests: `ferry serve` over the tiny random Llama in a
subprocess, and `ferry gateway` apps served by uvicorn on 127.0.0.1 free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ferry_server import ServerProcess
from fuzz.echo_upstream import make_echo_upstream
from gateway.conftest import MASTER, GatewayHarness, backend, config_dict
from gateway.upstream import ServerThread, UpstreamState, start_upstream

from ferry.gateway.config import parse_config

# NOTE: the gateway's deployments are named "{backend}-model" (gateway.conftest.config_dict); the
# tiny server serves that name so that it can stand behind a gateway unchanged.
SERVE_BACKEND = "tiny"
SERVE_MODEL = f"{SERVE_BACKEND}-model"
TINY_VOCAB = 49152  # tests/conftest.py: the tiny Llama borrows SmolLM2's tokenizer
AUTH = {"Authorization": f"Bearer {MASTER}"}


@pytest.fixture(scope="session")
def tiny_serve(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`ferry serve` (tiny model) with a small batch and context, so any request ends quickly."""
    log = tmp_path_factory.mktemp("fuzz-serve") / "server.log"
    server = ServerProcess(tiny_llama_dir, log, "--served-model-name", SERVE_MODEL,
                           "--max-num-seqs", "4", "--max-queue", "4", "--max-model-len", "256",
                           "--kv-cache-memory", "16MiB")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _gateway(backends: list[dict[str, Any]], tmp_path: Path) -> GatewayHarness:
    return GatewayHarness(parse_config(config_dict(backends, f"sqlite:///{tmp_path}/gateway.db")))


@pytest.fixture
def fake_upstream() -> Iterator[tuple[UpstreamState, ServerThread]]:
    """tests/gateway's upstream: it counts what reaches it."""
    state, server = start_upstream("rack")
    yield state, server
    server.stop()


@pytest.fixture
def gateway_over_fake(fake_upstream: tuple[UpstreamState, ServerThread],
                      tmp_path: Path) -> Iterator[GatewayHarness]:
    gw = _gateway([backend("rack", fake_upstream[1], "onprem")], tmp_path)
    yield gw
    gw.close()


@pytest.fixture
def gateway_over_serve(tiny_serve: ServerProcess, tmp_path: Path) -> Iterator[GatewayHarness]:
    """A gateway whose one deployment is the tiny `ferry serve` (its 400s pass through)."""
    gw = _gateway([backend(SERVE_BACKEND, SimpleNamespace(url=tiny_serve.base_url), "onprem",
                           timeout=60)], tmp_path)
    yield gw
    gw.close()


@pytest.fixture
def gateway_over_echo(tmp_path: Path) -> Iterator[GatewayHarness]:
    """A gateway over a fixed-answer upstream: whatever 5xx a fuzzer sees is the gateway's."""
    echo = ServerThread(make_echo_upstream()).start()
    gw = _gateway([backend("echo", echo, "onprem", kind="openai", timeout=30)], tmp_path)
    yield gw
    gw.close()
    echo.stop()
