"""Pass-through: text, streams chunk by chunk, usage taken from the stream, keys and the ledger."""

from __future__ import annotations

import httpx
import openai
import pytest
from gateway.conftest import backend

MSG = [{"role": "user", "content": "tell me about ferries"}]


def test_text_through_gateway_equals_text_direct(upstreams, gateway) -> None:
    state, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    client = gw.openai(gw.create_key(name="alice"))
    direct = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    via = client.chat.completions.create(model="chat", messages=MSG, max_tokens=5)
    ref = direct.chat.completions.create(model="rack-model", messages=MSG, max_tokens=5)
    assert via.choices[0].message.content == ref.choices[0].message.content
    assert via.usage.prompt_tokens == ref.usage.prompt_tokens and via.usage.completion_tokens == 5
    # the upstream got its own model name, not the public one
    assert state.bodies[0]["model"] == "rack-model"
    # completions too
    comp = client.completions.create(model="chat", prompt="one two three", max_tokens=3)
    ref2 = direct.completions.create(model="rack-model", prompt="one two three", max_tokens=3)
    assert comp.choices[0].text == ref2.choices[0].text


def test_stream_passes_through_chunk_by_chunk_with_exact_usage(upstreams, gateway) -> None:
    state, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    client = gw.openai(gw.create_key(name="alice"))
    direct = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="chat", messages=MSG, max_tokens=6, stream=True))
    ref = list(direct.chat.completions.create(model="rack-model", messages=MSG, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(c.choices[0].delta.content or "" for c in ref if c.choices)
    # one client chunk per upstream token: nothing merged, and no usage chunk the client did not ask for
    assert len(chunks) == len(ref) and all(c.choices for c in chunks)
    # the gateway asked upstream for usage so that the ledger is exact
    assert state.bodies[0]["stream_options"] == {"include_usage": True}
    row = [r for r in gw.ledger() if r["status"] == 200][0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (len(MSG[0]["content"].split()), 6)
    assert row["stream"] and row["ttft_s"] is not None and row["backend"] == "rack"
    # a client that asks for usage gets it
    with_usage = list(client.chat.completions.create(model="chat", messages=MSG, max_tokens=2, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 2


def test_streamed_chunks_arrive_before_the_stream_ends(upstreams, gateway) -> None:
    state, srv = upstreams("rack", token_delay=0.2)
    gw = gateway([backend("rack", srv, "onprem")])
    key = gw.create_key(name="alice")
    seen_while_running = []
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "chat", "messages": MSG, "max_tokens": 5, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                seen_while_running.append(state.running)
    # NOTE: the upstream still runs while the client reads its first tokens: no buffering in between
    assert seen_while_running[0] == 1 and seen_while_running[1] == 1


def test_keys_401_403_and_admin(upstreams, gateway) -> None:
    _, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")],
                 models=[{"name": "chat", "deployments": [{"backend": "rack", "model": "m1"}]},
                         {"name": "code", "deployments": [{"backend": "rack", "model": "m2"}]}])
    with pytest.raises(openai.AuthenticationError):
        gw.openai("sk-ferry-wrong").chat.completions.create(model="chat", messages=MSG)
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "chat", "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    key = gw.create_key(name="bob", team="ml", models=["code"])
    with pytest.raises(openai.PermissionDeniedError) as e:
        gw.openai(key).chat.completions.create(model="chat", messages=MSG)
    assert e.value.status_code == 403 and "chat" in e.value.message
    assert gw.openai(key).chat.completions.create(model="code", messages=MSG).choices[0].message.content
    assert [m.id for m in gw.openai(key).models.list()] == ["code"]
    with pytest.raises(openai.NotFoundError):
        gw.openai(key).chat.completions.create(model="nope", messages=MSG)
    # admin API: master key only; keys are stored hashed and listed without their secret
    assert httpx.get(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    listed = gw.admin.get("/admin/keys").json()["data"]
    assert [k["name"] for k in listed] == ["bob"] and "key" not in listed[0]
    from sqlalchemy import select

    from ferry.gateway.db import keys_table
    from ferry.gateway.keys import hash_key
    with gw.gw.engine.connect() as conn:
        stored = conn.execute(select(keys_table.c.key_hash)).scalars().all()
    assert stored == [hash_key(key)] and key not in stored
    bad = gw.admin.post("/admin/keys", json={"name": "x", "data_class": "secret"})
    assert bad.status_code == 400 and "data_class" in bad.json()["error"]["message"]
    assert gw.admin.post("/admin/keys", json={"name": "x", "rpm": 0}).status_code == 400
    assert gw.admin.delete(f"/admin/keys/{listed[0]['id']}").json()["deleted"] is True
    with pytest.raises(openai.AuthenticationError):
        gw.openai(key).chat.completions.create(model="code", messages=MSG)
    assert gw.admin.delete(f"/admin/keys/{listed[0]['id']}").status_code == 404
    assert sorted(r["status"] for r in gw.ledger()) == [200, 401, 401, 401, 403, 404]


def test_upstream_4xx_is_passed_through_not_failed_over(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", fail_status=400)
    b, srv_b = upstreams("b")
    gw = gateway([backend("a", srv_a, "onprem"), backend("b", srv_b, "onprem")])
    with pytest.raises(openai.BadRequestError):
        gw.openai(gw.create_key()).chat.completions.create(model="chat", messages=MSG)
    assert (a.requests, b.requests) == (1, 0)
    assert gw.gw.backends["a"].breaker.failures == 0


def test_master_key_is_compared_in_constant_time(upstreams, gateway, monkeypatch) -> None:
    import hmac

    _, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    master = gw.gw.master_key
    near = master[:-1] + "!"  # differs in the last byte only
    auth = {"Authorization": f"Bearer {master}"}
    assert httpx.get(gw.url + "/admin/keys", headers=auth).status_code == 200
    assert httpx.get(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {near}"}).status_code == 401
    assert httpx.get(gw.url + "/v1/models", headers=auth).status_code == 200
    r = httpx.post(gw.url + "/v1/chat/completions", headers=auth,
                   json={"model": "chat", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer ünïcode".encode()},
                   json={"model": "chat", "messages": MSG})
    assert r.status_code == 401
    assert [b for _, b in compared] == [master.encode()] * 5
    assert compared[1][0] == near.encode()
