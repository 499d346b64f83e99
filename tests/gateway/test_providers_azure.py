"""The azure backend kind and the ``headers`` option of every backend, on the wire.

Azure: the deployment URL (with ``?api-version=`` in it or the ``api_version`` field), the
``api-key`` header or an Entra ID bearer token, health from the resource's model list, and
Azure's error shapes passed through. Headers: ``${NAME}`` values come from the environment, reach
the upstream, and never appear in `ferry gateway check`'s output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from gateway.conftest import backend
from gateway.fake_providers import AZURE_KEY, AZURE_TOKEN, ProviderState, start_provider
from gateway.upstream import ServerThread

from ferry.gateway.config import ConfigError, parse_config

VERSION = "2024-10-21"
MSG = [{"role": "user", "content": "hello azure"}]


@pytest.fixture
def azure() -> Iterator[tuple[ProviderState, ServerThread]]:
    state, server = start_provider("azure", api_version=VERSION)
    yield state, server
    server.stop()


def deployment_url(server: ServerThread, name: str = "gpt-4o-prod", query: bool = True) -> str:
    url = f"{server.url}/openai/deployments/{name}"
    return f"{url}?api-version={VERSION}" if query else url


def chat_paths(state: ProviderState) -> list[str]:
    return [p for p in state.paths if "/chat/completions" in p]


def az(server: ServerThread, **kw) -> dict:
    d = backend("az", server, "cloud", kind="azure")
    d.pop("api_key_env")
    d.update(url=deployment_url(server), api_key_env="AZURE_OPENAI_API_KEY", **kw)
    return d


def test_a_deployment_url_with_its_api_version_and_key(azure, gateway) -> None:
    state, server = azure
    gw = gateway([az(server)], env={"AZURE_OPENAI_API_KEY": AZURE_KEY})
    client = gw.openai(gw.create_key(name="alice"))
    r = client.chat.completions.create(model="chat", messages=MSG, max_tokens=4)
    assert r.usage.completion_tokens == 4 and len(r.choices[0].message.content.split()) == 4
    assert chat_paths(state)[-1] == f"/openai/deployments/gpt-4o-prod/chat/completions?api-version={VERSION}"
    assert state.headers[-1]["api-key"] == AZURE_KEY and "authorization" not in state.headers[-1]
    chunks = list(client.chat.completions.create(model="chat", messages=MSG, max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == \
        r.choices[0].message.content.split()[:3]
    assert gw.ledger()[-1]["completion_tokens"] == 3
    # health asks the resource's model list with the same version and key
    gw.wait_for(lambda: any(p.startswith("/openai/models?api-version=") for p in state.paths), what="health")
    gw.wait_for(lambda: gw.admin.get("/health").json()["backends"]["az"]["up"], what="az up")


def test_the_api_version_field_and_an_entra_token(azure, gateway) -> None:
    state, server = azure
    cfg = az(server, api_version=VERSION, azure_ad_token_env="AZURE_AD_TOKEN")
    cfg.pop("api_key_env")
    cfg["url"] = deployment_url(server, query=False)
    gw = gateway([cfg], env={"AZURE_AD_TOKEN": AZURE_TOKEN})
    gw.openai(gw.create_key(name="alice")).chat.completions.create(model="chat", messages=MSG, max_tokens=2)
    assert chat_paths(state)[-1].endswith(f"/chat/completions?api-version={VERSION}")
    assert state.headers[-1]["authorization"] == f"Bearer {AZURE_TOKEN}" and "api-key" not in state.headers[-1]


def test_azure_errors_pass_through_in_their_shape(azure, gateway) -> None:
    _, server = azure
    cfg = az(server)
    cfg["url"] = deployment_url(server, name="missing")
    gw = gateway([cfg], env={"AZURE_OPENAI_API_KEY": AZURE_KEY})
    client = gw.openai(gw.create_key(name="alice"))
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="chat", messages=MSG, max_tokens=2)
    assert e.value.body["code"] == "DeploymentNotFound"
    wrong = gateway([az(server)], env={"AZURE_OPENAI_API_KEY": "nope"})
    with pytest.raises(openai.AuthenticationError):
        wrong.openai(wrong.create_key(name="bob")).chat.completions.create(model="chat", messages=MSG)


def test_headers_from_the_environment_reach_the_upstream(upstreams, gateway) -> None:
    state, srv = upstreams("rack")
    b = backend("rack", srv, "onprem", headers={"X-Org": "acme", "X-Tenant-Token": "tok-${TENANT_SECRET}"})
    gw = gateway([b], env={"TENANT_SECRET": "s3cr3t"})
    gw.openai(gw.create_key(name="alice")).chat.completions.create(model="chat", messages=MSG, max_tokens=2)
    seen = state.request_headers[-1]
    assert seen["x-org"] == "acme" and seen["x-tenant-token"] == "tok-s3cr3t"


def test_config_checks_each_kind(tmp_path: Path) -> None:
    def one(**b) -> None:
        parse_config({"backends": [{"name": "b", **b}],
                      "models": [{"name": "m", "deployments": [{"backend": "b", "model": "x"}]}]})

    azure = "https://res.openai.azure.com/openai/deployments/gpt4o"
    one(url=azure + "?api-version=2024-10-21", kind="azure", api_key_env="K")
    one(url=azure, kind="azure", api_version="2024-10-21", azure_ad_token_env="T")
    one(url="https://api.anthropic.com/v1", kind="anthropic", api_key_env="K")
    for bad, words in (
            (dict(url=azure + "?api-version=2024-10-21", kind="openai"), "needs kind: azure"),
            (dict(url=azure, kind="azure"), "api_version: is required"),
            (dict(url="https://res.openai.azure.com/v1", kind="azure", api_version="v"), "deployment URL"),
            (dict(url=azure + "?api-version=a", kind="azure", api_version="b"), "differs"),
            (dict(url=azure, kind="azure", api_version="v", api_key_env="K", azure_ad_token_env="T"), "not both"),
            (dict(url="http://x/v1", kind="openai", api_version="v"), "kinds azure and anthropic"),
            (dict(url="http://x/v1", headers={"bad name": "v"}), "bad header name"),
            (dict(url="http://x/v1", headers={"X-A": "a\r\nInjected: 1"}), "one-line"),
            (dict(url="http://x/v1", headers={"Host": "evil"}), "set by the gateway")):
        with pytest.raises(ConfigError, match=words):
            one(**bad)
    cfg = parse_config({"backends": [{"name": "b", "url": "http://x/v1", "headers": {"X-T": "${MISSING_ONE}"}}],
                        "models": [{"name": "m", "deployments": [{"backend": "b", "model": "x"}]}],
                        "master_key_env": "MK"})
    assert cfg.missing_env({"MK": "k"}) == ["backends[0].headers: environment variable MISSING_ONE is not set"]


def test_check_names_headers_but_never_their_values(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "backends": [{"name": "az", "kind": "azure", "location": "cloud", "api_key_env": "AZ_KEY",
                      "url": "https://res.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21",
                      "headers": {"X-Secret": "literal-secret-value"}}],
        "models": [{"name": "m", "deployments": [{"backend": "az", "model": "gpt-4o"}]}]}))
    env = {**os.environ, "FERRY_MASTER_KEY": "mk", "AZ_KEY": "azure-key-value"}
    out = subprocess.run([sys.executable, "-m", "ferry.cli", "gateway", "check", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "api-version 2024-10-21" in out.stdout and "headers X-Secret" in out.stdout
    assert "literal-secret-value" not in out.stdout + out.stderr
    assert "azure-key-value" not in out.stdout + out.stderr
