"""Offline throughput: ferry's LLM.generate against Hugging Face generate() one request at a time.

Both run in this process on the same GGUF (SmolLM2 by default), greedy, ``--output-len`` tokens
each with EOS ignored. The naive loop's tok/s does not depend on how many requests it runs (they
run one after another), so it measures ``--naive-requests`` of them to keep the run short.

    python benchmarks/offline_throughput.py [--num-prompts 64] [--output-len 128]
        [--variants float32,float32:dense,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ferry import LLM, SamplingParams
from ferry.loader import resolve

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--naive-requests", type=int, default=3)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--variants", default="float32",
                    help="ferry configurations DTYPE[:WEIGHT_FORMAT] to measure, e.g. "
                         "float32,float32:dense,bfloat16 (the naive loop is float32)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    model_path = str(resolve(args.model)) if not args.model.endswith(".gguf") else args.model
    naive_prompts: list[list[int]] = []
    rows: list[tuple[str, int, float]] = []
    result: dict[str, object] = {"model": args.model, "num_prompts": args.num_prompts,
                                 "output_len": args.output_len,
                                 "torch_threads": torch.get_num_threads(),
                                 "machine": platform.machine()}
    best = {}
    for variant in args.variants.split(","):
        dtype, _, weight_format = variant.partition(":")
        llm = LLM(model_path, kv_cache_memory=args.kv_cache_memory, dtype=dtype,
                  weight_format=weight_format or "auto")
        prompts = [llm.tokenizer.encode_chat(m) for m in chat_prompts(args.num_prompts)]
        naive_prompts = prompts[:args.naive_requests]
        run_ferry(llm, prompts[:2], 8)  # warm-up
        single_s, single_tokens = run_ferry(llm, prompts[:1], args.output_len)
        batch_s, batch_tokens = run_ferry(llm, prompts, args.output_len)
        rows.append((f"ferry {variant}, 1 prompt", single_tokens, single_s))
        rows.append((f"ferry {variant}, {args.num_prompts} prompts", batch_tokens, batch_s))
        best[variant] = batch_tokens / batch_s
        key = variant.replace(":", "_")
        result[f"ferry_{key}_batch_tok_s"] = round(batch_tokens / batch_s, 1)
        result[f"ferry_{key}_single_stream_tok_s"] = round(single_tokens / single_s, 1)
        del llm
    naive_s, naive_tokens = run_naive(naive_prompts, args.output_len, model_path)
    naive_tps = naive_tokens / naive_s
    result["naive_tok_s"] = round(naive_tps, 1)
    print(f"{'setup':40} {'tokens':>8} {'seconds':>9} {'tok/s':>8} {'vs naive':>9}")
    for label, tokens, secs in [("naive HF generate(), one at a time", naive_tokens, naive_s), *rows]:
        tps = tokens / secs
        print(f"{label:40} {tokens:8d} {secs:9.1f} {tps:8.1f} {tps / naive_tps:8.1f}x")
    for variant, tps in best.items():
        result[f"ratio_{variant.replace(':', '_')}_over_naive"] = round(tps / naive_tps, 1)
        print(f"ratio ferry ({variant}) / naive, throughput: {tps / naive_tps:.1f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
