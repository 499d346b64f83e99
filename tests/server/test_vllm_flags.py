"""`ferry serve` takes the flags deployment scripts written for `vllm serve` pass: each accepted
flag's effect on a real server (tiny Llama on 127.0.0.1), and the one-line refusals (exit 2)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from ferry_server import ServerProcess
from openai import OpenAI
from safetensors import safe_open

from ferry.cli import main as cli_main
from ferry.engine.llm_engine import (
    LLM,
    generation_defaults,
    read_chat_template,
    resolve_dtype,
)
from ferry.loader import load_model
from ferry.runner.memory import UTILIZATION_RESERVE, utilization_budget
from ferry.sampling_params import SamplingParams
from ferry.server.flags import ServeArgumentParser, add_arguments, configs_from_args

ORIGIN = "https://app.example"
CHAT_TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
TOKDIR_TEMPLATE = "{% for m in messages %}TOKDIR {{ m['content'] }}{% endfor %}"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ferry serve")
    add_arguments(parser, "serve")
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------ refusals, one line each


@pytest.mark.parametrize(("argv", "words"), [
    (["--foo", "1"], "unsupported option --foo (see ferry serve --help)"),
    (["--enable-lora=true"], "unsupported option --enable-lora (see ferry serve --help)"),
    (["-tp", "2"], "--tensor-parallel-size 2 is not supported: ferry runs one device per replica"),
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size 2 is not supported"),
    (["--quantization", "awq"], "--quantization awq is not supported"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported"),
    (["--max-logprobs", "50"], "--max-logprobs 50 is not supported"),
    (["--gpu-memory-utilization", "0.5", "--kv-cache-memory", "1GiB"],
     "--gpu-memory-utilization and --kv-cache-memory both size the KV cache; give one"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["m1", "--model", "m2"], "two models given: 'm1' and --model 'm2'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--max-model", "8"], "unsupported option --max-model (see ferry serve --help)"),
    (["--allowed-origins", "https://a.example"], "not a JSON list of strings"),
    (["--chat-template", "missing/template.jinja"], "looks like a file path but cannot be read"),
    (["--generation-config", "/nonexistent"], "--generation-config /nonexistent: not auto, vllm"),
    (["--ssl-keyfile", "/nonexistent.pem", "--ssl-certfile", "/nonexistent.pem"],
     "--ssl-keyfile /nonexistent.pem: no such file"),
    (["--root-path", "api/"], "root_path must start with /"),
])
def test_refusals_are_one_line_exit_2(argv: list[str], words: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli_main(["serve", *argv])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    assert code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry serve: "), err
    assert words in lines[0]
    assert "usage:" not in err and out == ""


@pytest.mark.parametrize("argv", [["--foo", "1", "--port", "1"], ["--tensor-parallel-size", "4"]])
def test_the_real_command_refuses_in_one_line(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "ferry.cli", "serve", *argv],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"ferry serve: {'unsupported option --foo' if argv[0] == '--foo' else '--tensor-parallel-size 4'}")


def test_vllm_spellings_build_the_configs(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text(CHAT_TEMPLATE)
    engine, server = configs_from_args(_args(
        "org/model", "--served-model-name", "a", "b", "a", "--dtype", "half", "--max_model_len=32K",
        "--no-prefix-caching", "--gpu-memory-utilization", "0.3", "-tp", "1", "--enforce-eager",
        "--swap-space", "4", "--trust-remote-code", "--revision", "v1", "--download-dir", "/d",
        "--gguf-file", "x.gguf", "--tokenizer", "org/tok", "--chat-template", str(template),
        "--generation-config", "vllm", "--no-enable-chunked-prefill", "--quantization", "gguf",
        "--allowed-origins", '["https://a.example"]', "--allow-credentials",
        "--root-path", "/api", "--disable-log-requests", "--max-logprobs", "5"))
    m = engine.model
    assert (m.model, m.dtype, m.max_model_len) == ("org/model", "float16", 32 * 1024)
    assert (m.revision, m.download_dir, m.gguf_file, m.tokenizer) == ("v1", "/d", "x.gguf", "org/tok")
    assert (m.chat_template, m.generation_config) == (str(template), "vllm")
    assert not engine.cache.enable_prefix_caching and engine.cache.gpu_memory_utilization == 0.3
    assert not engine.scheduler.enable_chunked_prefill
    assert server.served_model_names == ("a", "b")
    assert (server.allowed_origins, server.allow_credentials) == (("https://a.example",), True)
    assert (server.root_path, server.log_requests, server.max_logprobs) == ("/api", False, 5)
    # the defaults: dtype auto, --model's default, prefix caching on
    engine, server = configs_from_args(_args())
    assert (engine.model.dtype, engine.model.model) == ("auto", "smollm2-135m-instruct")
    assert engine.cache.enable_prefix_caching and server.served_model_names == ()
    assert configs_from_args(_args("--enable-prefix-caching"))[0].cache.enable_prefix_caching


def test_the_parser_class_is_swapped_only_for_a_plain_parser() -> None:
    parser = argparse.ArgumentParser(prog="ferry serve")
    add_arguments(parser, "serve")
    assert type(parser) is ServeArgumentParser


def test_dtype_auto_follows_the_device_and_the_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, "bfloat16") == "float32"
    assert resolve_dtype("float16", cpu, None) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert [resolve_dtype("auto", cuda, d) for d in ("bfloat16", "float16", "float32", None)] == \
        ["bfloat16", "float16", "bfloat16", "bfloat16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert [resolve_dtype("auto", cuda, d) for d in ("bfloat16", "float16", None)] == \
        ["float16", "float16", "float16"]


def test_chat_template_is_a_path_or_the_text(tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(CHAT_TEMPLATE)
    assert read_chat_template(str(f)) == CHAT_TEMPLATE
    assert read_chat_template(CHAT_TEMPLATE) == CHAT_TEMPLATE
    assert read_chat_template("{{ 'a' }}\\n") == "{{ 'a' }}\n"  # escapes as typed in a shell


def test_generation_config_modes(gen_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(gen_model_dir))
    assert generation_defaults("auto", loaded) == {"temperature": 0.0, "max_new_tokens": 3}
    assert generation_defaults("vllm", loaded) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 7, "do_sample": True}))
    assert generation_defaults(str(tmp_path), loaded) == {"top_k": 7}


# ------------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def gen_model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama whose generation_config.json asks for greedy sampling and 3 new tokens."""
    out = tmp_path_factory.mktemp("tiny-llama-gen")
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, out / f.name)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0,
                                                            "max_new_tokens": 3}))
    return out


@pytest.fixture(scope="module")
def gen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --generation-config folder: 5 new tokens, greedy."""
    out = tmp_path_factory.mktemp("genconf")
    (out / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "temperature": 0}))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(hf_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's tokenizer files with another chat template: --tokenizer's folder."""
    out = tmp_path_factory.mktemp("tokdir")
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = TOKDIR_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


def _rendered_chat(base_url: str, headers: dict[str, str] | None = None, **kw: Any) -> str:
    """The chat prompt the server builds for one user message "hi", as text."""
    ids = httpx.post(base_url + "/tokenize", headers=headers, timeout=30, **kw,
                     json={"messages": [{"role": "user", "content": "hi"}],
                           "add_generation_prompt": False}).json()["tokens"]
    return str(httpx.post(base_url + "/detokenize", headers=headers, timeout=30, **kw,
                          json={"tokens": ids, "skip_special_tokens": False}).json()["prompt"])


# ------------------------------------------------------------------ one server, many vLLM flags

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def main_server(server_factory: Any, tiny_llama_dir: Path, gen_folder: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    server = server_factory(
        tiny_llama_dir, "--served-model-name", "alpha", "beta", "--root-path", "/api",
        "--allowed-origins", json.dumps([ORIGIN]), "--api-key", KEY, "--max-logprobs", "3",
        "--generation-config", str(gen_folder), "--chat-template", str(template),
        "--disable-log-requests", "--kv-cache-memory", "8MiB", "--max_num_seqs=4")
    with server:
        yield server


def test_served_model_names_are_aliases(main_server: ServerProcess) -> None:
    client = OpenAI(base_url=main_server.base_url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"
    for name in ("alpha", "beta"):  # either name works; the answer carries the first (vLLM's)
        out = client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert out.model == "alpha"
    r = httpx.post(main_server.base_url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": "gamma", "prompt": "Hello"})
    assert r.status_code == 404 and "`alpha`, `beta`" in r.json()["error"]["message"]


def test_root_path_serves_both_forms_and_keeps_the_key(main_server: ServerProcess) -> None:
    base = main_server.base_url
    for path in ("/api/v1/models", "/v1/models"):  # a proxy that keeps the prefix, or strips it
        assert httpx.get(base + path, headers=AUTH, timeout=30).status_code == 200
        assert httpx.get(base + path, timeout=30).status_code == 401
    assert httpx.get(base + "/api/openapi.json", timeout=30).json()["servers"] == [{"url": "/api"}]


def test_cors_preflight_answers_the_allowed_origin_only(main_server: ServerProcess) -> None:
    url = main_server.base_url + "/v1/chat/completions"
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(url, headers={"Origin": ORIGIN, **ask}, timeout=30)
    assert ok.status_code == 200  # no API key on a preflight
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    bad = httpx.options(url, headers={"Origin": "https://evil.example", **ask}, timeout=30)
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    # an actual request: its answer (a 401 too) carries the header the page needs to read it
    r = httpx.get(main_server.base_url + "/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


def test_max_logprobs_refuses_more(main_server: ServerProcess) -> None:
    base = main_server.base_url
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True}
    r = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={**chat, "top_logprobs": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "top_logprobs"
    assert err["type"] == "invalid_request_error" and "maximum allowed (3" in err["message"]
    r = httpx.post(base + "/v1/completions", headers=AUTH, timeout=30,
                   json={"prompt": "hi", "max_tokens": 2, "logprobs": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={**chat, "top_logprobs": 3})
    assert r.status_code == 200
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3


def test_generation_config_folder_defaults_and_overrides(main_server: ServerProcess) -> None:
    client = OpenAI(base_url=main_server.base_url + "/v1", api_key=KEY)
    extra = {"ignore_eos": True}

    def run(**kw: Any) -> Any:
        return client.completions.create(model="alpha", prompt="Hello there", extra_body=extra, **kw)

    unset = run()
    assert unset.usage.completion_tokens == 5  # max_new_tokens, not OpenAI's 16
    assert run(max_tokens=7).usage.completion_tokens == 7  # the request's value wins
    # temperature 0 from the folder: greedy, whatever the seed ...
    assert run(seed=1).choices[0].text == run(seed=2).choices[0].text == unset.choices[0].text
    # ... unless the request sets one
    texts = {run(seed=s, temperature=1.0, max_tokens=8).choices[0].text for s in (1, 2, 3)}
    assert len(texts) > 1
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}],
                                          extra_body=extra)
    assert chat.usage.completion_tokens == 5


def test_chat_template_file_is_used(main_server: ServerProcess) -> None:
    assert _rendered_chat(main_server.base_url, AUTH).endswith("<<hi>>")


def test_disable_log_requests_writes_no_access_lines(main_server: ServerProcess) -> None:
    httpx.get(main_server.base_url + "/v1/models", headers=AUTH, timeout=30)
    assert "ferry.server.access" not in main_server.log()
    assert "ferry.server.app" in main_server.log()  # the server does log, just not requests


# --------------------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def test_https_tokenizer_override_and_positional_model(
        tiny_llama_dir: Path, tokenizer_dir: Path, self_signed: tuple[Path, Path],
        tmp_path: Path) -> None:
    key, cert = self_signed
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", start=False)
    # `vllm serve MODEL` form, and vLLM flags ferry accepts as they are
    server._cmd = [sys.executable, "-m", "ferry.cli", "serve", str(tiny_llama_dir),
                   "--host", "127.0.0.1", "--port", str(server.port), "--ssl-keyfile", str(key),
                   "--ssl-certfile", str(cert), "--tokenizer", str(tokenizer_dir),
                   "--trust-remote-code", "--tensor-parallel-size", "1", "--enforce-eager",
                   "--kv-cache-memory", "8MiB", "--uvicorn-log-level", "warning"]
    server.start()
    base = f"https://127.0.0.1:{server.port}"
    tls = ssl.create_default_context(cafile=str(cert))
    try:
        _wait_https(server, base, tls)
        client = OpenAI(base_url=base + "/v1", api_key="x", http_client=httpx.Client(verify=tls))
        out = client.chat.completions.create(model=tiny_llama_dir.name, max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].finish_reason in ("stop", "length")
        assert _rendered_chat(base, verify=tls) == "TOKDIR hi"  # the --tokenizer folder's template
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
        log = server.log()
        assert "--trust-remote-code has no effect" in log
        assert "dtype auto: float32" in log
        assert "ferry.server.access" in log  # requests are logged unless --disable-log-requests
    finally:
        server.stop()


def _wait_https(server: ServerProcess, base: str, tls: ssl.SSLContext) -> None:
    assert server.proc is not None
    for _ in range(1200):
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited {server.proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(base + "/health", verify=tls, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready:\n{server.log()[-3000:]}")


# ----------------------------------------------------------------------- --gpu-memory-utilization


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_gpu_memory_utilization_sizes_the_kv_pool(server_factory: Any, gen_model_dir: Path) -> None:
    """On CPU: F x MemTotal - weights (float32) - the reserve, in blocks of 16 x 512 bytes; the
    model's generation_config.json (auto) gives requests their defaults."""
    with safe_open(str(gen_model_dir / "model.safetensors"), "pt") as f:
        weights = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 4  # noqa: SIM118 (safe_open is no dict)
    total = _mem_total()
    fraction = (UTILIZATION_RESERVE + weights + 3 * 2**20) / total
    kv_per_token = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x float32
    expected = (int(fraction * total) - weights - UTILIZATION_RESERVE) // (16 * kv_per_token)
    assert 300 < expected < 400
    with server_factory(gen_model_dir, "--gpu-memory-utilization", repr(fraction)) as server:
        assert f"KV cache: {expected} blocks x 16 tokens" in server.log()
        client = OpenAI(base_url=server.base_url + "/v1", api_key="x")
        out = client.completions.create(model=gen_model_dir.name, prompt="Hello",
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3  # the model's max_new_tokens


def test_gpu_memory_utilization_too_small_fails(server_factory: Any, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, "--gpu-memory-utilization", "0.000001")
    assert server.proc.wait(120) != 0
    assert "--gpu-memory-utilization 1e-06 allows" in server.log()


def test_utilization_budget_arithmetic_and_limits() -> None:
    gib = 2**30
    assert utilization_budget(0.5, 8 * gib, gib, 8 * gib) == 3 * gib - UTILIZATION_RESERVE
    with pytest.raises(ValueError, match="weights .* already take; raise it"):
        utilization_budget(0.1, 8 * gib, gib, 8 * gib)
    with pytest.raises(ValueError, match="only 1.00 GiB is free"):
        utilization_budget(0.9, 8 * gib, gib, gib)


def test_offline_llm_takes_the_generation_config_defaults(gen_model_dir: Path) -> None:
    llm = LLM(str(gen_model_dir), kv_cache_memory=2**20)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=None)
    out = llm.generate("Hello there", None)[0].outputs[0]
    explicit = llm.generate("Hello there", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) <= 3  # max_new_tokens (EOS may come first)
    assert len(explicit.outputs[0].token_ids) == 6
