"""Scale-out on Ray Serve: multi-turn chats sharing system prompts, against ferry applications of
1 and 2 replicas, with ferry's prefix-aware router and with Ray's default router.

Each conversation has one of ``--systems`` long system prompts and runs ``--turns`` turns, the
model's real answers appended to its history, ``--concurrency`` conversations at a time. Per setup:
the prefix-cache hit rate over the replicas (prompt tokens found cached / looked up, read from the
ingress's per-replica counters) and output tokens per second; then the ratios, all from one run.
A plain `ferry serve` (one thread, no Ray) runs the same workload first: the Ray path's overhead is
one replica's tok/s against it.

    python benchmarks/scale_out.py [--conversations 8] [--turns 3] [--systems 4]
                                   [--concurrency 4] [--max-tokens 16] [--model smollm2-135m-instruct]

NOTE: each replica gets one CPU (one thread); on a 2-core machine two replicas share the cores with
the Ray processes and the client: expect no throughput gain there.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import ray
from ray import serve

from ferry.cluster.deploy import build_application, shutdown
from ferry.cluster.spec import ModelSpec
from ferry.server.metrics import parse_prometheus

SYSTEM = ("You are assistant {i} of the ferry help desk. Answer in one short sentence, be polite, "
          "never invent facts, and say so when you do not know. ") * 6
QUESTIONS = ["What is a ferry?", "Why do boats float?", "Name a large river.",
             "What is the capital of Norway?", "How long is a nautical mile?",
             "What does a harbour master do?", "Name a famous lighthouse.", "What is a tide?"]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Give one example.", "Summarise that."]


@dataclass
class Result:
    label: str
    replicas: int
    hit_rate: float
    tok_s: float
    seconds: float
    tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefix_counters(base: str) -> tuple[float, float]:
    m = parse_prometheus(httpx.get(base + "/metrics", timeout=30).text)
    hits = sum(v for k, v in m.items() if k.startswith("ferry:replica_prefix_cache_hits_total"))
    queries = sum(v for k, v in m.items()
                  if k.startswith("ferry:replica_prefix_cache_queries_total"))
    return hits, queries


def conversation(base: str, c: int, args: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": SYSTEM.format(i=c % args.systems)},
                {"role": "user", "content": QUESTIONS[c % len(QUESTIONS)]}]
    tokens = 0
    with httpx.Client(base_url=base, timeout=300) as client:
        for turn in range(args.turns):
            r = client.post("/v1/chat/completions", json={
                "messages": messages, "max_tokens": args.max_tokens, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                         {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return tokens


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 300.0,
               stop: Callable[[], bool] = lambda: False) -> None:
    """Poll ``ready`` (connection errors count as not yet) until it holds; SystemExit past ``timeout``
    or once ``stop`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or stop():
            raise SystemExit(f"not reached in {timeout:g} s: {what}")
        time.sleep(0.5)


def run_plain(args: argparse.Namespace) -> Result:
    """The same workload against one plain `ferry serve` (one thread), for the Ray path's overhead."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "ferry.cli", "serve", "--model", args.model,
                               "--port", str(port), "--max-num-seqs", str(args.max_num_seqs)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200,
                   "ferry serve up", stop=lambda: server.poll() is not None)

        def counters() -> tuple[float, float]:
            m = parse_prometheus(httpx.get(base + "/metrics", timeout=30).text)
            return (sum(v for k, v in m.items() if k.startswith("ferry:prefix_cache_hits_total")),
                    sum(v for k, v in m.items() if k.startswith("ferry:prefix_cache_queries_total")))

        hits0, queries0 = counters()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(lambda c: conversation(base, c, args), range(args.conversations)))
        seconds = time.perf_counter() - t0
        hits1, queries1 = counters()
    finally:
        server.terminate()
        server.wait(timeout=60)
    rate = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0
    return Result("ferry serve (no Ray, 1 thread)", 1, rate, tokens / seconds, seconds, tokens)


def run_setup(port: int, label: str, replicas: int, routed: bool,
              args: argparse.Namespace) -> Result:
    name = f"bench-{replicas}-{'routed' if routed else 'default'}"
    spec = ModelSpec(name=name, serve_args=(args.model, "--max-num-seqs", str(args.max_num_seqs)),
                     num_replicas=replicas, prefix_routing=routed, route_prefix=f"/{name}")
    serve.run(build_application(spec), name=name, route_prefix=spec.route_prefix, blocking=False)
    base = f"http://127.0.0.1:{port}{spec.route_prefix}"
    try:
        def healthy() -> bool:
            r = httpx.get(base + "/health/replicas", timeout=5)
            return r.status_code == 200 and r.json()["healthy"] == replicas

        wait_until(healthy, f"{name}: {replicas} healthy replicas")
        time.sleep(1.5)  # NOTE: the routers' first stats from the replicas
        hits0, queries0 = prefix_counters(base)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(lambda c: conversation(base, c, args),
                                  range(args.conversations)))
        seconds = time.perf_counter() - t0
        time.sleep(1.5)  # NOTE: the replicas' last counters reach the ingress
        hits1, queries1 = prefix_counters(base)
    finally:
        shutdown([name])
    rate = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0
    return Result(label, replicas, rate, tokens / seconds, seconds, tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--systems", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=4)
    args = p.parse_args()

    plain = run_plain(args)
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve",
             log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        setups = [("2 replicas, prefix-aware router", 2, True),
                  ("2 replicas, Ray's default router", 2, False),
                  ("1 replica", 1, True)]
        results = [run_setup(port, label, n, routed, args) for label, n, routed in setups]
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.model}, "
          f"{args.conversations} conversations x {args.turns} turns, {args.systems} system "
          f"prompts, {args.concurrency} at a time, {args.max_tokens} tokens per answer")
    print(f"{'setup':36s} {'hit rate':>9s} {'out tok/s':>10s} {'seconds':>8s} {'tokens':>7s}")
    for r in [plain, *results]:
        print(f"{r.label:36s} {r.hit_rate:9.3f} {r.tok_s:10.1f} {r.seconds:8.1f} {r.tokens:7d}")
    routed, default, single = results
    print(f"\nprefix hit rate, router / Ray default: {routed.hit_rate / max(default.hit_rate, 1e-9):.2f}x"
          f" ({routed.hit_rate:.3f} vs {default.hit_rate:.3f})")
    print(f"output tok/s, router / Ray default:    {routed.tok_s / default.tok_s:.2f}x")
    print(f"output tok/s, 2 replicas / 1 replica:  {routed.tok_s / single.tok_s:.2f}x")
    print(f"output tok/s, 1 Ray replica / ferry serve: {single.tok_s / plain.tok_s:.2f}x (the Ray path's overhead)")


if __name__ == "__main__":
    main()
