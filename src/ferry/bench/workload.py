"""What the load generator sends: the built-in chat prompts, synthetic fixed-length prompts, JSONL traces,
and when each request leaves (Poisson arrivals for open-loop runs).

Everything here is deterministic given a seed, so two runs against two servers send the same requests
in the same order.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from itertools import count, islice
from typing import Any, Iterator, Protocol

ENDPOINTS = ("chat", "completions")
DEFAULT_MAX_TOKENS = 128
_ROLES = ("system", "user", "assistant", "developer", "tool")

# NOTE: common English words that SmolLM2/Llama-style BPE vocabularies keep as one token each (with the
# leading space), so N words is close to N prompt tokens even without a tokenizer to trim to exactly N.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which be have are not had "
    "one all were but can when there been would their more about time some like them into only other "
    "these then could first made most over people after many also water long little very down way day "
    "did just good new work know place year back where much before right through old great small three "
    "under last same another each well large must even because any found still between house world "
    "never while city open seemed together next white children begin got walk example light paper group "
    "always music those both mark often letter until mile river car feet care second book carry took "
    "science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face "
    "wood main enough plain girl usual young ready above ever red list though feel talk bird soon body "
    "dog family direct pose leave song measure door product black short numeral class wind question "
    "happen complete ship area half rock order fire south problem piece told knew pass since top whole "
    "king space heard best hour better true during hundred five remember step early hold west ground "
    "interest reach fast verb sing listen six table travel less morning ten simple several toward war "
    "lay against pattern slow center love person money serve appear road map rain rule govern pull cold "
    "notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star"
).split()


class TokenCounter(Protocol):
    """Anything that can turn text into token ids and back (see ``ferry.bench.tokens``)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: a completion ``prompt`` or chat ``messages`` (exactly one), and ``max_tokens``."""

    max_tokens: int
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request needs exactly one of prompt or messages")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    def text(self) -> str:
        """The prompt as plain text (chat messages joined), for counting prompt tokens."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None  # invariant of __post_init__
        return "\n".join(m["content"] for m in self.messages)

    def body(self, endpoint: str) -> dict[str, Any]:
        """The endpoint-specific part of the request body (``messages`` or ``prompt``)."""
        if endpoint == "chat":
            if self.messages is not None:
                return {"messages": [dict(m) for m in self.messages]}
            return {"messages": [{"role": "user", "content": self.prompt}]}
        if endpoint == "completions":
            if self.prompt is None:
                raise ValueError("chat messages need --endpoint chat; the completions endpoint takes a prompt")
            return {"prompt": self.prompt}
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")


@dataclass(frozen=True)
class WorkloadConfig:
    """The exact workload of a run; it is written into every JSON record."""

    dataset: str = "builtin"  # "builtin" | "synthetic" | path to a .jsonl file
    num_requests: int | None = 100  # per load point; None: only --duration bounds the run
    duration_s: float | None = None  # per load point: no new request after this many seconds
    input_len: int | None = None  # synthetic prompts: tokens per prompt
    output_len: int | None = None  # synthetic prompts: max_tokens per request
    max_tokens: int | None = None  # overrides every request's max_tokens
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    endpoint: str = "chat"

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("num_requests or duration_s must bound the run")
        if self.num_requests is not None and self.num_requests <= 0:
            raise ValueError(f"num_requests must be positive, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        for name in ("input_len", "output_len", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.dataset == "synthetic" and self.input_len is None:
            raise ValueError("input_len is required for the synthetic dataset")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "num_requests": self.num_requests, "duration_s": self.duration_s,
            "input_len": self.input_len, "output_len": self.output_len, "max_tokens": self.max_tokens,
            "ignore_eos": self.ignore_eos, "temperature": self.temperature, "seed": self.seed,
            "endpoint": self.endpoint,
        }


def _parse_row(row: Any, where: str) -> RequestSpec:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    max_tokens = row.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise ValueError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: messages must be a non-empty list")
        for m in msgs:
            if (not isinstance(m, dict) or m.get("role") not in _ROLES
                    or not isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: each message needs a role in {_ROLES} and a string content")
        return RequestSpec(max_tokens=max_tokens,
                           messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs))
    if isinstance(row.get("prompt"), str):
        return RequestSpec(max_tokens=max_tokens, prompt=row["prompt"])
    raise ValueError(f"{where}: each line needs a string 'prompt' or a list of 'messages'")


def parse_jsonl(text: str, source: str) -> list[RequestSpec]:
    specs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        specs.append(_parse_row(row, f"{source}:{lineno}"))
    if not specs:
        raise ValueError(f"{source}: no requests in the file")
    return specs


def load_jsonl(path: str | Path) -> list[RequestSpec]:
    """A trace: one ``{"prompt"|"messages", "max_tokens"}`` object per line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"dataset file not found: {p}")
    return parse_jsonl(p.read_text(encoding="utf-8"), str(p))


def load_builtin() -> list[RequestSpec]:
    """The built-in chat prompts shipped in ``ferry/bench/data/prompts.jsonl``."""
    text = resources.files("ferry.bench").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return parse_jsonl(text, "builtin")


def synthetic_prompt(input_len: int, rng: random.Random, tokenizer: TokenCounter | None = None) -> str:
    """Random common words; exactly ``input_len`` tokens when a tokenizer is given, about that many otherwise."""
    words = [rng.choice(_WORDS) for _ in range(input_len)]
    text = " ".join(words)
    if tokenizer is None:
        return text
    ids = tokenizer.encode(text)
    while len(ids) < input_len:  # NOTE: a tokenizer may merge words; top up until long enough
        ids = tokenizer.encode(tokenizer.decode(ids) + " " + rng.choice(_WORDS))
    return tokenizer.decode(ids[:input_len])


def _as_completion(spec: RequestSpec) -> RequestSpec:
    # NOTE: the built-in dataset is chat-shaped; for the completions endpoint its turns become the prompt.
    if spec.prompt is not None:
        return spec
    return RequestSpec(max_tokens=spec.max_tokens, prompt=spec.text())


def iter_requests(cfg: WorkloadConfig, tokenizer: TokenCounter | None = None) -> Iterator[RequestSpec]:
    """An endless, seeded stream of requests for ``cfg``: the dataset shuffled once, then cycled.

    ``--max-tokens`` (or ``--output-len`` for a dataset) overrides every request's own ``max_tokens``.
    A bad dataset raises ``ValueError`` here, before anything is sent.
    """
    chat = cfg.endpoint == "chat"
    override = cfg.max_tokens or cfg.output_len
    if cfg.dataset == "synthetic":
        return _synthetic_stream(cfg.input_len or 0, override or DEFAULT_MAX_TOKENS, cfg.seed, chat, tokenizer)
    pool = load_builtin() if cfg.dataset == "builtin" else load_jsonl(cfg.dataset)
    if not chat:
        if cfg.dataset != "builtin" and any(s.prompt is None for s in pool):
            raise ValueError(f"{cfg.dataset}: chat messages need --endpoint chat; "
                             "the completions endpoint takes a prompt")
        pool = [_as_completion(s) for s in pool]
    if override is not None:
        pool = [RequestSpec(max_tokens=override, prompt=s.prompt, messages=s.messages) for s in pool]
    random.Random(cfg.seed).shuffle(pool)
    return (pool[i % len(pool)] for i in count())


def _synthetic_stream(input_len: int, max_tokens: int, seed: int, chat: bool,
                      tokenizer: TokenCounter | None) -> Iterator[RequestSpec]:
    rng = random.Random(seed)
    while True:
        text = synthetic_prompt(input_len, rng, tokenizer)
        if chat:
            yield RequestSpec(max_tokens=max_tokens, messages=({"role": "user", "content": text},))
        else:
            yield RequestSpec(max_tokens=max_tokens, prompt=text)


def build_requests(cfg: WorkloadConfig, n: int, tokenizer: TokenCounter | None = None) -> list[RequestSpec]:
    """The first ``n`` requests of :func:`iter_requests`."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return list(islice(iter_requests(cfg, tokenizer), n))


def iter_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Endless send times (seconds from the start) of a Poisson process of ``rate`` requests/s.

    Gaps are exponential with mean 1/rate, drawn from ``random.Random(seed)``; ``rate=inf`` sends all at 0.
    """
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if math.isinf(rate):
        return (0.0 for _ in count())
    return _poisson_stream(rate, seed)


def _poisson_stream(rate: float, seed: int) -> Iterator[float]:
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """The first ``n`` send times of :func:`iter_arrivals`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(islice(iter_arrivals(rate, seed), n))
