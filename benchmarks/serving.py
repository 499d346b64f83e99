"""The serving benchmark: ferry vs the naive Hugging Face baseline, measured in one run on this machine.

Starts `ferry serve` and the naive baseline (`transformers` ``generate()`` behind the same OpenAI API, one
request at a time) on the same SmolLM2 GGUF, then runs `ferry bench` against both at each concurrency
with 128 output tokens (ignore_eos), and prints the tables and the ratio ferry/naive. When
``llama-cpp-python`` is installed its OpenAI server on the same GGUF is a third column; otherwise it is
skipped with a message. This is not a timed test; run it by hand:

    .venv/bin/python benchmarks/serving.py [--concurrency 1,4,16,32] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ferry.bench.client import SendOptions, Target, discover_model
from ferry.bench.report import build_report, format_tables, machine_info, write_json
from ferry.bench.runner import LoadPoint, PointResult, run_benchmark
from ferry.bench.workload import WorkloadConfig

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess with its log in a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, label: str, cmd: list[str], port: int, env: dict[str, str], log_dir: Path) -> None:
        self.label, self.port = label, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{label}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float, health_path: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + health_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # NOTE: still starting; poll again
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} not ready after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def ratio_table(points: list[PointResult], base: str, others: list[str]) -> str:
    by = {(p.target.label, p.load.label): p.metrics for p in points}
    loads = list(dict.fromkeys(p.load.label for p in points))
    header = ["load"] + [f"{lab} out tok/s" for lab in [base, *others]] + [f"{o}/{base}" for o in others]
    header += [f"{lab} TTFT p99 ms" for lab in [base, *others]]
    rows = []
    for load in loads:
        row = [load]
        thr = {lab: by[(lab, load)].output_throughput if (lab, load) in by else None for lab in [base, *others]}
        ttft = {lab: (by[(lab, load)].ttft.p99 if (lab, load) in by and by[(lab, load)].ttft else None)
                for lab in [base, *others]}
        row += [f"{thr[lab]:,.1f}" if thr[lab] is not None else "-" for lab in [base, *others]]
        row += [f"{thr[o] / thr[base]:.1f}x" if thr[o] and thr[base] else "-" for o in others]
        row += [f"{ttft[lab]:,.0f}" if ttft[lab] is not None else "-" for lab in [base, *others]]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)),
             " | ".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join("| " + line + " |" for line in lines)


def goals(points: list[PointResult], ferry: str, naive: str) -> list[str]:
    by = {(p.target.label, p.load.label): p.metrics for p in points}
    loads = list(dict.fromkeys(p.load.label for p in points))
    out = []
    if (ferry, "c=16") in by and (naive, "c=16") in by and by[(naive, "c=16")].output_throughput > 0:
        r = by[(ferry, "c=16")].output_throughput / by[(naive, "c=16")].output_throughput
        out.append(f"output tok/s ferry/naive at c=16: {r:.1f}x (goal >= 10x: {'met' if r >= 10 else 'NOT met'})")
    lower = []
    for load in loads:
        f, n = by.get((ferry, load)), by.get((naive, load))
        if f and n and f.ttft and n.ttft:
            lower.append((load, f.ttft.p99 < n.ttft.p99))
    if lower:
        bad = [load for load, ok in lower if not ok]
        out.append("TTFT p99 lower than naive at every point: " + ("met" if not bad else f"NOT met at {', '.join(bad)}"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or .gguf path")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1,
                        help="requests per point = max(--min-requests, rounds x concurrency)")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads per server")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    parser.add_argument("--ferry-variants", default="float32",
                        help="one ferry server per DTYPE[:WEIGHT_FORMAT], e.g. "
                             "float32,float32:dense,bfloat16 (plain float32, the default "
                             "configuration, is labelled 'ferry'; others 'ferry-<dtype>[-<format>]')")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", default="results-serving.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--markdown", default=None, help="write the measured tables as markdown here")
    args = parser.parse_args()

    gguf = Path(args.model)
    if not gguf.is_file():
        from ferry.loader.registry import resolve

        gguf = resolve(args.model)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log_dir = Path(tempfile.mkdtemp(prefix="ferry-serving-bench-"))
    servers: list[tuple[Server, str]] = []
    try:
        for variant in args.ferry_variants.split(","):
            dtype, _, weight_format = variant.partition(":")
            port = free_port()
            label = "ferry" if variant == "float32" else f"ferry-{variant.replace(':', '-')}"
            servers.append((Server(label, [sys.executable, "-m", "ferry.cli", "serve", "--model", str(gguf),
                                           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs",
                                           str(max(64, max(concurrencies))), "--dtype", dtype,
                                           "--weight-format", weight_format or "auto",
                                           "--log-level", "warning"],
                                   port, env, log_dir), "/health"))
        if not args.skip_naive:
            port = free_port()
            servers.append((Server("naive", [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"),
                                             "--model", str(gguf), "--port", str(port),
                                             "--threads", str(args.threads)], port, env, log_dir), "/health"))
        if importlib.util.find_spec("llama_cpp") is not None:
            port = free_port()
            servers.append((Server("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                                 "--host", "127.0.0.1", "--port", str(port), "--n_threads",
                                                 str(args.threads)], port, env, log_dir), "/v1/models"))
        else:
            print("llama-cpp-python is not installed (PyPI has no wheel for this machine): "
                  "skipping the llama.cpp column", file=sys.stderr)
        for server, health in servers:
            print(f"starting {server.label} on {server.url} (log: {server.log_path})", file=sys.stderr)
            server.wait_ready(600, health)

        async def targets() -> list[Target]:
            async with httpx.AsyncClient() as client:
                return [Target(base_url=s.url + "/v1", label=s.label,
                               model=await discover_model(client, s.url + "/v1", None) or "default")
                        for s, _ in servers]

        target_list = asyncio.run(targets())
        opts = SendOptions(temperature=0.0, ignore_eos=True, request_usage=True, timeout_s=args.timeout)
        points: list[PointResult] = []
        for c in concurrencies:
            n = max(args.min_requests, args.rounds * c)
            workload = WorkloadConfig(num_requests=n, max_tokens=args.output_len, ignore_eos=True)
            points += asyncio.run(run_benchmark(target_list, [LoadPoint("concurrency", c)], workload, opts,
                                                progress=True, warmup=args.warmup if c == concurrencies[0] else 0))
    finally:
        for server, _ in servers:
            server.stop()

    labels = [t.label for t in target_list]
    machine = machine_info()
    tables = format_tables(points)
    ratios = ratio_table(points, "naive", [lab for lab in labels if lab != "naive"]) if "naive" in labels else ""
    verdicts = goals(points, "ferry", "naive") if "naive" in labels else []
    print(tables, "", ratios, "", *verdicts, sep="\n")
    workload_record = {"dataset": "builtin", "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0,
                       "num_requests": f"max({args.min_requests}, {args.rounds} x concurrency)",
                       "warmup": args.warmup, "threads_per_server": args.threads, "model": str(gguf)}
    write_json(args.out, build_report(points, workload_record, machine, vars(args)))
    print(f"wrote {args.out}")
    if args.plot:
        from ferry.bench.plot import plot_points

        print(f"wrote {plot_points(points, args.plot)}")
    if args.markdown:
        md = [f"Measured {time.strftime('%Y-%m-%d')} on {machine['cpu']} ({machine['cpu_count']} CPUs, "
              f"{machine['memory_gib']} GiB, GPUs: {', '.join(machine['gpus']) or 'none'}), "
              f"{args.threads} thread(s) per server, model {gguf.name}, {args.output_len} output tokens "
              f"(ignore_eos), built-in prompts, requests per point = max({args.min_requests}, "
              f"{args.rounds} x concurrency).", "", ratios, "", *[f"- {v}" for v in verdicts], "",
              "```", tables, "```", ""]
        Path(args.markdown).write_text("\n".join(md), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
