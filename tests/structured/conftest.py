"""Structured-output fixtures: SmolLM2's real tokenizer and a grammar compiler over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ferry_server import ServerProcess

from ferry.structured import GrammarCompiler
from ferry.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_path: Path) -> Tokenizer:
    from ferry.loader import load_model

    return load_model(str(smollm2_path)).tokenizer


@pytest.fixture
def compiler(smol_tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(smol_tokenizer, smol_tokenizer.eos_token_ids, smol_tokenizer.vocab_size,
                           cache_size=4)


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Any]:
    """The real `ferry serve` over SmolLM2 on a free loopback port."""
    server = ServerProcess(smollm2_path, tmp_path_factory.mktemp("server") / "server.log",
                           "--max-num-seqs", "16", "--kv-cache-memory", "256MiB",
                           "--max-model-len", "1024", "--served-model-name", "smol")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
