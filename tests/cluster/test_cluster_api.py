"""2 replicas on Ray Serve answer as `ferry serve` does: greedy text, streaming, errors, API key,
and the ingress's /health and /metrics cover both replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cluster.ray_cluster import API_KEY, Deployed
from ferry_server import ServerProcess

from ferry.server.metrics import parse_prometheus, sample

pytestmark = pytest.mark.slow

PROMPTS = ["Name three colours.", "What is 2 + 2?", "Say hello in French."]


@pytest.fixture(scope="module")
def cluster(shared_app: Deployed) -> Deployed:
    return shared_app


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("ref") / "serve.log"
    with ServerProcess("smollm2-135m-instruct", Path(log), "--max-num-seqs", "4",
                       "--api-key", API_KEY) as server:
        yield server


def _client(base_url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_greedy_answers_match_ferry_serve(cluster: Deployed, reference: ServerProcess) -> None:
    got, want = _client(cluster.base_url), _client(reference.base_url)
    for prompt in PROMPTS:
        kw = {"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 12,
              "messages": [{"role": "user", "content": prompt}]}
        a = got.chat.completions.create(**kw)
        b = want.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage == b.usage
    a2 = got.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                temperature=0, max_tokens=8)
    b2 = want.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                 temperature=0, max_tokens=8)
    assert a2.choices[0].text == b2.choices[0].text


def test_streaming_matches(cluster: Deployed, reference: ServerProcess) -> None:
    texts = []
    for base in (cluster.base_url, reference.base_url):
        stream = _client(base).chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=12, stream=True,
            messages=[{"role": "user", "content": PROMPTS[0]}])
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(chunks) > 2
        texts.append("".join(chunks))
    assert texts[0] == texts[1]


@pytest.mark.parametrize("body,status", [
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"messages": "not a list"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
])
def test_errors_match(cluster: Deployed, reference: ServerProcess, body: dict, status: int) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    a = httpx.post(cluster.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    b = httpx.post(reference.base_url + "/v1/chat/completions", json=body, headers=headers,
                   timeout=60)
    assert a.status_code == b.status_code == status
    assert a.json() == b.json()


def test_api_key_required(cluster: Deployed, reference: ServerProcess) -> None:
    for base in (cluster.base_url, reference.base_url):
        with pytest.raises(openai.AuthenticationError):
            _client(base, key="wrong").models.list()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    a = httpx.post(cluster.base_url + "/v1/chat/completions", json=body, timeout=30)
    b = httpx.post(reference.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert a.status_code == b.status_code == 401
    assert a.json() == b.json()


def test_health_and_metrics_cover_every_replica(cluster: Deployed) -> None:
    replicas = cluster.replicas()
    assert len(replicas) == 2 and all(r["healthy"] for r in replicas)
    assert len({r["pid"] for r in replicas}) == 2
    assert httpx.get(cluster.base_url + "/health", timeout=10).status_code == 200
    m = parse_prometheus(httpx.get(cluster.base_url + "/metrics", timeout=10).text)
    for r in replicas:
        assert sample(m, "ferry:replica_up", replica=r["replica"]) == 1.0
    # the standard series are the sums over the replicas
    total_queries = sample(m, "ferry:replica_prefix_cache_queries_total")
    assert sample(m, "ferry:prefix_cache_queries_total") == total_queries
    assert total_queries > 0
