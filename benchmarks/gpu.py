"""The GPU benchmark: ferry serve on CUDA against vLLM on the same model and load, in one run.

Starts ferry serve (``--device cuda``), measures it with `ferry bench`'s load generator, stops it, then
does the same with vLLM's OpenAI server when vLLM is importable here or ``--vllm-python PATH`` names a
Python that has it (on an HF folder: the model itself, or the GGUF dequantized by transformers). For
each server and load point it prints what vLLM's ``benchmark_serving.py`` prints (successful requests,
duration, input/output tokens, request/output/total token throughput, mean/median/p99 TTFT, TPOT, ITL),
then ferry's ratio over vLLM. The workload is vLLM's ``random`` dataset (prompts of ``--input-len``
tokens on the completions endpoint, ``--output-len`` tokens each, ignore_eos), ferry's built-in chat
prompts (``--dataset builtin``) or a JSONL trace (a ShareGPT-like file of {"messages", "max_tokens"}),
at request rates (open loop, Poisson) or concurrencies (closed loop).

    .venv/bin/python benchmarks/gpu.py [--model smollm2-135m-instruct] [--request-rate 4,16,inf]
        [--num-prompts 200] [--vllm-python ~/venvs/vllm/bin/python] [--markdown gpu.md]
    .venv/bin/python benchmarks/gpu.py --device cpu --num-prompts 8 --concurrency 4   # a CPU check
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from peers import (
    PeerUnavailable,
    ServerSpec,
    base_env,
    ferry_spec,
    free_port,
    hf_folder,
    start_server,
)

from ferry.bench.client import SendOptions, Target, discover_model
from ferry.bench.compare import ratio_table
from ferry.bench.memory import MemorySample, format_mib, process_tree
from ferry.bench.report import build_report, format_vllm_style, machine_info, write_json
from ferry.bench.runner import LoadPoint, PointResult, run_benchmark
from ferry.bench.tokens import load_tokenizer
from ferry.bench.workload import WorkloadConfig


def gpu_memory_mib(pids: set[int]) -> int | None:
    """GPU memory (MiB) nvidia-smi says these processes hold; None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # NOTE: a broken driver must not stop the benchmark; the column shows '-'
    total = 0
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids and used.strip().isdigit():
            total += int(used)
    return total


def vllm_spec(python: Path, model: str, device: str, max_num_seqs: int, max_model_len: int,
              gpu_memory_utilization: float, threads: int) -> ServerSpec:
    port = free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           Path(model).name, "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
           "--max-model-len", str(max_model_len)]
    env = base_env(threads)
    if device == "cpu":
        env.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        cmd += ["--dtype", "bfloat16"]
    else:
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    return ServerSpec("vllm", cmd, port, env, startup_s=1800.0)


def find_vllm(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    return None


def loads(args: argparse.Namespace) -> list[LoadPoint]:
    if args.concurrency:
        return [LoadPoint("concurrency", int(c)) for c in args.concurrency.split(",")]
    return [LoadPoint("rate", math.inf if r.strip() in ("inf", "infinity") else float(r))
            for r in args.request_rate.split(",")]


def workload(args: argparse.Namespace) -> tuple[WorkloadConfig, str]:
    """The workload and the endpoint it is sent to."""
    if args.dataset == "random":
        return (WorkloadConfig(dataset="synthetic", num_requests=args.num_prompts, input_len=args.input_len,
                               output_len=args.output_len, ignore_eos=True, seed=args.seed,
                               endpoint="completions"), "completions")
    return (WorkloadConfig(dataset=args.dataset, num_requests=args.num_prompts, max_tokens=args.output_len,
                           ignore_eos=True, seed=args.seed), "chat")


def run_one(spec: ServerSpec, log_dir: Path, args: argparse.Namespace, tokenizer: Any
            ) -> tuple[list[PointResult], MemorySample | None, int | None]:
    print(f"starting {spec.label} (log: {log_dir / (spec.label + '.log')})", file=sys.stderr)
    server = start_server(spec, log_dir)
    try:
        cfg, endpoint = workload(args)

        async def target() -> Target:
            async with httpx.AsyncClient() as client:
                model = await discover_model(client, server.url + "/v1", None)
            return Target(base_url=server.url + "/v1", label=spec.label, model=model or "default",
                          endpoint=endpoint)

        async def probe(_: Target) -> MemorySample | None:
            return server.memory()

        opts = SendOptions(temperature=0.0, ignore_eos=True, seed=args.seed, request_usage=True,
                           timeout_s=args.timeout)
        points = asyncio.run(run_benchmark([asyncio.run(target())], loads(args), cfg, opts, tokenizer=tokenizer,
                                           progress=True, warmup=args.warmup, memory_probe=probe))
        return points, server.memory(), gpu_memory_mib(set(process_tree(server.proc.pid)))
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="built-in name, .gguf file (vLLM gets it dequantized to an HF folder) or HF folder")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a check on a machine without GPU")
    ap.add_argument("--dtype", default="auto", help="ferry's --dtype (vLLM uses its own auto)")
    ap.add_argument("--vllm-python", help="a Python that imports vLLM (default: this one, when it does)")
    ap.add_argument("--no-vllm", action="store_true", help="measure ferry only")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--request-rate", default="inf", help="comma list of Poisson rates (req/s) or inf")
    load.add_argument("--concurrency", help="comma list of closed-loop concurrencies (instead of rates)")
    ap.add_argument("--dataset", default="random", help="random (vLLM's), builtin, or a .jsonl trace")
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per load point")
    ap.add_argument("--input-len", type=int, default=1024, help="random dataset: prompt tokens")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="both servers' --max-num-seqs")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per server (default: all)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default="results-gpu.json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()

    threads = args.threads or os.cpu_count() or 1
    model = Path(args.model)
    if not model.exists():
        from ferry.loader.registry import resolve

        model = resolve(args.model)
    tokenizer = load_tokenizer(str(model)) if args.dataset == "random" else None  # NOTE: exact prompt lengths
    ferry_flags = ["--device", args.device, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    if args.device != "cpu":
        ferry_flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    specs = [ferry_spec("ferry", model, threads, args.max_num_seqs, ferry_flags)]
    skipped: dict[str, str] = {}
    python = None if args.no_vllm else find_vllm(args.vllm_python)
    if args.no_vllm:
        skipped["vllm"] = "--no-vllm"
    elif python is None:
        skipped["vllm"] = "vLLM is not importable here and no --vllm-python was given"
    else:
        try:
            folder = hf_folder(model) if model.suffix == ".gguf" else model
            specs.append(vllm_spec(python, str(folder), args.device, args.max_num_seqs, args.max_model_len,
                                   args.gpu_memory_utilization, threads))
        except PeerUnavailable as e:
            skipped["vllm"] = str(e)
    for peer, why in skipped.items():
        print(f"skipping {peer}: {why}", file=sys.stderr)

    log_dir = Path(tempfile.mkdtemp(prefix="ferry-gpu-bench-"))
    points: list[PointResult] = []
    memory: dict[str, tuple[MemorySample | None, int | None]] = {}
    for spec in specs:
        try:
            got, rss, gpu_mib = run_one(spec, log_dir, args, tokenizer)
        except PeerUnavailable as e:
            skipped[spec.label] = str(e)
            print(f"skipping {spec.label}: {e}", file=sys.stderr)
            continue
        points += got
        memory[spec.label] = (rss, gpu_mib)

    results = [format_vllm_style(p) for p in points]
    labels = list(dict.fromkeys(p.target.label for p in points))
    ratios = ratio_table(points, "ferry", [lab for lab in labels if lab != "ferry"]) if "ferry" in labels else ""
    mem_rows = ["| server | peak RSS MiB | RSS after MiB | GPU memory MiB (nvidia-smi) |", "|---|---|---|---|"]
    for label, (rss, gpu_mib) in memory.items():
        mem_rows.append(f"| {label} | {format_mib(rss.peak_bytes if rss else None)} | "
                        f"{format_mib(rss.rss_bytes if rss else None)} | {gpu_mib if gpu_mib is not None else '-'} |")
    print(*results, "", ratios, "", "\n".join(mem_rows), sep="\n")
    for peer, why in skipped.items():
        print(f"skipped {peer}: {why}")
    machine = machine_info()
    record = {"dataset": args.dataset, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "device": args.device, "model": str(model)}
    report = build_report(points, record, machine, vars(args))
    report["skipped"] = skipped
    report["servers"] = {s.label: {"cmd": s.cmd} for s in specs}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if args.markdown:
        md = [(f"Measured {time.strftime('%Y-%m-%d')} on {', '.join(machine['gpus']) or 'no GPU'} "
               f"({machine['cpu']}, {machine['cpu_count']} CPUs, flags {' '.join(machine['cpu_flags']) or '-'}), "
               f"device {args.device}, model {model.name}, "
               f"dataset {args.dataset} ({args.num_prompts} requests per point, input {args.input_len}, "
               f"output {args.output_len}, ignore_eos)."), "", ratios, "", *mem_rows, "",
              *[f"- skipped {p}: {w}" for p, w in skipped.items()], "", "Commands:", "", "```",
              *(" ".join(s.cmd) for s in specs), "```", "", "```", *results, "```", ""]
        Path(args.markdown).write_text("\n".join(md), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
