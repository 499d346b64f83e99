"""``ferry plan --calibrate URL``: measure a live OpenAI-compatible server, fit the roofline's efficiency
factors to what it measured, and store them in a profile that ``--profile FILE`` plans with.
``--calibrate-from FILE`` fits a ``ferry bench --out`` file instead: the live sweep writes its levels in
that file's format too, so both go through one path (``measurements_from_bench`` ->
``profile_from_measurements``) from bench records to the throughput model.

The sweep is short and bounded: at each concurrency ``C`` (closed loop: ``C`` workers, each sending its
next request when the last one ends), a fixed number of streamed completions with ``ignore_eos`` so every
request generates exactly ``output_tokens``; a deadline caps the whole sweep. Per level it records mean
TTFT, mean ITL and output tokens/s.

The fit searches the four factors (memory, compute, prefill efficiency; per-step overhead) on a log grid,
then twice on finer grids around the best point, minimising the squared log-error of the predicted ITL,
TTFT and output tok/s at every measured level (``throughput.serving_point``, vectorised below).
NOTE: with few levels several factor sets explain the data equally well (a fixed per-step cost or slow
weight streaming; where the roofline's knee lies between two levels; the compute efficiency of a GPU
measured only while memory-bound). A tie-break far below any measurable error then leans toward the
defaults of ``throughput.default_efficiency``: a small per-step overhead, so step time stays flat while
decode is memory-bound and bends up at the knee, as measured on ferry's CPU engine (SmolLM2: ITL
54, 58, 82 ms at concurrency 1, 2, 4), rather than growing linearly from the first level.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ferry.planner.errors import PlannerError
from ferry.planner.throughput import (
    Efficiency,
    Replica,
    default_efficiency,
    prefill_flops,
    serving_point,
)
from ferry.sse import DONE, aiter_sse_data

PROFILE_VERSION = 1
BENCH_SCHEMA = "ferry.bench/1"  # NOTE: ferry.bench.report.SCHEMA; the planner may not import the bench package
_WORDS = ("the of and to in is was for on that with as by at from they this which be have are not had one all "
          "were but can when there been would their more about time some like them into only other these then "
          "could first made most over people after many also water long little very down way day").split()


@dataclass(frozen=True)
class Measurement:
    """One concurrency level of the sweep (means over its requests)."""

    concurrency: int
    requests: int
    prompt_tokens: float
    output_tokens: float
    ttft_s: float
    itl_s: float
    output_tok_s: float  # all output tokens of the level / the level's wall time
    wall_s: float

    def __post_init__(self) -> None:
        if self.concurrency <= 0 or self.requests <= 0:
            raise PlannerError("a measurement needs a positive concurrency and request count")
        for name in ("ttft_s", "itl_s", "output_tok_s", "prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise PlannerError(f"measurement {name} must be positive, got {value!r}")


@dataclass(frozen=True)
class Profile:
    """Fitted efficiency factors and the measurements they came from."""

    model: str  # what --model resolves (catalogue name or path)
    gpu: str
    dtype: str
    kv_dtype: str
    efficiency: Efficiency
    prompt_tokens: int
    output_tokens: int
    measurements: tuple[Measurement, ...]
    fit_rms_log_error: float
    url: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "model": self.model, "gpu": self.gpu, "dtype": self.dtype,
                "kv_dtype": self.kv_dtype, "efficiency": self.efficiency.to_dict(),
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "measurements": [asdict(m) for m in self.measurements],
                "fit_rms_log_error": self.fit_rms_log_error, "url": self.url, "created": self.created}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_profile(path: str | Path) -> Profile:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise PlannerError(f"cannot read profile {str(path)!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise PlannerError(f"profile {str(path)!r} is not valid JSON: {e}") from e
    try:
        if data.get("version") != PROFILE_VERSION:
            raise PlannerError(f"profile {str(path)!r}: unsupported version {data.get('version')!r}")
        return Profile(model=str(data["model"]), gpu=str(data["gpu"]), dtype=str(data["dtype"]),
                       kv_dtype=str(data["kv_dtype"]), efficiency=Efficiency(**data["efficiency"]),
                       prompt_tokens=int(data["prompt_tokens"]), output_tokens=int(data["output_tokens"]),
                       measurements=tuple(Measurement(**m) for m in data["measurements"]),
                       fit_rms_log_error=float(data["fit_rms_log_error"]), url=str(data.get("url", "")),
                       created=str(data.get("created", "")))
    except (KeyError, TypeError, AttributeError) as e:
        raise PlannerError(f"profile {str(path)!r} is malformed: {e!r}") from e


# ---- the fit --------------------------------------------------------------------------------------


def predict_grid(r: Replica, batch: np.ndarray, prompt_tokens: float, output_tokens: float, mem: np.ndarray,
                 comp: np.ndarray, pre: np.ndarray, overhead: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``serving_point`` (ITL, TTFT, output tok/s) over broadcast arrays of batches and factors."""
    # batch: [..., K] levels; mem/comp/pre/overhead broadcast against it
    kv = r.model.kv_bytes_per_token(r.kv_dtype.bytes)
    context = prompt_tokens + output_tokens / 2
    prompt = int(round(prompt_tokens))
    t_mem = (r.weight_bytes + batch * context * kv) / (r.bandwidth * mem)
    t_comp = batch * 2 * r.model.matmul_params / (r.flops * comp)
    comm = np.vectorize(r.comm_time)(batch) if (r.tp > 1 or r.pp > 1) else 0.0
    t_pm = prefill_flops(r.model, prompt) / (r.flops * pre)
    itl = overhead + np.maximum(t_mem, t_comp) + comm + batch / output_tokens * t_pm
    prefill = overhead + np.maximum(r.weight_bytes / (r.bandwidth * mem), t_pm) + r.comm_time(prompt)
    ttft = prefill + (batch - 1) / batch * itl / 2
    tok_s = batch * output_tokens / (ttft + (output_tokens - 1) * itl)
    return itl, ttft, tok_s


def _objective(r: Replica, ms: tuple[Measurement, ...], prompt: float, output: float, mem: np.ndarray,
               comp: np.ndarray, pre: np.ndarray, overhead: np.ndarray) -> np.ndarray:
    batch = np.array([m.concurrency for m in ms], dtype=float)
    itl, ttft, tok_s = predict_grid(r, batch, prompt, output, mem[..., None], comp[..., None], pre[..., None],
                                    overhead[..., None])
    err = (np.log(itl / np.array([m.itl_s for m in ms])) ** 2 + np.log(ttft / np.array([m.ttft_s for m in ms])) ** 2
           + np.log(tok_s / np.array([m.output_tok_s for m in ms])) ** 2)
    return err.mean(axis=-1) / 3


def fit_efficiency(r: Replica, measurements: tuple[Measurement, ...] | list[Measurement], *,
                   prompt_tokens: float | None = None, output_tokens: float | None = None) -> tuple[Efficiency, float]:
    """The efficiency factors that best reproduce ``measurements``; returns them and the RMS log error."""
    prior_eff = default_efficiency(r.gpu)
    ms = tuple(measurements)
    if not ms:
        raise PlannerError("calibration needs at least one measurement")
    prompt = prompt_tokens if prompt_tokens is not None else sum(m.prompt_tokens for m in ms) / len(ms)
    output = output_tokens if output_tokens is not None else sum(m.output_tokens for m in ms) / len(ms)
    max_overhead = 0.99 * min(min(m.itl_s for m in ms), min(m.ttft_s for m in ms))
    prior_overhead = min(1.0, prior_eff.step_overhead_s / max_overhead)
    # log10 of the efficiencies and overhead as a share of max_overhead; searched then refined
    lo, hi = np.array([-4.0, -4.0, -4.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0])
    steps = np.array([20, 20, 20, 16])
    best = (lo + hi) / 2
    for _ in range(3):
        axes = [np.linspace(lo[d], hi[d], steps[d]) for d in range(4)]
        grid = np.meshgrid(*axes, indexing="ij")
        mem, comp, pre = (10.0 ** g for g in grid[:3])
        overhead = grid[3] * max_overhead
        obj = _objective(r, ms, prompt, output, mem, comp, pre, overhead)
        # NOTE: a tie-break far below any error the measurements can tell apart: what the data leaves
        # open leans toward the default factors (module docstring).
        prior = sum((g - math.log10(d)) ** 2 for g, d in zip(grid[:3], (prior_eff.memory, prior_eff.compute,
                                                                           prior_eff.prefill)))
        prior = prior + 4 * (grid[3] - prior_overhead) ** 2
        score = obj + 1e-6 * prior
        idx = np.unravel_index(np.argmin(score), score.shape)
        best = np.array([axes[d][idx[d]] for d in range(4)])
        width = (hi - lo) / (steps - 1)
        lo = np.maximum(best - 2 * width, [-4.0, -4.0, -4.0, 0.0])
        hi = np.minimum(best + 2 * width, [0.0, 0.0, 0.0, 1.0])
        steps = np.array([13, 13, 13, 13])
    eff = Efficiency(memory=float(10 ** best[0]), compute=float(10 ** best[1]), prefill=float(10 ** best[2]),
                     step_overhead_s=float(best[3] * max_overhead))
    rms = float(math.sqrt(_objective(r, ms, prompt, output, np.array(eff.memory), np.array(eff.compute),
                                     np.array(eff.prefill), np.array(eff.step_overhead_s))))
    return eff, rms


def predicted_vs_measured(r: Replica, eff: Efficiency, ms: tuple[Measurement, ...], prompt_tokens: int,
                          output_tokens: int) -> list[dict[str, float]]:
    rows = []
    for m in ms:
        p = serving_point(r, m.concurrency, prompt_tokens, output_tokens, eff)
        rows.append({"concurrency": m.concurrency, "measured_tok_s": m.output_tok_s, "predicted_tok_s": p.output_tok_s,
                     "measured_itl_ms": m.itl_s * 1000, "predicted_itl_ms": p.itl_s * 1000,
                     "measured_ttft_ms": m.ttft_s * 1000, "predicted_ttft_ms": p.ttft_s * 1000})
    return rows


# ---- the sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepConfig:
    url: str  # base URL, with or without /v1
    concurrencies: tuple[int, ...] = (1, 4)
    requests_per_level: int | None = None  # None: 2 x concurrency, at least 3
    prompt_tokens: int = 64
    output_tokens: int = 32
    timeout_s: float = 300.0  # the whole sweep
    api_key: str | None = None
    model: str | None = None  # the served model name; None: the first of GET /v1/models

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise PlannerError(f"--calibrate needs an http(s) URL, got {self.url!r}")
        if not self.concurrencies or any(c <= 0 for c in self.concurrencies):
            raise PlannerError(f"--calibrate-concurrency must list positive integers, got {self.concurrencies}")
        if self.requests_per_level is not None and self.requests_per_level <= 0:
            raise PlannerError("--calibrate-requests must be positive")
        if self.prompt_tokens <= 0 or self.output_tokens < 2:
            raise PlannerError("calibration needs prompt tokens >= 1 and output tokens >= 2")
        if not 0 < self.timeout_s <= 3600:
            raise PlannerError(f"--calibrate-timeout must be in (0, 3600] seconds, got {self.timeout_s}")

    @property
    def base(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/v1") else u + "/v1"

    def requests_at(self, concurrency: int) -> int:
        return self.requests_per_level or max(3, 2 * concurrency)


@dataclass(frozen=True)
class _Timing:
    ttft_s: float
    itl_s: float
    prompt_tokens: int
    output_tokens: int


def synthetic_prompt(tokens: int, index: int = 0) -> str:
    """About ``tokens`` tokens of common words (one BPE token each in Llama-style vocabularies).

    Each ``index`` draws its own words: identical prompts would hit the server's prefix cache and
    skip the prefill that the roofline model charges for.
    """
    rng = random.Random(index)
    return " ".join(rng.choice(_WORDS) for _ in range(tokens))


async def _one_request(client: Any, cfg: SweepConfig, model: str, deadline: float,
                       index: int) -> _Timing:
    body = {"model": model, "prompt": synthetic_prompt(cfg.prompt_tokens, index),
            "max_tokens": cfg.output_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []
    usage: dict[str, Any] = {}
    timeout = max(1.0, deadline - time.monotonic())
    async with client.stream("POST", cfg.base + "/completions", json=body, timeout=timeout) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")[:300]
            raise PlannerError(f"calibration request failed: HTTP {resp.status_code}: {text}")
        async for payload in aiter_sse_data(resp):
            if payload.strip() == DONE:
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                arrivals.append(time.perf_counter())
    if len(arrivals) < 2:
        raise PlannerError("calibration: the server streamed fewer than 2 tokens; does it honour ignore_eos?")
    n_out = int(usage.get("completion_tokens") or len(arrivals))
    n_in = int(usage.get("prompt_tokens") or cfg.prompt_tokens)
    # NOTE: chunks may carry several tokens; spread the decode time over the tokens the usage reports.
    itl = (arrivals[-1] - arrivals[0]) / max(1, n_out - 1)
    return _Timing(arrivals[0] - start, itl, n_in, n_out)


async def _level(client: Any, cfg: SweepConfig, model: str, concurrency: int, deadline: float,
                 indices: Iterator[int]) -> dict[str, Any]:
    total = cfg.requests_at(concurrency)
    remaining = [total]
    timings: list[_Timing] = []

    async def worker() -> None:
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            timings.append(await _one_request(client, cfg, model, deadline, next(indices)))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    if len(timings) < total:
        raise PlannerError(f"calibration ran past --calibrate-timeout at concurrency {concurrency} "
                           f"({len(timings)}/{total} requests done)")
    return _bench_record(cfg, model, concurrency, timings, wall)


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000.0
    return {"count": len(values), "mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))}


def _bench_record(cfg: SweepConfig, model: str, concurrency: int, timings: list[_Timing], wall: float
                  ) -> dict[str, Any]:
    """One level of the sweep as a ``ferry bench --out`` record (the fields calibration reads, same meanings)."""
    n = len(timings)
    prompt, output = sum(t.prompt_tokens for t in timings), sum(t.output_tokens for t in timings)
    return {"label": cfg.url, "url": cfg.base, "model": model, "endpoint": "completions", "mode": "concurrency",
            "load": concurrency, "load_label": f"c={concurrency}", "num_requests": n, "ok": n, "failed": 0,
            "duration_s": wall, "total_prompt_tokens": prompt, "total_output_tokens": output,
            "request_throughput": n / wall, "output_throughput": output / wall,
            "total_throughput": (prompt + output) / wall,
            "ttft_ms": _stats_ms([t.ttft_s for t in timings]), "tpot_ms": _stats_ms([t.itl_s for t in timings])}


async def measure(cfg: SweepConfig, transport: Any = None) -> dict[str, Any]:
    """Run the sweep; returns it as a ``ferry bench --out`` document, one record per concurrency.

    ``transport``: an ``httpx`` transport to use instead of the network (tests).
    """
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    deadline = time.monotonic() + cfg.timeout_s
    try:
        async with httpx.AsyncClient(headers=headers, timeout=30.0, transport=transport) as client:
            model = cfg.model
            if model is None:
                resp = await client.get(cfg.base + "/models")
                if resp.status_code != 200:
                    raise PlannerError(f"GET {cfg.base}/models: HTTP {resp.status_code}")
                data = resp.json().get("data") or []
                if not data:
                    raise PlannerError(f"GET {cfg.base}/models lists no model")
                model = str(data[0]["id"])
            indices = itertools.count()
            await _one_request(client, cfg, model, deadline, next(indices))  # warm-up, not measured
            results = [await _level(client, cfg, model, c, deadline, indices)
                       for c in cfg.concurrencies]
    except httpx.HTTPError as e:
        raise PlannerError(f"calibration against {cfg.url} failed: {type(e).__name__}: {e}") from e
    workload = {"dataset": "synthetic", "input_len": cfg.prompt_tokens, "output_len": cfg.output_tokens,
                "ignore_eos": True, "temperature": 0.0, "endpoint": "completions", "source": "ferry plan --calibrate"}
    return {"schema": BENCH_SCHEMA, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": workload, "records": [{**r, "workload": workload} for r in results]}


def profile_from_measurements(replica: Replica, model_ref: str, ms: list[Measurement] | tuple[Measurement, ...],
                              source: str) -> tuple[Profile, list[dict[str, float]]]:
    """Measurements -> fitted factors -> profile, and predicted-vs-measured rows for the report.

    The one path from measured load levels to the throughput model, for a live sweep and a bench file alike.
    """
    ms = tuple(sorted(ms, key=lambda m: m.concurrency))
    if not ms:
        raise PlannerError("calibration needs at least one measurement")
    prompt = round(sum(m.prompt_tokens for m in ms) / len(ms))
    output = round(sum(m.output_tokens for m in ms) / len(ms))
    eff, rms = fit_efficiency(replica, ms, prompt_tokens=prompt, output_tokens=output)
    profile = Profile(model=model_ref, gpu=replica.gpu.name, dtype=replica.dtype.name, kv_dtype=replica.kv_dtype.name,
                      efficiency=eff, prompt_tokens=prompt, output_tokens=output, measurements=ms,
                      fit_rms_log_error=rms, url=source, created=datetime.now(timezone.utc).isoformat())
    return profile, predicted_vs_measured(replica, eff, ms, prompt, output)


def calibrate(cfg: SweepConfig, replica: Replica, model_ref: str
              ) -> tuple[Profile, list[dict[str, float]], dict[str, Any]]:
    """Measure a live server into a bench document, then fit it as ``--calibrate-from`` fits a file.

    Returns the profile, the predicted-vs-measured rows and the bench document (``--bench-out`` saves it).
    """
    doc = asyncio.run(measure(cfg))
    _, ms = measurements_from_bench(doc)
    profile, rows = profile_from_measurements(replica, model_ref, ms, cfg.url)
    return profile, rows, doc


# ---- a `ferry bench --out` file -------------------------------------------------------------------


def read_bench(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise PlannerError(f"cannot read bench file {str(path)!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise PlannerError(f"bench file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("schema") != BENCH_SCHEMA or not isinstance(doc.get("records"), list):
        raise PlannerError(f"{str(path)!r} is not a `ferry bench --out` file (schema {BENCH_SCHEMA!r} with records)")
    return doc


def measurements_from_bench(doc: dict[str, Any], label: str | None = None) -> tuple[str, list[Measurement]]:
    """One measurement per closed-loop load point of one server in a ``ferry bench --out`` document.

    Returns the server's label (or URL) and the measurements. A run fit for calibration measured every
    output token (``--ignore-eos`` keeps lengths fixed), at one or more ``--concurrency`` levels, with no
    failed request. Per level: TTFT = mean TTFT, ITL = mean TPOT (a request's decode time over its
    tokens after the first, as the live sweep times it), output tok/s = output tokens / the level's wall time.
    """
    records = [r for r in doc["records"] if isinstance(r, dict)]
    labels = sorted({str(r.get("label") or r.get("url")) for r in records})
    if label is None:
        if len(labels) != 1:
            raise PlannerError(f"the bench file has records of {len(labels)} servers ({', '.join(labels)}); "
                               "pick one with --bench-label")
        label = labels[0]
    mine = [r for r in records if str(r.get("label") or r.get("url")) == label]
    if not mine:
        raise PlannerError(f"no records for --bench-label {label!r}; the file has {', '.join(labels)}")
    closed = [r for r in mine if r.get("mode") == "concurrency"]
    if not closed:
        raise PlannerError("calibration needs closed-loop load points (ferry bench --concurrency 1,4 ...); "
                           "the file has only --request-rate ones")
    ms = []
    for r in closed:
        try:
            where = f"bench record {label} concurrency {r['load']}"
            if r["failed"]:
                raise PlannerError(f"{where}: {r['failed']} requests failed; calibrate from a clean run")
            ok = int(r["ok"])
            if ok <= 0 or r["ttft_ms"] is None or r["tpot_ms"] is None:
                raise PlannerError(f"{where}: no request measured both TTFT and time per output token")
            ms.append(Measurement(concurrency=int(r["load"]), requests=ok,
                                  prompt_tokens=r["total_prompt_tokens"] / ok,
                                  output_tokens=r["total_output_tokens"] / ok,
                                  ttft_s=float(r["ttft_ms"]["mean"]) / 1000, itl_s=float(r["tpot_ms"]["mean"]) / 1000,
                                  output_tok_s=float(r["output_throughput"]), wall_s=float(r["duration_s"])))
        except PlannerError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlannerError(f"bench record {label}: malformed: {e!r}") from e
    if len({m.concurrency for m in ms}) != len(ms):
        raise PlannerError(f"the bench file has the same concurrency twice for {label}")
    return label, ms
