"""Speculative decoding's speed-up on a workload where n-grams repeat, in one run.

Loads SmolLM2 offline (``ferry.LLM``) without speculation, with n-gram prompt lookup and, when
``--draft MODEL`` is given, with that draft model; each runs the same greedy chat prompts that ask
to rewrite, repeat or lightly edit given text and code (summarisation / code-editing answers copy
long spans of their prompt), at concurrency 1 (one request at a time) and ``--concurrency`` (that
many requests batched in the engine). Prints output tok/s, the acceptance rate (accepted /
proposed tokens), the mean accepted length (tokens per verification step, bonus token included),
the speed-up over no speculation, and checks that every greedy answer is the same token for token.
Not a timed test; run it by hand:

    .venv/bin/python benchmarks/speculative.py [--prompts 8] [--max-tokens 128] [--concurrency 8]
        [--num-speculative-tokens 4] [--draft smollm2-135m-instruct] [--disable-by-batch-size 4]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from ferry import LLM, SamplingParams

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
TEXT = ("The river rises in the northern hills, where snow melts slowly through the spring. It "
        "runs south past three small towns, each built around an old stone bridge, and feeds the "
        "orchards that line its banks. In late summer the water is low and clear, and children "
        "wade across the shallows to the islands in the middle of the stream.")
TASKS = [
    f"Rename the function moving_average to rolling_mean and return the code:\n{CODE}",
    f"Add type hints to this function and return the whole code:\n{CODE}",
    f"Repeat this paragraph exactly, then give it a title:\n{TEXT}",
    f"Rewrite this paragraph replacing 'river' with 'stream' everywhere:\n{TEXT}",
    f"Add a docstring to this function and return the whole code:\n{CODE}",
    f"Copy this paragraph, then summarise it in one sentence:\n{TEXT}",
    f"Rename the variable total to running_sum and return the code:\n{CODE}",
    f"Fix the grammar of this paragraph, if needed, and return it in full:\n{TEXT}",
]


@dataclass(frozen=True)
class Result:
    tokens: int
    seconds: float
    drafts: int
    proposed: int
    accepted: int
    outputs: list[list[int]]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def acceptance(self) -> str:
        return f"{self.accepted / self.proposed:.2f}" if self.proposed else "-"

    @property
    def mean_accepted_length(self) -> str:
        return f"{1 + self.accepted / self.drafts:.2f}" if self.drafts else "-"


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    s = llm.engine.stats().spec_decode
    return (0, 0, 0) if s is None else (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens)


def run(llm: LLM, prompts: list[Any], params: SamplingParams, concurrency: int) -> Result:
    before = spec_counts(llm)
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        outputs += [o.outputs[0].token_ids for o in llm.generate(prompts[i:i + concurrency], params)]
    seconds = time.perf_counter() - start
    after = spec_counts(llm)
    return Result(sum(len(o) for o in outputs), seconds, after[0] - before[0],
                  after[1] - before[1], after[2] - before[2], outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--draft", default=None, help="also run this draft model")
    parser.add_argument("--disable-by-batch-size", type=int, default=None, metavar="N",
                        help="also run n-gram lookup with vLLM's disable_by_batch_size=N")
    args = parser.parse_args()
    k = args.num_speculative_tokens
    modes: dict[str, dict[str, Any] | None] = {
        "none": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": k,
                  "prompt_lookup_max": args.prompt_lookup_max,
                  "prompt_lookup_min": args.prompt_lookup_min}}
    if args.disable_by_batch_size:
        modes[f"ngram<{args.disable_by_batch_size}"] = {
            **modes["ngram"], "disable_by_batch_size": args.disable_by_batch_size}  # type: ignore[dict-item]
    if args.draft:
        modes["draft"] = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": k}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results: dict[tuple[str, int], Result] = {}
    for mode, spec in modes.items():
        llm = LLM(args.model, max_model_len=2048, kv_cache_memory=256 << 20,
                  speculative_config=spec)
        prompts = [{"prompt_token_ids": llm.tokenizer.encode_chat(
            [{"role": "user", "content": TASKS[i % len(TASKS)]}])} for i in range(args.prompts)]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        for c in (1, args.concurrency):
            results[mode, c] = run(llm, prompts, params, c)
        del llm
    print(f"{args.prompts} prompts (rewrite / repeat / edit given text and code), greedy, "
          f"max_tokens {args.max_tokens}, k={k}, ngram n in [{args.prompt_lookup_min}, "
          f"{args.prompt_lookup_max}]")
    print(f"{'mode':<9}{'c':>3}{'out tok/s':>11}{'speed-up':>10}{'acceptance':>12}"
          f"{'mean acc. len':>15}{'tokens':>8}  same output")
    for (mode, c), r in results.items():
        plain = results["none", c]
        print(f"{mode:<9}{c:>3}{r.tok_s:>11.1f}{r.tok_s / plain.tok_s:>9.2f}x{r.acceptance:>12}"
              f"{r.mean_accepted_length:>15}{r.tokens:>8}  {r.outputs == plain.outputs}")


if __name__ == "__main__":
    main()
