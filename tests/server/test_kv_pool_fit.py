"""A KV pool smaller than one max-length sequence: max_model_len is cut to what the pool holds, with
a warning at start-up (as vLLM does), instead of every request without max_tokens being refused."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest
from ferry_server import ServerProcess

from ferry.engine.core import fit_max_model_len

# The tiny Llama (tests/conftest.py): 2 layers x 2 KV heads x head_dim 16, K and V in float32 =
# 512 bytes a token, so 64 KiB hold 128 tokens (8 blocks of 16); its context is 512.
POOL = "64KiB"
POOL_TOKENS = 128


def test_fit_keeps_a_length_the_pool_holds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ferry.engine.core"):
        assert fit_max_model_len(128, num_blocks=8, block_size=16) == 128
        assert fit_max_model_len(100, num_blocks=8, block_size=16) == 100
    assert not caplog.records


def test_fit_cuts_a_length_the_pool_cannot_hold(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ferry.engine.core"):
        assert fit_max_model_len(4096, num_blocks=3, block_size=16) == 48
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "reducing max_model_len to 48" in record.getMessage()
    assert "4096" in record.getMessage()


def test_serve_with_a_small_pool_reduces_max_model_len(tiny_llama_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with ServerProcess(tiny_llama_dir, log, "--kv-cache-memory", POOL,
                       "--served-model-name", "tiny") as server:
        card = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]
        assert card["max_model_len"] == POOL_TOKENS
        tokens = httpx.post(server.base_url + "/tokenize", json={"prompt": "hi"}, timeout=30).json()
        assert tokens["max_model_len"] == POOL_TOKENS
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        # no max_tokens: the reply may run to the end of the (reduced) context, and is served
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=0, extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.total_tokens == POOL_TOKENS
    text = log.read_text()
    assert f"reducing max_model_len to {POOL_TOKENS}" in text and "WARNING" in text
