"""``ferry bench``: load-test one or more OpenAI-compatible endpoints and compare them.

Exit status: 0 when every request succeeded, 1 when some failed (the summary says which and why),
2 for bad arguments or an unreadable dataset, 130 when interrupted (finished load points are still reported).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any
from urllib.parse import urlsplit

import httpx

from ferry.bench.client import SendOptions, Target, discover_model, normalize_base_url
from ferry.bench.metrics import SLO
from ferry.bench.runner import LoadPoint, PointResult, run_benchmark
from ferry.bench.workload import ENDPOINTS, TokenCounter, WorkloadConfig, iter_requests

DEFAULT_NUM_REQUESTS = 100


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--url", action="append", required=True,
                        help="server base URL, e.g. http://127.0.0.1:8000 (repeat to compare servers)")
    parser.add_argument("--label", action="append", help="a name per --url, in the same order")
    parser.add_argument("--model", help="model name to send (default: the first id in each server's /v1/models)")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="chat",
                        help="/v1/chat/completions or /v1/completions (default: chat)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="closed loop: comma list of requests kept in flight (default: 1)")
    load.add_argument("--request-rate", help="open loop: comma list of Poisson rates in req/s, or inf")
    parser.add_argument("--num-requests", type=int,
                        help=f"requests per load point (default: {DEFAULT_NUM_REQUESTS}, or unbounded "
                             "when --duration is given)")
    parser.add_argument("--duration", type=float, help="seconds per load point; no new request after that")
    parser.add_argument("--dataset", help="builtin (default), synthetic, or a .jsonl file of "
                                          '{"prompt"|"messages", "max_tokens"} lines')
    parser.add_argument("--input-len", type=int, help="synthetic prompts of this many tokens")
    parser.add_argument("--output-len", type=int, help="max_tokens of every request (synthetic or dataset)")
    parser.add_argument("--max-tokens", type=int, help="override every request's max_tokens")
    parser.add_argument("--ignore-eos", action="store_true", help="ask servers to generate all max_tokens")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="shuffles the dataset and draws arrivals (default 0)")
    parser.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT objective in ms")
    parser.add_argument("--slo-itl-ms", type=float, help="goodput: mean inter-token latency objective in ms")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--tokenizer", help="tokenizer.json or HF folder: counts output tokens when a server "
                                            "sends no usage, and makes synthetic prompts exact")
    parser.add_argument("--no-usage", action="store_true",
                        help="do not send stream_options.include_usage (for servers that reject it)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed requests per server before measuring")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument("--out", help="write JSON records here")
    parser.add_argument("--plot", help="write a PNG of throughput and p99 TTFT against load")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_loads(args: argparse.Namespace) -> list[LoadPoint]:
    mode, raw = ("rate", args.request_rate) if args.request_rate else ("concurrency", args.concurrency or "1")
    values = []
    for item in raw.split(","):
        item = item.strip()
        try:
            value = math.inf if item.lower() in ("inf", "infinity") else float(item)
        except ValueError:
            raise ValueError(f"--{'request-rate' if mode == 'rate' else 'concurrency'}: "
                             f"not a number: {item!r}") from None
        values.append(LoadPoint(mode, value))
    return values


def _default_label(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def _labels(args: argparse.Namespace) -> list[str]:
    if args.label is None:
        labels = [_default_label(u) for u in args.url]
    elif len(args.label) != len(args.url):
        raise ValueError(f"--label given {len(args.label)} times for {len(args.url)} --url")
    else:
        labels = list(args.label)
    if len(set(labels)) != len(labels):
        labels = [f"{label}#{i + 1}" for i, label in enumerate(labels)]
    return labels


def _workload(args: argparse.Namespace) -> WorkloadConfig:
    dataset = args.dataset or ("synthetic" if args.input_len is not None else "builtin")
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    return WorkloadConfig(dataset=dataset, num_requests=num_requests, duration_s=args.duration,
                          input_len=args.input_len, output_len=args.output_len, max_tokens=args.max_tokens,
                          ignore_eos=args.ignore_eos, temperature=args.temperature, seed=args.seed,
                          endpoint=args.endpoint)


async def _targets(args: argparse.Namespace, labels: list[str]) -> list[Target]:
    targets = []
    async with httpx.AsyncClient() as client:
        for url, label in zip(args.url, labels):
            base = normalize_base_url(url)
            model = args.model or await discover_model(client, base, args.api_key)
            if model is None:
                print(f"ferry bench: {label}: no model from {base}/models; sending model='default' "
                      "(use --model)", file=sys.stderr)
                model = "default"
            targets.append(Target(base_url=base, label=label, model=model, endpoint=args.endpoint,
                                  api_key=args.api_key))
    return targets


def _workload_record(args: argparse.Namespace, workload: WorkloadConfig, opts: SendOptions, slo: SLO,
                     tokenizer: TokenCounter | None) -> dict[str, Any]:
    return {**workload.to_dict(), "request_usage": opts.request_usage, "timeout_s": opts.timeout_s,
            "warmup": args.warmup, "tokenizer": args.tokenizer if tokenizer is not None else None,
            "slo": slo.to_dict()}


def run(args: argparse.Namespace) -> int:
    try:
        loads = _parse_loads(args)
        labels = _labels(args)
        for url in args.url:
            normalize_base_url(url)
        workload = _workload(args)
        slo = SLO(ttft_ms=args.slo_ttft_ms, itl_ms=args.slo_itl_ms)
        opts = SendOptions(temperature=args.temperature, ignore_eos=args.ignore_eos, seed=args.seed,
                           request_usage=not args.no_usage, timeout_s=args.timeout)
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        tokenizer = None
        if args.tokenizer:
            from ferry.bench.tokens import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        next(iter_requests(workload, tokenizer))  # NOTE: fail on a bad dataset before any request is sent
        if any(lp.mode == "rate" and math.isinf(lp.value) for lp in loads) and workload.num_requests is None:
            raise ValueError("--request-rate inf needs --num-requests")
    except ValueError as e:
        print(f"ferry bench: error: {e}", file=sys.stderr)
        return 2

    done: list[PointResult] = []
    interrupted = False
    try:
        targets = asyncio.run(_targets(args, labels))
        asyncio.run(run_benchmark(targets, loads, workload, opts, slo, tokenizer,
                                  progress=not args.no_progress, warmup=args.warmup, on_point=done.append))
    except KeyboardInterrupt:
        interrupted = True
        print("\nferry bench: interrupted; reporting the load points that finished", file=sys.stderr)
    return _report(args, done, _workload_record(args, workload, opts, slo, tokenizer), interrupted)


def _report(args: argparse.Namespace, done: list[PointResult], workload: dict[str, Any], interrupted: bool) -> int:
    from ferry.bench.report import build_report, format_summary, format_tables, machine_info, write_json

    if done:
        print(format_tables(done))
        print()
    print(format_summary(done))
    if args.out:
        options = {k: v for k, v in vars(args).items() if k != "api_key"}  # NOTE: never write the key to disk
        write_json(args.out, build_report(done, workload, machine_info(), options))
        print(f"wrote {args.out}")
    if args.plot and done:
        from ferry.bench.plot import plot_points

        print(f"wrote {plot_points(done, args.plot)}")
    if interrupted:
        return 130
    return 1 if any(p.metrics.failed for p in done) else 0
