"""The reservation is an upper bound on what a request can use: the byte bound against a real tokenizer
and chat template, the backend's own count where it has /tokenize, the model's limit without max_tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway.conftest import ENV, backend, config_dict

from ferry.gateway.backends import make_backend
from ferry.gateway.config import ConfigError, parse_config
from ferry.gateway.limits import estimate
from ferry.gateway.reservation import Reserver, tokenize_url
from ferry.gateway.token_bounds import completion_limit, prompt_bound, sequences
from ferry.loader.gguf import open_gguf, read_metadata
from ferry.tokenizer import Tokenizer

TEXTS = ["hi 0", "", " ", "\n\n\n\n", "1234567890 3.14159 -42", "ünïcödé façade — “quotes” ½ ∑ ∞",
         "日本語のテキストと中文文本, 한국어", "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇫🇷 👍🏽", "A" * 300,
         "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\n<|im_end|>", "\u200b \u00a0 \ufeff"]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(smollm2_path)))


def test_the_byte_bound_holds_for_a_real_tokenizer_and_its_chat_template(smollm2: Tokenizer) -> None:
    conversations = [[{"role": "user", "content": t}] for t in TEXTS]
    conversations += [[{"role": "system", "content": TEXTS[5]}, {"role": "user", "content": t}] for t in TEXTS]
    conversations += [[{"role": "user" if i % 2 else "assistant", "content": "a"} for i in range(40)],
                      [{"role": "user", "content": [{"type": "text", "text": TEXTS[7]}]}]]
    for messages in conversations:
        real = len(smollm2.encode_chat([{**m, "content": m["content"] if isinstance(m["content"], str)
                                         else m["content"][0]["text"]} for m in messages]))
        assert prompt_bound({"messages": messages}, "chat/completions", 64, 8) >= real, messages
    for text in TEXTS:
        assert prompt_bound({"prompt": text}, "completions", 64, 8) >= len(smollm2.encode(text)), text
    # the old estimate (characters / 4, no template) was the overshoot: "hi 0" costs 33 tokens, not 2
    hi = [{"role": "user", "content": "hi 0"}]
    assert len(smollm2.encode_chat(hi)) == 33 and estimate({"messages": hi}, "chat/completions", 0, 0).prompt_tokens == 2


def test_completion_limits_and_sequences() -> None:
    chat = "chat/completions"
    assert completion_limit({"max_tokens": 9}, chat) == 9
    assert completion_limit({"max_tokens": 9, "max_completion_tokens": 5}, chat) == 5
    assert completion_limit({}, chat) is None  # the model's limit applies
    assert completion_limit({"prompt": "x"}, "completions") == 16  # OpenAI's default for completions
    assert sequences({"n": 3}, chat) == 3
    assert sequences({"prompt": ["a", "b"], "n": 2, "best_of": 3}, "completions") == 6
    assert prompt_bound({"prompt": [[1, 2, 3], [4]]}, "completions", 64, 8) == 4  # token ids count exactly
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert (prompt_bound({"messages": [], "tools": tools}, "chat/completions", 64, 8)
            == 64 + len('[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]'))


def _config(backends: list[dict[str, Any]], **model: Any) -> Any:
    data = config_dict(backends, "sqlite://")
    data["models"][0].update(model)
    return parse_config(data)


async def _estimate(config: Any, body: dict[str, Any], endpoint: str = "chat/completions",
                    locations: tuple[str, ...] = ("onprem", "cloud"), exact: bool = True,
                    transport: httpx.AsyncBaseTransport | None = None) -> Any:
    backends = {b.name: make_backend(b, config.health, ENV, transport) for b in config.backends}
    try:
        reserver = Reserver(config, backends)
        return await reserver.estimate(body, endpoint, config.model("chat"), locations, exact)
    finally:
        for b in backends.values():
            await b.aclose()


HI = {"messages": [{"role": "user", "content": "hi 0"}]}


async def test_a_ferry_backend_counts_the_prompt_and_tells_the_context(upstreams) -> None:
    up, srv = upstreams("rack", template_tokens=31, max_model_len=2048)
    cfg = _config([backend("rack", srv, "onprem", input_per_mtok=1e6, output_per_mtok=2e6)])
    e = await _estimate(cfg, {**HI, "max_tokens": 8, "n": 2})
    assert (e.prompt_tokens, e.completion_tokens, e.cost_usd) == (33, 16, pytest.approx(33 + 32))
    e = await _estimate(cfg, HI)  # no max_tokens: the rest of the context
    assert (e.prompt_tokens, e.completion_tokens) == (33, 2048 - 33)
    assert up.tokenized == 2
    e = await _estimate(cfg, {**HI, "max_tokens": 8}, exact=False)  # no limit looks at it: the bound, no call
    assert (e.prompt_tokens, e.completion_tokens) == (80, 8) and up.tokenized == 2
    e = await _estimate(cfg, {"prompt": "a b c", "max_tokens": 4}, "completions")
    assert (e.prompt_tokens, e.completion_tokens) == (3, 4) and up.tokenized == 3


async def test_the_reservation_covers_every_allowed_deployment(upstreams) -> None:
    _, on = upstreams("rack", template_tokens=31)
    _, cloud = upstreams("cloud")
    cfg = _config([backend("rack", on, "onprem", input_per_mtok=1e6, output_per_mtok=1e6),
                   backend("cloud", cloud, "cloud", kind="openai", input_per_mtok=3e6, output_per_mtok=5e6)],
                  max_output_tokens=1000)
    e = await _estimate(cfg, {**HI, "max_tokens": 8})
    assert (e.prompt_tokens, e.completion_tokens, e.cost_usd) == (80, 8, pytest.approx(80 * 3 + 8 * 5))
    e = await _estimate(cfg, {**HI, "max_tokens": 8}, locations=("onprem",))  # restricted: on-prem only
    assert (e.prompt_tokens, e.completion_tokens, e.cost_usd) == (33, 8, pytest.approx(33 + 8))
    e = await _estimate(cfg, HI)  # without max_tokens: on-prem, its context; in the cloud, the configured limit
    assert e.completion_tokens == 4096 - 33
    assert (await _estimate(cfg, HI, locations=("cloud",))).completion_tokens == 1000


async def test_a_backend_without_tokenize_falls_back_to_the_bound_and_is_not_asked_again() -> None:
    calls: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(404, json={"detail": "Not Found"})

    cfg = _config([{"name": "old", "url": "http://old:8000/v1", "location": "onprem", "kind": "ferry"}])
    backends = {b.name: make_backend(b, cfg.health, ENV, httpx.MockTransport(upstream)) for b in cfg.backends}
    reserver = Reserver(cfg, backends)
    for _ in range(2):
        e = await reserver.estimate({**HI, "max_tokens": 8}, "chat/completions", cfg.model("chat"), ("onprem",), True)
        assert (e.prompt_tokens, e.completion_tokens) == (80, 8)
    assert calls == ["http://old:8000/tokenize"]
    await backends["old"].aclose()
    assert tokenize_url("http://h:1/v1/") == tokenize_url("http://h:1") == "http://h:1/tokenize"


def test_model_limits_and_ledger_settings_are_validated() -> None:
    b = [{"name": "r", "url": "http://r/v1"}]
    assert _config(b).model("chat").max_output_tokens == 32768
    with pytest.raises(ConfigError, match=r"models\[0\].max_output_tokens"):
        _config(b, max_output_tokens=0)
    with pytest.raises(ConfigError, match=r"models\[0\].template_overhead_tokens"):
        _config(b, template_overhead_tokens=-1)
    with pytest.raises(ConfigError, match="ledger.instance_lease"):
        parse_config(config_dict(b, "sqlite://", ledger={"progress_interval": 5, "instance_lease": 6}))
    with pytest.raises(ConfigError, match="ledger.nope"):
        parse_config(config_dict(b, "sqlite://", ledger={"nope": 1}))
