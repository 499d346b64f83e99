"""`/v1/embeddings` through the gateway: routed like chat (keys, data classes, budgets, failover), billed at
the embedding deployment's own input price with no completion tokens, bodies checked as OpenAI does."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
import openai
import pytest
from gateway.conftest import backend

EMBED_PRICE = 0.02  # USD per million input tokens, the embedding deployment's own price


def _embed_model(*deployments: dict[str, Any]) -> dict[str, Any]:
    return {"name": "embed", "deployments": list(deployments)}


def _chat_model(*names: str) -> dict[str, Any]:
    return {"name": "chat", "deployments": [{"backend": n, "model": f"{n}-model"} for n in names]}


def test_embeddings_reach_the_upstream_and_are_billed_at_their_own_price(upstreams, gateway) -> None:
    rack, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem", kind="openai")],
                 models=[_chat_model("rack"),
                         _embed_model({"backend": "rack", "model": "bge-small", "input_per_mtok": EMBED_PRICE})])
    client = gw.openai(gw.create_key(name="alice", models=["embed"]))
    r = client.embeddings.create(model="embed", input=["the quick brown fox", "jumps"])
    direct = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).embeddings.create(
        model="bge-small", input=["the quick brown fox", "jumps"])
    assert [d.embedding for d in r.data] == [d.embedding for d in direct.data]
    assert rack.bodies[0]["model"] == "bge-small" and r.usage.prompt_tokens == 5
    # the SDK asks for base64 by default and decodes it; float comes back as is
    assert rack.bodies[0].get("encoding_format") == "base64"
    as_float = client.embeddings.create(model="embed", input="hello there", encoding_format="float", dimensions=4)
    assert len(as_float.data[0].embedding) == 4
    raw = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {client.api_key}"},
                     json={"model": "embed", "input": [[1, 2, 3]], "encoding_format": "base64"})
    assert raw.status_code == 200 and raw.headers["x-ferry-backend"] == "rack"
    vector = struct.unpack("<8f", base64.b64decode(raw.json()["data"][0]["embedding"]))
    assert all(0 <= v < 1 for v in vector) and len(set(vector)) > 1
    rows = gw.ledger()
    assert [(r["status"], r["model"], r["upstream_model"], r["stream"]) for r in rows] == [
        (200, "embed", "bge-small", False)] * 3
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(5, 0), (2, 0), (3, 0)]
    for row in rows:
        assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * EMBED_PRICE / 1e6)
        assert row["reserved_tokens"] == 0 and row["reserved_cost_usd"] == 0
    text = httpx.get(gw.url + "/metrics").text
    assert 'ferry_gateway:prompt_tokens_total{backend="rack"} 10.0' in text
    # a key without the model is refused, as for chat
    other = gw.openai(gw.create_key(name="bob", models=["chat"]))
    with pytest.raises(openai.PermissionDeniedError):
        other.embeddings.create(model="embed", input="x")


def test_pii_keeps_embeddings_on_prem(upstreams, gateway) -> None:
    rack, srv_on = upstreams("rack")
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem", kind="openai"), backend("cloud", srv_cloud, "cloud", kind="openai")],
                 models=[_chat_model("rack"),
                         _embed_model({"backend": "cloud", "model": "text-embedding-3-small"},
                                      {"backend": "rack", "model": "bge-small"})])
    client = gw.openai(gw.create_key())
    rack.fail_status, rack.fail_count = 503, 1  # on-prem fails once: public input fails over to the cloud
    client.embeddings.create(model="embed", input="a harmless sentence")
    client.embeddings.create(model="embed", input=["my card is 4111 1111 1111 1111"])
    restricted = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {client.api_key}",
                                                                "x-ferry-data-class": "restricted"},
                            json={"model": "embed", "input": "nothing personal"})
    assert restricted.status_code == 200 and restricted.headers["x-ferry-location"] == "onprem"
    rows = gw.ledger()
    assert [(r["data_class"], r["location"], r["pii"]) for r in rows] == [
        ("public", "cloud", False), ("restricted", "onprem", True), ("restricted", "onprem", False)]
    assert [b["input"] for b in cloud.bodies] == ["a harmless sentence"]
    # restricted data with on-prem down: refused, never sent to the cloud
    srv_on.stop()
    gw.wait_for(lambda: not gw.gw.backends["rack"].up, what="rack down")
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model="embed", input="card 4111 1111 1111 1111")
    assert e.value.status_code == 503 and "restricted" in e.value.message
    assert len(cloud.bodies) == 1


def test_a_backend_without_embeddings_is_skipped_and_budgets_apply(upstreams, gateway) -> None:
    serve, srv_serve = upstreams("serve", embeddings=False)  # ferry serve: 404
    vllm, srv_vllm = upstreams("vllm")
    gw = gateway([backend("serve", srv_serve, "onprem", input_per_mtok=1000.0),
                  backend("vllm", srv_vllm, "onprem", input_per_mtok=1000.0),
                  backend("claude", srv_vllm, "cloud", kind="anthropic")],
                 models=[_chat_model("serve"),
                         _embed_model({"backend": "claude", "model": "claude"}, {"backend": "serve", "model": "e"},
                                      {"backend": "vllm", "model": "e"})])
    client = gw.openai(gw.create_key(budget_usd=0.002))  # $0.001 a token
    r = client.embeddings.create(model="embed", input="one two three")
    assert len(r.data) == 1 and serve.requests == 1 and vllm.requests == 1
    row = gw.ledger()[-1]
    assert (row["status"], row["backend"], row["prompt_tokens"], row["attempts"]) == (200, "vllm", 3, 2)
    assert "serve: HTTP 404" in row["reason"]
    assert gw.gw.backends["serve"].up  # it answered: its circuit stays closed
    # 3 tokens spent $0.003 of the $0.002 budget: the next request is refused
    with pytest.raises(openai.RateLimitError) as e:
        client.embeddings.create(model="embed", input="x" * 40)
    assert e.value.code == "budget_exceeded"
    # a model served only by kinds without embeddings is a 400 naming why
    only_claude = gateway([backend("claude", srv_vllm, "cloud", kind="anthropic")],
                          models=[_embed_model({"backend": "claude", "model": "claude"})])
    with pytest.raises(openai.BadRequestError) as e:
        only_claude.openai(only_claude.create_key()).embeddings.create(model="embed", input="x")
    assert "anthropic" in e.value.message
    # every deployment answering 404: a 404 in OpenAI's shape that names them
    none = gateway([backend("serve", srv_serve, "onprem")], models=[_embed_model({"backend": "serve", "model": "e"})])
    with pytest.raises(openai.NotFoundError) as e:
        none.openai(none.create_key()).embeddings.create(model="embed", input="x")
    assert e.value.code == "unsupported_endpoint" and "serve: HTTP 404" in e.value.message


BAD_BODIES = [
    ({"model": "embed"}, "input"),
    ({"model": "embed", "input": []}, "input"),
    ({"model": "embed", "input": 42}, "input"),
    ({"model": "embed", "input": [1, "a"]}, "input"),
    ({"model": "embed", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "embed", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "embed", "input": "x", "user": 7}, "user"),
]


def test_a_bad_body_is_a_400_in_openai_shape(upstreams, gateway) -> None:
    rack, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")], models=[_embed_model({"backend": "rack", "model": "e"})])
    key = gw.create_key()
    for body, param in BAD_BODIES:
        r = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {key}"}, json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], body
    assert rack.requests == 0
    assert [r["status"] for r in gw.ledger()] == [400] * len(BAD_BODIES)
