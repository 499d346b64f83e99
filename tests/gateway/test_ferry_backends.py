"""Real `ferry serve` replicas (tiny random Llama) behind the gateway, driven with the openai SDK.

Two replicas play on-prem (small max_concurrency in the gateway), a third plays the cloud (kind
openai, behind an API key it checks). Every claim is checked against the replicas' own /metrics and
the ledger.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from ferry_server import ServerProcess
from gateway.conftest import ENV

MSG = [{"role": "user", "content": "Tell me a story about a ferry."}]
LONG = {"max_tokens": 120, "extra_body": {"ignore_eos": True}}


def _replica(model: Path, log: Path, *extra: str) -> ServerProcess:
    return ServerProcess(model, log, "--served-model-name", "tiny", "--max-num-seqs", "8",
                         "--kv-cache-memory", "16MiB", *extra, start=False)


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("ferry-serve")
    servers = {"rack-a": _replica(tiny_llama_dir, logs / "rack-a.log"),
               "rack-b": _replica(tiny_llama_dir, logs / "rack-b.log"),
               "cloud": _replica(tiny_llama_dir, logs / "cloud.log", "--api-key", ENV["CLOUD_API_KEY"])}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def _backends(replicas: dict[str, ServerProcess], onprem_concurrency: int = 2) -> list[dict]:
    out = []
    for name, s in replicas.items():
        cloud = name == "cloud"
        b = {"name": name, "url": s.base_url + "/v1", "location": "cloud" if cloud else "onprem",
             "kind": "openai" if cloud else "ferry", "max_concurrency": 16 if cloud else onprem_concurrency,
             "timeout": 30, "connect_timeout": 1, "input_per_mtok": 0.15 if cloud else 0.05,
             "output_per_mtok": 0.60 if cloud else 0.10}
        if cloud:
            b["api_key_env"] = "CLOUD_API_KEY"
        out.append(b)
    return out


def _models(replicas: dict[str, ServerProcess]) -> list[dict]:
    return [{"name": "chat", "deployments": [{"backend": n, "model": "tiny"} for n in replicas]}]


def _served(replicas: dict[str, ServerProcess]) -> dict[str, float]:
    return {n: s.metric("ferry:request_success_total") for n, s in replicas.items()}


def _idle(gw, replicas: dict[str, ServerProcess]) -> None:
    for name, s in replicas.items():
        gw.wait_for(lambda s=s: s.metric("ferry:num_requests_running") == 0, what=f"{name} idle")


def test_text_through_gateway_equals_text_direct(replicas, gateway) -> None:
    gw = gateway(_backends(replicas), models=_models(replicas))
    client = gw.openai(gw.create_key())
    direct = openai.OpenAI(base_url=replicas["rack-a"].base_url + "/v1", api_key="x", max_retries=0)
    kw = {"messages": MSG, "max_tokens": 12, "temperature": 0}
    via = client.chat.completions.create(model="chat", **kw)
    ref = direct.chat.completions.create(model="tiny", **kw)
    assert via.choices[0].message.content == ref.choices[0].message.content and via.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="chat", stream=True, **kw) if c.choices)
    assert streamed == ref.choices[0].message.content
    comp = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert comp.choices[0].text == direct.completions.create(model="tiny", prompt="Once upon a time",
                                                             max_tokens=8, temperature=0).choices[0].text


def test_light_load_on_prem_saturation_overflows_and_restricted_never_leaves(replicas, gateway) -> None:
    gw = gateway(_backends(replicas, onprem_concurrency=1), models=_models(replicas),
                 routing={"queue_timeout": 60}, health={"failure_threshold": 1000})
    key = gw.create_key(name="pub")
    public = gw.openai(key)
    restricted = gw.openai(gw.create_key(name="sec", data_class="restricted"))
    before = _served(replicas)
    for _ in range(4):  # light load: one at a time
        public.chat.completions.create(model="chat", messages=MSG, max_tokens=4)
    after = _served(replicas)
    assert after["cloud"] == before["cloud"]
    assert after["rack-a"] + after["rack-b"] - before["rack-a"] - before["rack-b"] == 4

    # Saturate on-prem: one long stream holds each rack's single gateway slot, and the racks are paused
    # (SIGSTOP) so the slots stay held for exactly as long as this test needs.
    body = {"model": "chat", "messages": MSG, "max_tokens": 300, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as s1, \
            http.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as s2:
        assert {s1.headers["x-ferry-backend"], s2.headers["x-ferry-backend"]} == {"rack-a", "rack-b"}
        for s in (replicas["rack-a"], replicas["rack-b"]):
            s.proc.send_signal(signal.SIGSTOP)
        try:
            pii = [{"role": "user", "content": "My card is 4111 1111 1111 1111."}]
            with ThreadPoolExecutor(8) as pool:
                public_jobs = [pool.submit(public.chat.completions.with_raw_response.create, model="chat",
                                           messages=MSG, max_tokens=20) for _ in range(4)]
                private_jobs = [pool.submit(restricted.chat.completions.with_raw_response.create, model="chat",
                                            messages=MSG, max_tokens=20) for _ in range(2)]
                private_jobs += [pool.submit(public.chat.completions.with_raw_response.create, model="chat",
                                             messages=pii, max_tokens=20) for _ in range(2)]
                # public requests overflow to the cloud at once, with no error first
                for job in public_jobs:
                    r = job.result(timeout=60)
                    assert r.headers["x-ferry-location"] == "cloud" and r.headers["x-ferry-overflow"] == "1"
                    assert r.parse().usage.completion_tokens == 20
                # restricted and PII-carrying requests wait for on-prem instead (the racks are paused)
                assert not any(job.done() for job in private_jobs)
                for s in (replicas["rack-a"], replicas["rack-b"]):
                    s.proc.send_signal(signal.SIGCONT)
                s1.close()
                s2.close()
                for job in private_jobs:
                    r = job.result(timeout=60)
                    assert r.headers["x-ferry-location"] == "onprem" and r.parse().usage.completion_tokens == 20
        finally:
            for s in (replicas["rack-a"], replicas["rack-b"]):
                s.proc.send_signal(signal.SIGCONT)
    rows = gw.ledger()[4:]  # after the light-load rows
    assert sum(r["location"] == "cloud" for r in rows) == 4 and all(r["overflow"] for r in rows
                                                                     if r["location"] == "cloud")
    assert all(r["location"] == "onprem" for r in rows if r["data_class"] == "restricted")
    assert sorted(r["pii_kinds"] or "" for r in rows if r["data_class"] == "restricted") == ["", "", "card", "card"]
    assert all(r["status"] in (200, 499) for r in rows)  # 499: the two held streams, closed by us
    assert replicas["cloud"].metric("ferry:request_success_total") - after["cloud"] == 4
    _idle(gw, replicas)
    # and drained back: light load is on-prem again
    r = public.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4)
    assert r.headers["x-ferry-location"] == "onprem"


def test_ledger_token_totals_equal_the_replicas_usage(replicas, gateway) -> None:
    gw = gateway(_backends(replicas, onprem_concurrency=1), models=_models(replicas))
    client = gw.openai(gw.create_key())
    names = ("ferry:prompt_tokens_total", "ferry:generation_tokens_total")
    before = {n: [s.metric(m) for m in names] for n, s in replicas.items()}

    def job(i: int) -> None:
        if i % 2:
            list(client.chat.completions.create(model="chat", messages=MSG, max_tokens=10 + i, stream=True,
                                                extra_body={"ignore_eos": True}))
        else:
            client.completions.create(model="chat", prompt="The ferry left at dawn", max_tokens=5 + i)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(job, range(6)))
    rows = [r for r in gw.ledger() if r["status"] == 200]
    assert len(rows) == 6
    for n, s in replicas.items():
        mine = [r for r in rows if r["backend"] == n]
        delta = [s.metric(m) - b for m, b in zip(names, before[n])]
        assert [sum(r["prompt_tokens"] for r in mine), sum(r["completion_tokens"] for r in mine)] == delta


def test_dropped_client_frees_the_replica(replicas, gateway) -> None:
    gw = gateway(_backends(replicas), models=_models(replicas))
    key = gw.create_key()
    rack = replicas["rack-a"]
    generated = rack.metric("ferry:generation_tokens_total")
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "chat", "messages": MSG, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}, timeout=60) as r:
        assert r.headers["x-ferry-backend"] == "rack-a"
        lines = r.iter_lines()
        while "content" not in next(lines):
            pass
    gw.wait_for(lambda: rack.metric("ferry:num_requests_running") == 0, what="replica to drop the request")
    gw.wait_for(lambda: gw.ledger(settled=False)[0]["status"] == 499, what="ledger row")
    # it stopped generating long before the 400 tokens it was asked for
    assert rack.metric("ferry:generation_tokens_total") - generated < 400
    assert gw.gw.backends["rack-a"].inflight == 0


def test_rate_limits_with_real_usage(replicas, gateway) -> None:
    gw = gateway(_backends(replicas), models=_models(replicas))
    client = gw.openai(gw.create_key(tpm=100))
    usage = client.chat.completions.create(model="chat", messages=MSG, max_tokens=40,
                                           extra_body={"ignore_eos": True}).usage
    assert usage.total_tokens < 100  # the first is under the limit …
    client.chat.completions.create(model="chat", messages=MSG, max_tokens=40, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError):  # … and two of them are over it
        client.chat.completions.create(model="chat", messages=MSG, max_tokens=40)


def test_killed_replica_fails_over_on_prem_and_comes_back(replicas, gateway) -> None:
    gw = gateway(_backends(replicas), models=_models(replicas))
    restricted = gw.openai(gw.create_key(data_class="restricted"))
    cloud_before = replicas["cloud"].metric("ferry:request_success_total")

    def where() -> str:
        r = restricted.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4)
        return r.headers["x-ferry-backend"]

    assert where() == "rack-a"
    replicas["rack-a"].kill()
    assert [where() for _ in range(3)] == ["rack-b"] * 3
    gw.wait_for(lambda: not gw.gw.backends["rack-a"].up, what="rack-a marked down")
    replicas["rack-a"].start().wait_ready()
    gw.wait_for(lambda: gw.gw.backends["rack-a"].up, what="rack-a back")
    assert where() == "rack-a"
    assert replicas["cloud"].metric("ferry:request_success_total") == cloud_before
    assert all(r["status"] == 200 and r["location"] == "onprem" for r in gw.ledger())
