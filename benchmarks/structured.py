"""Constrained decoding's cost: the same serving load with and without a JSON schema, in one run.

Starts `ferry serve` on SmolLM2, then runs 16 concurrent streaming chat clients, each sending
``--rounds`` requests back to back (prompts asking for JSON, greedy, ``--max-tokens``): first free,
then every request with the same JSON schema (``response_format: json_schema``). Prints the output
tokens per second of both runs and their ratio (the goal: constrained >= 0.85 x free), and checks
that every constrained answer that stopped parses and validates. Not a timed test; run it by hand:

    .venv/bin/python benchmarks/structured.py [--streams 16] [--rounds 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai

TOPICS = ["the sea", "a cat", "mountains", "coffee", "rain", "a library", "trains", "the moon",
          "bread", "winter", "a violin", "gardens", "bees", "a lighthouse", "chess", "snow",
          "a river", "clocks", "the desert", "owls", "tea", "a bridge", "autumn", "maps"]
SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "topic": {"type": "string", "maxLength": 40},
    "category": {"type": "string", "enum": ["nature", "animal", "food", "object", "place", "other"]},
    "facts": {"type": "array", "minItems": 3, "maxItems": 6,
              "items": {"type": "string", "maxLength": 80}},
    "rating": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["topic", "category", "facts", "rating"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, port: int, streams: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "ferry.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(streams), "--max-model-len", "1024",
           "--kv-cache-memory", "512MiB", "--served-model-name", "smol"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ferry serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("ferry serve did not become ready")


async def run_load(url: str, streams: int, rounds: int, max_tokens: int,
                   constrained: bool) -> tuple[float, int, list[tuple[str, str | None]]]:
    """(seconds, output tokens, [(text, finish_reason)]) for streams x rounds requests."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    extra: dict[str, Any] = {}
    if constrained:
        extra["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "topic", "strict": True, "schema": SCHEMA}}

    async def one_stream(i: int) -> tuple[int, list[tuple[str, str | None]]]:
        tokens, answers = 0, []
        for r in range(rounds):
            topic = TOPICS[(i * rounds + r) % len(TOPICS)]
            prompt = (f"Describe {topic} as a JSON object with a topic, a category, a list of facts "
                      "and a rating from 1 to 10.")
            stream = await client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": prompt}], temperature=0,
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                **extra)
            text, reason = "", None
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                for c in chunk.choices:
                    text += c.delta.content or ""
                    reason = c.finish_reason or reason
            answers.append((text, reason))
        return tokens, answers

    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed, sum(t for t, _ in results), [a for _, answers in results for a in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="ferry-structured-")) / "server.log"
    proc = start_server(args.model, port, args.streams, log)
    try:
        wait_ready(url, proc)
        # NOTE: one warm-up request each way (first-use costs: llguidance's tokenizer, the schema)
        asyncio.run(run_load(url, 1, 1, 8, False))
        asyncio.run(run_load(url, 1, 1, 8, True))
        figures = {}
        for constrained in (False, True):
            elapsed, tokens, answers = asyncio.run(
                run_load(url, args.streams, args.rounds, args.max_tokens, constrained))
            figures[constrained] = tokens / elapsed
            stopped = [t for t, reason in answers if reason == "stop"]
            label = "json_schema" if constrained else "free"
            print(f"{label:>12}: {tokens} output tokens in {elapsed:.1f} s = "
                  f"{tokens / elapsed:.1f} tok/s ({len(answers)} requests, {len(stopped)} stopped, "
                  f"{tokens / len(answers):.0f} tokens each)")
            if constrained:
                for text in stopped:
                    jsonschema.validate(json.loads(text), SCHEMA)
                print(f"{'':>12}  every stopped answer parses and validates ({len(stopped)})")
        print(f"ratio constrained / free: {figures[True] / figures[False]:.3f} (goal >= 0.85)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
