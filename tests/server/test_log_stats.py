"""`ferry serve` and `ferry gateway` as subprocesses: the periodic one-line summary, probes kept out of the INFO
log, and one log format (text, or JSON lines with ts, level, logger, msg) for both."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ferry_server import free_port

from ferry.server.flags import add_arguments

GENERATION = re.compile(r"Avg generation throughput: ([0-9.]+) tokens/s")
GATEWAY_LINE = re.compile(r"Requests: (\d+) .*overflow to cloud: (\d+) \(([0-9.]+)% of ok\), spend: \$([0-9.]+)")


def _wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return found


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line our loggers wrote; each must be one JSON object with the four common fields."""
    records = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue  # NOTE: a library's own print to stderr is not ours to format
        record = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(record), line
        records.append(record)
    return records


def _probe_logged(text: str) -> bool:
    return bool(re.search(r"GET (/health|/metrics)", text))


def test_disable_log_stats_is_vllms_off_switch() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, "serve")
    args = parser.parse_args(["--disable-log-stats"])
    assert (args.log_stats, args.log_stats_interval) == (False, 10.0)
    assert parser.parse_args(["--log-stats-interval", "2.5"]).log_stats_interval == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-stats-interval", "-1"])


def test_serve_logs_json_summaries_and_no_probes(server_factory: Any, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, "--max-num-seqs", "4", "--kv-cache-memory", "16MiB",
                            "--served-model-name", "m", "--log-format", "json", "--log-stats-interval", "0.3")
    server.wait_ready()  # NOTE: polls /health: those probes must not reach the INFO log
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for i in range(3):
            r = http.post("/v1/completions", json={"model": "m", "prompt": f"hello {i}", "max_tokens": 8,
                                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert http.get("/metrics").status_code == 200
    stats = _wait_for(lambda: [r for r in _json_lines(server.log()) if r["logger"] == "ferry.server.stats"
                               and (m := GENERATION.search(r["msg"])) and float(m.group(1)) > 0],
                      "a summary with generation throughput")
    line = stats[0]["msg"]
    assert line.startswith("Avg prompt throughput: ") and stats[0]["level"] == "info"
    for part in ("Running: ", "Waiting: ", "KV cache usage: ", "Prefix cache hit rate: "):
        assert part in line, line
    records = _json_lines(server.log())
    access = [r for r in records if r["logger"] == "ferry.server.access"]
    assert [r["path"] for r in access] == ["/v1/completions"] * 3 and not _probe_logged(server.log())


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str, Path]]]:
    from gateway.conftest import ENV, MASTER, backend, config_dict
    from gateway.upstream import start_upstream

    started: list[Any] = []

    def start(*flags: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        _, rack = start_upstream("rack", fail_status=500)  # on-prem always fails: every request overflows
        _, cloud = start_upstream("cloud")
        started.extend([rack, cloud])
        config = config_dict([backend("rack", rack, "onprem"), backend("cloud", cloud, "cloud", kind="openai")],
                             f"sqlite:///{tmp_path}/gw.db", health={"failure_threshold": 1})
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp_path / "gateway.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "gateway", "--config", str(path),
                                     "--port", str(port), *flags], stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, **ENV})
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _health(url, proc, log) == "down", "the gateway up and rack down")
        for _ in range(3):
            r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {MASTER}"},
                           json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-ferry-backend"] == "cloud", r.text
        httpx.get(url + "/metrics")
        return proc, url, log

    yield start
    for s in started:
        if isinstance(s, subprocess.Popen):
            s.terminate()
            s.wait(30)
        else:
            s.stop()


def _health(url: str, proc: subprocess.Popen[bytes], log: Path) -> str | None:
    if proc.poll() is not None:
        raise AssertionError(f"gateway exited {proc.returncode}:\n{log.read_text(errors='replace')}")
    try:
        return httpx.get(url + "/health", timeout=2).json()["backends"]["rack"]["state"]
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_gateway_logs_summaries_and_no_probes(gateway_process: Any, fmt: str) -> None:
    _, _, log = gateway_process("--log-format", fmt, "--log-stats-interval", "0.3")

    def summaries() -> list[re.Match[str]]:
        return [m for line in log.read_text(errors="replace").splitlines()
                if "ferry.gateway.stats" in line and (m := GATEWAY_LINE.search(line)) and int(m.group(1)) > 0]

    found = _wait_for(summaries, "a summary with requests")
    # every request of the interval (one to three of them) went to the cloud: all overflow
    assert all(m.group(2) == m.group(1) and float(m.group(3)) == 100.0 and float(m.group(4)) > 0 for m in found)
    _wait_for(lambda: sum(int(m.group(1)) for m in summaries()) == 3, "all three requests summed up")
    text = log.read_text(errors="replace")
    assert text.count("POST /v1/chat/completions") == 3 and not _probe_logged(text)
    if fmt == "json":
        records = _json_lines(text)
        assert {"ferry.gateway.stats", "uvicorn.access"} <= {r["logger"] for r in records}
        assert all(line.startswith("{") for line in text.splitlines() if line.strip())
    else:
        assert re.search(r"^\S+ \S+ INFO ferry\.gateway\.stats: Requests: ", text, re.MULTILINE)


def test_the_first_summary_counts_from_the_servers_start() -> None:
    # NOTE: a request served before the first summary must show in it (the counters start at zero)
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter

    from ferry.engine.core import EngineStats
    from ferry.server.command import ServeStats

    registry = CollectorRegistry()
    prompt = Counter("ferry:prompt_tokens", "", ["model_name"], registry=registry)
    generation = Counter("ferry:generation_tokens", "", ["model_name"], registry=registry)
    engine = SimpleNamespace(stats=lambda: EngineStats(0, 0, 0.0, 10, 10, 0, 40, 20))
    state = SimpleNamespace(engine=engine, metrics=SimpleNamespace(registry=registry, model_name="m"))
    prompt.labels("m").inc(40)
    generation.labels("m").inc(8)
    stats = ServeStats(state)  # type: ignore[arg-type]
    first = stats.summary(4.0)
    assert first is not None and first.startswith("Avg prompt throughput: 10.0 tokens/s, "
                                                  "Avg generation throughput: 2.0 tokens/s")
    assert "Prefix cache hit rate: 50.0%" in first
    generation.labels("m").inc(4)
    assert "Avg generation throughput: 1.0 tokens/s" in (stats.summary(4.0) or "")
