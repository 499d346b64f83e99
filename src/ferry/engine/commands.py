"""`ferry models | pull | rm` (built-in and cached Hub models), `ferry generate "prompt"` and
`ferry chat` (interactive, streamed)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from ferry.config import WEIGHT_FORMATS
from ferry.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ferry.engine.llm_engine import LLM

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command in ("models", "pull", "rm"):
        if command != "models":
            parser.add_argument("model", help="Hub repo id: org/name, or org/name:QUANT for one GGUF quant")
        if command == "pull":
            _add_hub_arguments(parser)
        else:
            parser.add_argument("--download-dir", default=None,
                                help="the cache folder used by pull (default: the huggingface_hub cache)")
        return
    if command == "generate":
        parser.add_argument("prompt", help="the prompt (sent through the chat template unless --raw)")
        parser.add_argument("--raw", action="store_true", help="complete the text as is, no chat template")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="built-in name, .gguf file, Hugging Face folder, or Hub repo id "
                             "(org/name, org/name:QUANT)")
    _add_hub_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS,
                        help="auto: keep GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K "
                             "weights quantized (float32, CPU); "
                             "dense: dequantize them at load")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="a system message for the chat template")
    parser.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="KV pool bytes")


def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main)")
    parser.add_argument("--download-dir", default=None,
                        help="download into this folder instead of the huggingface_hub cache (HF_HOME)")
    parser.add_argument("--gguf-file", default=None,
                        help="which .gguf of a GGUF repo (instead of a :QUANT tag)")


def run(args: argparse.Namespace) -> int:
    if args.command in ("models", "pull", "rm"):
        from ferry.hub import HubError

        _show_hub_log()
        try:
            return {"models": _models, "pull": _pull, "rm": _rm}[args.command](args)
        except HubError as exc:
            print(f"ferry {args.command}: error: {exc}", file=sys.stderr)
            return 2
    _show_hub_log()
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        llm = _load(args)
    except ValueError as exc:  # bad option, unknown model, corrupt file: one clear line
        print(f"ferry {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "generate":
        return _generate(llm, args, params)
    return _chat(llm, args, params)


def _show_hub_log() -> None:
    """Downloads log one line per file (no progress bar off a terminal): show them on stderr
    unless logging is configured already."""
    hub_logger = logging.getLogger("ferry.hub")
    if logging.getLogger().handlers or hub_logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    hub_logger.addHandler(handler)
    hub_logger.setLevel(logging.INFO)


def _models(args: argparse.Namespace) -> int:
    from ferry.hub import cache_dir, list_cached
    from ferry.loader import list_models

    print("built-in models:")
    for m in list_models():
        state = f"installed at {m.path}" if m.installed else f"not installed ({m.install_hint})"
        print(f"  {m.name:40} {m.description}\n  {'':40} {state}")
    cached = list_cached(args.download_dir)
    print(f"Hugging Face Hub models in {cache_dir(args.download_dir)}:")
    if not cached:
        print("  (none; download one with `ferry pull org/name`)")
    for c in cached:
        print(f"  {c.repo_id:40} {_size(c.size_bytes):>10}")
        for q in c.quants:
            shards = f" (+{len(q.files) - 1} shards)" if len(q.files) > 1 else ""
            print(f"    {c.repo_id}:{q.label:<{max(1, 38 - len(c.repo_id))}} {_size(q.size_bytes):>10}  "
                  f"{q.files[0]}{shards}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from ferry.hub import resolve

    path = resolve(args.model, revision=args.revision, download_dir=args.download_dir,
                   gguf_file=args.gguf_file)
    print(path)
    return 0


def _rm(args: argparse.Namespace) -> int:
    from ferry.hub import remove

    removed = remove(args.model, args.download_dir)
    print(f"removed {removed.repo_id} ({removed.what}): freed {_size(removed.freed_bytes)}")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _load(args: argparse.Namespace) -> LLM:
    # NOTE: imported here, not at the top: LLM pulls in torch, which `ferry models` does not need.
    from ferry.engine.llm_engine import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device,
               kv_cache_memory=args.kv_cache_memory, weight_format=args.weight_format,
               revision=args.revision, download_dir=args.download_dir, gguf_file=args.gguf_file)


def _messages(args: argparse.Namespace, history: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": args.system}] if args.system else []) + history


def _generate(llm: LLM, args: argparse.Namespace, params: SamplingParams) -> int:
    if args.raw:
        out = llm.generate(args.prompt, params)[0]
    else:
        out = llm.chat(_messages(args, [{"role": "user", "content": args.prompt}]), params)[0]
    print(out.outputs[0].text)
    return 0


def _chat(llm: LLM, args: argparse.Namespace, params: SamplingParams) -> int:
    from ferry.engine.core import StepError

    engine = llm.engine
    history: list[dict[str, str]] = []
    print("ferry chat: type a message, or /exit to quit.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = llm.tokenizer.encode_chat(_messages(args, history))
        request_id = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(request_id, {"prompt_token_ids": ids}, params)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        shown = 0
        text = ""
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    text = out.outputs[0].text
                    sys.stdout.write(text[shown:])
                    sys.stdout.flush()
                    shown = len(text)
        except StepError as exc:  # the engine freed the turn's request; the chat goes on
            print(f"\nerror: {exc}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": text})
