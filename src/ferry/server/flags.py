"""`ferry serve`'s flags: ferry's own, and those deployment scripts written for `vllm serve` pass.

A vLLM flag is either accepted with vLLM's meaning, accepted with no effect where it only tunes
something ferry does not have (CUDA graphs, worker processes), or refused with one line that names
it; an unknown option is refused the same way, never silently ignored. Errors are one line
(``ferry serve: ...``) and exit code 2, not argparse's usage dump.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ferry.config import (
    WEIGHT_FORMATS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
)
from ferry.engine.llm_engine import read_chat_template
from ferry.server.tool_parsers import PARSERS

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}
# vLLM's spellings of a dtype -> ferry's
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "half", "float")
DEFAULT_MODEL = ModelConfig().model
# NOTE: SamplingParams takes at most 20 logprobs, so vLLM's -1 ("no cap") means 20 here
MAX_LOGPROBS = 20
# vLLM flags that tune what ferry does not have; accepted so that scripts run, with no effect.
# name -> takes a value
NO_OP_FLAGS: dict[str, bool] = {
    "--enforce-eager": False,  # ferry captures no CUDA graphs
    "--max-seq-len-to-capture": True,
    "--disable-custom-all-reduce": False,  # one device: no all-reduce
    "--distributed-executor-backend": True,
    "--disable-frontend-multiprocessing": False,
    "--disable-uvicorn-access-log": False,  # ferry's request log replaces uvicorn's
    "--max-log-len": True,  # ferry never logs prompts
    "--swap-space": True,  # preempted requests are recomputed, never swapped
}


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def parse_bytes(text: str) -> int:
    """'1073741824', '512MiB', '2GB', '1.5gib' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 2GiB, 512MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_token_count(text: str) -> int:
    """vLLM's --max-model-len forms: '4096', '32k' (x1000), '32K' (x1024), '1m', '1M'."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kKmMgG]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32k, 32K)")
    suffix = m.group(2)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(m.group(1)) * scale[suffix])


def parse_json_list(text: str) -> tuple[str, ...]:
    """vLLM's CORS flags: a JSON list of strings, e.g. '["https://a.example"]' or '["*"]'."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"not a JSON list of strings: {text!r} "
                                         "(e.g. '[\"https://app.example\"]')")
    return tuple(value)


class ServeArgumentParser(argparse.ArgumentParser):
    """argparse for `ferry serve`: one-line errors, unknown options refused by name, and vLLM's
    ``--max_model_len`` spelling read as ``--max-model-len``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        argv = [_dashed(a) for a in (sys.argv[1:] if args is None else args)]
        ns, extras = super().parse_known_args(argv, namespace)
        if extras:
            first = next((a for a in extras if a.startswith("-")), extras[0])
            if first.startswith("-"):
                self.error(f"unsupported option {first.split('=', 1)[0]} "
                           f"(see {self.prog} --help)")
            self.error(f"unexpected argument {first!r} (see {self.prog} --help)")
        return ns, extras


def _dashed(arg: str) -> str:
    """'--max_model_len=8' -> '--max-model-len=8' (vLLM accepts both spellings)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if type(parser) is argparse.ArgumentParser:
        # NOTE: `ferry`'s cli builds this parser; its class decides how errors and unknown options
        # are reported, so it becomes ours (same state, our error and parse_known_args).
        parser.__class__ = ServeArgumentParser
    parser.allow_abbrev = False  # NOTE: "--max-model" must not pass for --max-model-len
    parser.usage = "%(prog)s [MODEL] [options]"
    defaults_s, defaults_c, defaults_m = ServerConfig(), CacheConfig(), ModelConfig()
    defaults_sched = SchedulerConfig()
    g = parser.add_argument_group("model")
    g.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as --model (vLLM's `vllm serve MODEL`)")
    g.add_argument("--model", default=None,
                   help="built-in model name, a .gguf file, a Hugging Face folder or Hub repo id "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the names clients may put in `model`, all listed by /v1/models; "
                        "responses carry the first, as vLLM's (default: the model's own name)")
    g.add_argument("--tokenizer", default=None,
                   help="a folder or Hub repo id whose tokenizer replaces the model's")
    g.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo")
    g.add_argument("--download-dir", default=None,
                   help="where Hub downloads go (default: the huggingface_hub cache)")
    g.add_argument("--gguf-file", default=None, help="which .gguf of a Hub repo holding several")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                   help="a Jinja chat template file, or the template itself, replacing the model's")
    g.add_argument("--generation-config", default=defaults_m.generation_config,
                   metavar="auto|vllm|FOLDER",
                   help="auto: requests that leave temperature, top_p, top_k, min_p, "
                        "repetition_penalty or max_tokens unset get the model's "
                        "generation_config.json values; vllm: none; a folder: its "
                        "generation_config.json's (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=_DTYPE_CHOICES,
                   help="auto: float32 on CPU; on a GPU the checkpoint's dtype (a float32 one and "
                        "GGUF files: bfloat16) (default: %(default)s)")
    g.add_argument("--device", default=defaults_m.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--weight-format", default=defaults_m.weight_format, choices=WEIGHT_FORMATS,
                   help="auto: GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights stay "
                        "quantized on ferry's CPU kernels (float32 on CPU); dense: dequantize every weight to --dtype "
                        "(default: %(default)s)")
    g.add_argument("--max-model-len", type=parse_token_count, default=None,
                   help="context length in tokens, e.g. 8192 or 32k (default: the model's)")
    g.add_argument("--seed", type=int, default=defaults_m.seed, help="engine seed")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted; ferry never runs code from a model repository")
    g.add_argument("--max-logprobs", type=int, default=defaults_s.max_logprobs,
                   help="most logprobs / top_logprobs a request may ask for, 0..20; -1: 20 "
                        "(default: %(default)s)")
    e = parser.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=defaults_sched.max_num_seqs,
                   help="sequences in the running batch (default: %(default)s)")
    e.add_argument("--max-num-batched-tokens", type=int,
                   default=defaults_sched.max_num_batched_tokens,
                   help="token budget of one engine step (default: %(default)s)")
    e.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes for the KV cache, e.g. 512MiB (default: a share of free memory)")
    e.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="share of the device's total memory (RAM on CPU) for weights + KV cache: "
                        "the KV cache gets F x total - weights - 512 MiB; excludes "
                        "--kv-cache-memory")
    e.add_argument("--block-size", type=int, default=defaults_c.block_size,
                   help="tokens per KV block (default: %(default)s)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=defaults_c.enable_prefix_caching,
                   help="reuse the KV blocks of shared prompt prefixes")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help=argparse.SUPPRESS)
    e.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=defaults_sched.enable_chunked_prefill,
                   help="split long prompts across engine steps")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="1",
                   help="only 1: ferry runs one device per replica")
    e.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="1",
                   help=argparse.SUPPRESS)
    e.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="1",
                   help=argparse.SUPPRESS)
    e.add_argument("--quantization", "-q", default=None, metavar="gguf",
                   help="only gguf: ferry reads a GGUF file's quantized blocks itself")
    e.add_argument("--kv-cache-dtype", default="auto", metavar="auto",
                   help="only auto: the KV cache has the model's dtype")
    e.add_argument("--load-format", default="auto", metavar="auto|safetensors|gguf",
                   help=argparse.SUPPRESS)
    e.add_argument("--tokenizer-mode", default="auto", metavar="auto|hf", help=argparse.SUPPRESS)
    sp = parser.add_argument_group("speculative decoding")
    sp.add_argument("--speculative-config", default=None, metavar="JSON",
                    help="""vLLM's JSON, e.g. '{"method": "ngram", "num_speculative_tokens": 4, """
                         """"prompt_lookup_max": 4}' or '{"method": "draft_model", "model": M, """
                         """"num_speculative_tokens": 4}' (default: none)""")
    sp.add_argument("--speculative-model", default=None, metavar="MODEL",
                    help="a draft model of the same vocabulary (method draft_model)")
    sp.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                    help="tokens proposed per step (with --speculative-model or "
                         "--speculative-config)")
    s = parser.add_argument_group("server")
    s.add_argument("--host", default=defaults_s.host, help="(default: %(default)s)")
    s.add_argument("--port", type=int, default=defaults_s.port, help="(default: %(default)s)")
    s.add_argument("--api-key", default=os.environ.get("FERRY_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: env "
                        "FERRY_API_KEY; none: open)")
    s.add_argument("--max-queue", type=int, default=defaults_s.max_queue,
                   help="sequences that may wait beyond --max-num-seqs before new requests get "
                        "429 (default: %(default)s)")
    s.add_argument("--max-body-bytes", type=parse_bytes, default=defaults_s.max_body_bytes,
                   help="largest request body; bigger ones get 413 (default: %(default)s)")
    s.add_argument("--shutdown-timeout", type=float, default=defaults_s.shutdown_timeout,
                   help="seconds running requests may finish after SIGTERM (default: %(default)s)")
    s.add_argument("--root-path", default=defaults_s.root_path, metavar="/PREFIX",
                   help="the path prefix a proxy serves ferry under")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--uvicorn-log-level", default=defaults_s.uvicorn_log_level,
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--log-format", default=defaults_s.log_format, choices=["text", "json"])
    s.add_argument("--log-stats-interval", type=_non_negative_seconds, default=10.0, metavar="SECONDS",
                   help="seconds between the one-line throughput/KV summaries in the log; 0: none "
                        "(default: %(default)s)")
    s.add_argument("--disable-log-stats", dest="log_stats", action="store_false", default=True,
                   help="no periodic summary lines (vLLM's flag; as --log-stats-interval 0)")
    s.add_argument("--disable-log-requests", dest="log_requests", action="store_false",
                   default=defaults_s.log_requests, help="no request log lines")
    s.add_argument("--enable-log-requests", dest="log_requests", action="store_true",
                   help=argparse.SUPPRESS)
    t = parser.add_argument_group("tool calling and request fields")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide when to call tools (tool_choice auto), parsing its "
                        "calls with --tool-call-parser")
    t.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS), metavar="NAME",
                   help=f"the format of the model's tool calls: {', '.join(sorted(PARSERS))} "
                        "(default: the one the chat template shows)")
    t.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="with tool_choice none, the chat template does not see the tools")
    t.add_argument("--strict-params", action="store_true",
                   help="refuse (400) request fields ferry does not use, instead of ignoring "
                        "them with a logged warning as vLLM does")
    h = parser.add_argument_group("CORS and HTTPS")
    h.add_argument("--allowed-origins", type=parse_json_list, default=defaults_s.allowed_origins,
                   metavar="JSON", help="""origins browsers may call from, e.g. '["*"]' """
                                        "(default: none, no CORS headers)")
    h.add_argument("--allowed-methods", type=parse_json_list, default=defaults_s.allowed_methods,
                   metavar="JSON", help="""(default: '["*"]')""")
    h.add_argument("--allowed-headers", type=parse_json_list, default=defaults_s.allowed_headers,
                   metavar="JSON", help="""(default: '["*"]')""")
    h.add_argument("--allow-credentials", action="store_true", help="allow CORS credentials")
    h.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key ...")
    h.add_argument("--ssl-certfile", default=None, help="... and this certificate")
    h.add_argument("--ssl-ca-certs", default=None, help="CA file for client certificates")
    h.add_argument("--ssl-cert-reqs", type=int, default=defaults_s.ssl_cert_reqs,
                   help="0: no client certificate, 1: optional, 2: required (default: 0)")
    r = parser.add_argument_group(
        "scale-out on Ray Serve (pip install 'ferry[cluster]'; see docs/scale-out.md)")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve N engine replicas on Ray Serve behind one endpoint (default: one "
                        "engine in this process, no Ray)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --replicas: the Ray cluster to join, e.g. auto or HOST:6379 "
                        "(default: start a local Ray)")
    r.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="with --replicas: CPUs per replica, also its engine's threads "
                        "(default: %(default)s)")
    r.add_argument("--replica-gpus", type=float, default=0.0, metavar="N",
                   help="with --replicas: GPUs per replica (default: %(default)s)")
    r.add_argument("--no-prefix-routing", dest="prefix_routing", action="store_false",
                   default=True, help="with --replicas: Ray's default router instead of ferry's "
                                      "prefix-aware one")
    v = parser.add_argument_group(
        "vLLM flags accepted with no effect",
        "--enforce-eager, --swap-space and other tuning of what ferry does "
        "not have (the list: docs/server.md)")
    for name, takes_value in NO_OP_FLAGS.items():
        v.add_argument(name, dest=f"noop_{name[2:].replace('-', '_')}", help=argparse.SUPPRESS,
                       **({"metavar": "X"} if takes_value else {"action": "store_true"}))


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """ValueError (one line, naming the flag) for a vLLM flag ferry cannot honour."""
    for flag, value in (("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--pipeline-parallel-size", args.pipeline_parallel_size),
                        ("--data-parallel-size", args.data_parallel_size)):
        if value != 1:
            raise ValueError(f"{flag} {value} is not supported: ferry runs one device per "
                             "replica; scale out with replicas (several `ferry serve` behind "
                             "`ferry gateway`)")
    if args.quantization not in (None, "gguf"):
        raise ValueError(f"--quantization {args.quantization} is not supported: ferry runs "
                         "float weights, or a GGUF file's quantized blocks (--quantization gguf)")
    if args.kv_cache_dtype != "auto":
        raise ValueError(f"--kv-cache-dtype {args.kv_cache_dtype} is not supported: the KV "
                         "cache has the model's dtype (auto)")
    if args.load_format not in ("auto", "safetensors", "gguf"):
        raise ValueError(f"--load-format {args.load_format} is not supported "
                         "(auto, safetensors, gguf)")
    if args.tokenizer_mode not in ("auto", "hf"):
        raise ValueError(f"--tokenizer-mode {args.tokenizer_mode} is not supported (auto, hf): "
                         "ferry reads tokenizer.json")
    if not -1 <= args.max_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"--max-logprobs {args.max_logprobs} is not supported: ferry returns "
                         f"at most {MAX_LOGPROBS} logprobs per token (0..{MAX_LOGPROBS}, or -1)")
    if args.gpu_memory_utilization is not None and args.kv_cache_memory is not None:
        raise ValueError("--gpu-memory-utilization and --kv-cache-memory both size the KV cache; "
                         "give one")


def _model(args: argparse.Namespace) -> str:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    return args.model_tag or args.model or DEFAULT_MODEL


def _check_files(args: argparse.Namespace) -> None:
    for flag, value in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile),
                        ("--ssl-ca-certs", args.ssl_ca_certs)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
    gen = args.generation_config
    if gen not in ("auto", "vllm") and not (Path(gen).expanduser() / "generation_config.json").is_file():
        raise ValueError(f"--generation-config {gen}: not auto, vllm or a folder holding "
                         "generation_config.json")
    if args.chat_template is not None:
        read_chat_template(args.chat_template)  # a path that cannot be read: ValueError now


def speculative_from_args(args: argparse.Namespace) -> SpeculativeConfig | None:
    """--speculative-config JSON, plus the short forms --speculative-model and
    --num-speculative-tokens; ValueError (one line) when they are malformed or disagree."""
    fields: dict[str, Any] = {}
    if args.speculative_config is not None:
        try:
            fields = json.loads(args.speculative_config)
        except ValueError as exc:
            raise ValueError(f"--speculative-config is not valid JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise ValueError("--speculative-config must be a JSON object, e.g. "
                             """'{"method": "ngram", "num_speculative_tokens": 4}'""")
    for flag, key, value in (("--speculative-model", "model", args.speculative_model),
                             ("--num-speculative-tokens", "num_speculative_tokens",
                              args.num_speculative_tokens)):
        if value is None:
            continue
        if key in fields and fields[key] != value:
            raise ValueError(f"{flag} {value} disagrees with --speculative-config's {key} "
                             f"{fields[key]!r}")
        fields[key] = value
    if not fields:
        return None
    if "method" not in fields and "model" not in fields:
        raise ValueError("--num-speculative-tokens needs --speculative-model or "
                         "--speculative-config (e.g. '{\"method\": \"ngram\"}')")
    try:
        return SpeculativeConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--speculative-config: {exc}") from exc


def _served_names(names: list[str] | None) -> tuple[str | None, tuple[str, ...]]:
    if not names:
        return None, ()
    unique = tuple(dict.fromkeys(names))
    return unique[0], unique[1:]


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Build (and so validate) the frozen configs; ValueError (one line) names the bad flag."""
    _refuse_unsupported(args)
    _check_files(args)
    dtype = _DTYPE_ALIASES.get(args.dtype, args.dtype)
    engine = EngineConfig(
        model=ModelConfig(model=_model(args), dtype=dtype, device=args.device,
                          max_model_len=args.max_model_len, seed=args.seed,
                          weight_format=args.weight_format, revision=args.revision,
                          download_dir=args.download_dir, gguf_file=args.gguf_file,
                          tokenizer=args.tokenizer, chat_template=args.chat_template,
                          generation_config=args.generation_config),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                          enable_prefix_caching=args.enable_prefix_caching,
                          gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  enable_chunked_prefill=args.enable_chunked_prefill),
        speculative=speculative_from_args(args),
    )
    name, aliases = _served_names(args.served_model_name)
    server = ServerConfig(
        host=args.host, port=args.port, served_model_name=name, served_model_aliases=aliases,
        api_key=args.api_key or None, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
        log_format=args.log_format, log_requests=args.log_requests,
        uvicorn_log_level=args.uvicorn_log_level,
        max_logprobs=MAX_LOGPROBS if args.max_logprobs == -1 else args.max_logprobs,
        root_path=args.root_path, allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials, ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs, enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        strict_params=args.strict_params)
    if server.max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {server.max_body_bytes}")
    if server.shutdown_timeout < 0:
        raise ValueError(f"shutdown_timeout must be >= 0, got {server.shutdown_timeout}")
    return engine, server


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords that the flags set (HTTPS, uvicorn's log level)."""
    return {"ssl_keyfile": server.ssl_keyfile, "ssl_certfile": server.ssl_certfile,
            "ssl_ca_certs": server.ssl_ca_certs, "ssl_cert_reqs": server.ssl_cert_reqs,
            "log_level": server.uvicorn_log_level}
