"""Which engine can run a layout, and what to run instead when ``ferry serve`` cannot.

``ferry serve`` runs one device per replica (no tensor or pipeline parallelism: ``server/flags.py``
refuses ``--tensor-parallel-size`` above 1) and holds weights on a GPU as bf16, fp16 or fp32: a GGUF
file's quantized blocks stay packed only on the CPU (``engine/preflight.py``), so a Q4 GGUF on a GPU
costs its bf16 size. Its KV cache has the model's dtype. vLLM and SGLang run tensor and pipeline
parallel layouts and fp8/int8/int4 formats; llama.cpp runs GGUF formats, splitting layers over the
GPUs of one host. A layout ferry cannot run gets ferry-runnable alternatives (a format ferry holds,
one bigger GPU, a smaller model of the family) and the same layout on a vLLM/SGLang backend behind
``ferry gateway``, with that engine's memory flag worked out from the memory plan.

Each engine's memory model, per GPU (``memory`` = the GPU's total memory)::

    ferry  --gpu-memory-utilization F : KV = F x memory - weights - 512 MiB
    vLLM   --gpu-memory-utilization F : F x memory = weights + activations + runtime + KV
    SGLang --mem-fraction-static F    : F x memory = weights + KV    (activations live outside F)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from ferry.planner.catalog import (
    DtypeSpec,
    GpuSpec,
    ModelSpec,
    get_dtype,
    load_gpus,
    load_models,
)
from ferry.planner.errors import PlannerError
from ferry.planner.memory import MemoryPlan, plan_memory

FERRY, VLLM, SGLANG, LLAMA_CPP = "ferry", "vLLM", "SGLang", "llama.cpp"
_GGUF = frozenset({"q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0"})
_FLOAT = frozenset({"fp32", "bf16", "fp16"})
# NOTE: ferry's device flag takes cpu or cuda; it has no ROCm build or test, so AMD GPUs are left to
# the engines that ship one.
_AMD = "AMD"


@dataclass(frozen=True)
class Engine:
    name: str
    multi_gpu: bool  # tensor/pipeline parallel replicas
    multi_node: bool
    gpu_formats: frozenset[str]
    cpu_formats: frozenset[str]
    kv_formats: frozenset[str] | None  # None: the KV cache has the weights' compute dtype
    memory_model: str


ENGINES: tuple[Engine, ...] = (
    Engine(FERRY, False, False, _FLOAT, frozenset({"fp32"}) | _GGUF, None,
           "--gpu-memory-utilization F: the KV cache gets F x total memory - weights - 512 MiB; one device "
           "per replica"),
    Engine(VLLM, True, True, _FLOAT | {"fp8", "int8", "int4"}, frozenset({"fp32", "bf16"}),
           frozenset({"fp32", "bf16", "fp16", "fp8"}),
           "--gpu-memory-utilization F: the share of each GPU's total memory this instance may use for weights, "
           "activations, runtime and KV cache together; the KV cache gets what the rest leaves of F x memory"),
    Engine(SGLANG, True, True, frozenset({"bf16", "fp16", "fp8", "int8", "int4"}), frozenset(),
           frozenset({"bf16", "fp16", "fp8"}),
           "--mem-fraction-static F: the share of each GPU's memory for weights and the KV pool; activations "
           "and CUDA graphs use the rest"),
    Engine(LLAMA_CPP, True, False, _GGUF | {"fp16", "bf16", "fp32"}, _GGUF | {"fp16", "bf16", "fp32"},
           frozenset({"fp32", "fp16", "bf16"}),
           "-c CONTEXT sizes the KV cache for CONTEXT tokens; layers split over the GPUs of one host"),
)


def get_engine(name: str) -> Engine:
    for e in ENGINES:
        if e.name == name:
            return e
    raise PlannerError(f"unknown engine {name!r}; known: {', '.join(e.name for e in ENGINES)}")


def why_not(engine: Engine, gpu: GpuSpec, dtype: DtypeSpec, kv: DtypeSpec, tp: int, pp: int) -> str | None:
    """Why ``engine`` cannot run this layout, or None when it can."""
    on_cpu = gpu.name == "cpu"
    if engine.name == FERRY and _AMD in gpu.description:
        return f"ferry runs on CPUs and CUDA GPUs, not on {gpu.description}"
    if tp * pp > 1 and not engine.multi_gpu:
        return (f"{engine.name} runs one device per replica (no tensor or pipeline parallelism); this layout "
                f"needs {tp * pp} GPUs")
    if pp > 1 and not engine.multi_node:
        return f"{engine.name} runs on one host; this layout needs {pp} nodes"
    formats = engine.cpu_formats if on_cpu else engine.gpu_formats
    if dtype.name not in formats:
        where = "on a CPU" if on_cpu else "on a GPU"
        if engine.name == FERRY and not on_cpu and dtype.name in _GGUF:
            return (f"ferry dequantizes GGUF {dtype.name} weights on a GPU (they cost their bf16 size); it keeps "
                    "them packed only on the CPU")
        return f"{engine.name} does not run {dtype.name} weights {where}" + (
            f" (it runs {', '.join(sorted(formats))})" if formats else "")
    if engine.kv_formats is None:
        want = "fp32" if on_cpu or dtype.compute == "fp32" else (dtype.name if dtype.name in _FLOAT else "bf16")
        if kv.name != want:
            return f"{engine.name}'s KV cache has the model's dtype ({want}), not {kv.name}"
    elif kv.name not in engine.kv_formats:
        return f"{engine.name} does not hold a {kv.name} KV cache"
    return None


def engines_for(gpu: GpuSpec, dtype: DtypeSpec, kv: DtypeSpec, tp: int, pp: int) -> tuple[str, ...]:
    return tuple(e.name for e in ENGINES if why_not(e, gpu, dtype, kv, tp, pp) is None)


@dataclass(frozen=True)
class Runtime:
    """One way to serve the model: an engine, a model at a format, a GPU type, and one replica's memory."""

    kind: str  # planned | ferry-format | bigger-gpu | smaller-model | quantized | backend
    engine: str
    engines: tuple[str, ...]  # every engine that can run this layout
    model: str
    gpu: str
    dtype: str
    kv_dtype: str
    tp: int
    pp: int
    weight_bytes: float
    per_gpu_kv_bytes: float
    kv_tokens: int
    context: int
    max_concurrent_seqs: int
    memory_flag: str  # the engine's memory flag with its value for this layout
    memory_model: str
    command: str
    note: str

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def ferry_runs(self) -> bool:
        return FERRY in self.engines

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "engines": list(self.engines), "gpus": self.gpus, "ferry_runs": self.ferry_runs}


@dataclass(frozen=True)
class LayoutAdvice:
    """Who runs the planned layout; when ferry cannot, what ferry can run and the vLLM/SGLang backend."""

    engines: tuple[str, ...]
    ferry_why_not: str | None  # None: ferry runs the planned layout
    planned: Runtime  # the planned layout under its first engine (ferry when it can)
    alternatives: tuple[Runtime, ...]

    @property
    def ferry_runs(self) -> bool:
        return self.ferry_why_not is None

    def to_dict(self) -> dict[str, Any]:
        return {"engines": list(self.engines), "ferry_runs": self.ferry_runs, "ferry_why_not": self.ferry_why_not,
                "planned": self.planned.to_dict(), "alternatives": [a.to_dict() for a in self.alternatives]}


def hf_repo(model: ModelSpec) -> str:
    """The Hugging Face repo a catalogue entry's source points at, else the model's name."""
    m = re.match(r"https://huggingface\.co/([^/]+/[^/]+)", model.source or "")
    return m.group(1) if m else model.name


_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def runtime(kind: str, engine: str, model: ModelSpec, gpu: GpuSpec, dtype: DtypeSpec, kv: DtypeSpec,
            mem: MemoryPlan, memory_utilization: float, note: str) -> Runtime:
    """The serve command and memory flag for ``mem`` under ``engine``."""
    repo, ctx = hf_repo(model), mem.context
    if engine == FERRY:
        flag = (f"--kv-cache-memory {int(mem.per_gpu_kv_bytes)}" if gpu.name == "cpu"
                else f"--gpu-memory-utilization {memory_utilization:g}")
        fmt = f"--dtype {_TORCH_DTYPE.get(dtype.name, 'float32')}" if dtype.name in _FLOAT else \
            f"(a {dtype.name.upper()} GGUF file)"
        command = f"ferry serve --model {repo} {fmt} --max-model-len {ctx} {flag}"
    elif engine == VLLM:
        flag = f"--gpu-memory-utilization {memory_utilization:g}"
        extra = {"fp8": " --quantization fp8", "int4": " (an AWQ/GPTQ checkpoint)",
                 "int8": " (a W8A8 checkpoint)"}.get(dtype.name, "")
        kvf = " --kv-cache-dtype fp8" if kv.name == "fp8" else ""
        command = (f"vllm serve {repo} --tensor-parallel-size {mem.tp} --pipeline-parallel-size {mem.pp} "
                   f"--max-model-len {ctx} {flag}{kvf}{extra}")
    elif engine == SGLANG:
        # NOTE: SGLang's fraction covers weights and the KV pool only: the same pool as the plan's.
        fraction = (mem.per_gpu_weight_bytes + mem.per_gpu_kv_bytes) / gpu.memory_bytes
        flag = f"--mem-fraction-static {fraction:.2f}"
        command = (f"python -m sglang.launch_server --model-path {repo} --tp {mem.tp} --pp-size {mem.pp} "
                   f"--context-length {ctx} {flag}")
    else:
        flag = f"-c {ctx}"
        command = f"llama-server -m {model.name}-{dtype.name.upper()}.gguf -c {ctx} -ngl 999"
    return Runtime(kind=kind, engine=engine, engines=engines_for(gpu, dtype, kv, mem.tp, mem.pp), model=model.name,
                   gpu=gpu.name, dtype=dtype.name, kv_dtype=kv.name, tp=mem.tp, pp=mem.pp,
                   weight_bytes=mem.weight_bytes, per_gpu_kv_bytes=mem.per_gpu_kv_bytes, kv_tokens=mem.kv_tokens,
                   context=ctx, max_concurrent_seqs=mem.max_concurrent_seqs, memory_flag=flag,
                   memory_model=get_engine(engine).memory_model, command=command, note=note)


@dataclass(frozen=True)
class _Setting:
    """What the memory search needs besides the model, the GPU and the formats."""

    context: int
    memory_utilization: float
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int


def _one_gpu(model: ModelSpec, gpu: GpuSpec, dtype: DtypeSpec, kv: DtypeSpec, s: _Setting) -> MemoryPlan | None:
    if s.context > model.max_position_embeddings:
        return None
    try:
        return plan_memory(model, gpu, dtype, kv, s.context, memory_utilization=s.memory_utilization,
                           block_size=s.block_size, max_num_batched_tokens=s.max_num_batched_tokens,
                           max_num_seqs=s.max_num_seqs, max_nodes=1, max_tp=1)
    except PlannerError:
        return None


_MAX_UTILIZATION = 0.98


def _utilizations(given: float) -> list[float]:
    """The given memory utilization, then higher ones in steps of 0.01 up to ``_MAX_UTILIZATION``."""
    return [given] + [u / 100 for u in range(int(given * 100) + 1, int(_MAX_UTILIZATION * 100) + 1)]


def _ferry_formats(gpu: GpuSpec) -> tuple[DtypeSpec, DtypeSpec]:
    """(weights, KV) as ferry holds them by default on this device."""
    name = "fp32" if gpu.name == "cpu" else "bf16"
    return get_dtype(name), get_dtype(name, for_kv=True)


def _family(name: str) -> str:
    return name.split("-")[0]


def advise(model: ModelSpec, gpu: GpuSpec, dtype: DtypeSpec, kv: DtypeSpec, mem: MemoryPlan, *,
           memory_utilization: float = 0.9, block_size: int = 16, max_num_batched_tokens: int = 2048,
           max_num_seqs: int = 256) -> LayoutAdvice:
    """The engines for the planned layout and, when ferry cannot run it, the alternatives."""
    s = _Setting(mem.context, memory_utilization, block_size, max_num_batched_tokens, max_num_seqs)
    engines = engines_for(gpu, dtype, kv, mem.tp, mem.pp)
    ferry_why = why_not(get_engine(FERRY), gpu, dtype, kv, mem.tp, mem.pp)
    first = FERRY if ferry_why is None else (engines[0] if engines else VLLM)
    planned = runtime("planned", first, model, gpu, dtype, kv, mem, memory_utilization,
                      "the planned layout" if engines else "no engine in ferry's list runs this layout as planned")
    if ferry_why is None:
        return LayoutAdvice(engines, None, planned, ())
    alts: list[Runtime] = []
    fdtype, fkv = _ferry_formats(gpu)
    ferry_ok = why_not(get_engine(FERRY), gpu, fdtype, fkv, 1, 1) is None
    # 1. a format ferry holds, on one GPU of the same kind
    if ferry_ok and (fdtype.name, fkv.name) != (dtype.name, kv.name):
        m1 = _one_gpu(model, gpu, fdtype, fkv, s)
        if m1 is not None:
            alts.append(runtime("ferry-format", FERRY, model, gpu, fdtype, fkv, m1, memory_utilization,
                                f"{model.name} in {fdtype.name} on one {gpu.name}: a format ferry holds"))
    # 2. one bigger GPU that ferry runs on: the one with least memory that holds the model, at the
    # given memory utilization or, failing that, the least utilization up to _MAX_UTILIZATION that fits
    if not any(a.kind == "ferry-format" for a in alts):
        fits = []
        for g in load_gpus().values():
            gd, gk = _ferry_formats(g)
            if g.name in ("cpu", gpu.name) or why_not(get_engine(FERRY), g, gd, gk, 1, 1) is not None:
                continue
            for u in _utilizations(memory_utilization):
                m2 = _one_gpu(model, g, gd, gk, replace(s, memory_utilization=u))
                if m2 is not None:
                    fits.append((g.memory_gib, u, g, gd, gk, m2))
                    break
        if fits:
            _, u, g, gd, gk, m2 = min(fits, key=lambda f: f[0])
            raised = "" if u == memory_utilization else f", at --gpu-memory-utilization {u:g}"
            alts.append(runtime("bigger-gpu", FERRY, model, g, gd, gk, m2, u,
                                f"{model.name} in {gd.name} on one {g.name} ({g.memory_gib:g} GiB{raised})"))
    # 3. replicas of the largest smaller model that ferry runs on one GPU of this kind (same family first)
    if ferry_ok:
        smaller = sorted((m for m in load_models().values() if m.total_params < model.total_params),
                         key=lambda m: (_family(m.name) == _family(model.name), m.total_params), reverse=True)
        for m in smaller:
            m3 = _one_gpu(m, gpu, fdtype, fkv, s)
            if m3 is not None:
                alts.append(runtime("smaller-model", FERRY, m, gpu, fdtype, fkv, m3, memory_utilization,
                                    f"replicas of {m.name} in {fdtype.name}, one {gpu.name} each"))
                break
    # 4. a quantized format on one GPU of this kind: the most bits that fit (engines other than ferry on a GPU)
    if mem.gpus > 1:
        for q in ("fp8", "int8", "q8_0", "q6_k", "q5_k_m", "int4", "q4_k_m"):
            qd = get_dtype(q)
            qk = kv if kv.name != "fp32" else get_dtype("bf16", for_kv=True)
            if qd.name in _GGUF:
                qk = get_dtype("fp16", for_kv=True)
            names = engines_for(gpu, qd, qk, 1, 1)
            if not names:
                continue
            m4 = _one_gpu(model, gpu, qd, qk, s)
            if m4 is not None:
                alts.append(runtime("quantized", names[0], model, gpu, qd, qk, m4, memory_utilization,
                                    f"{model.name} quantized to {q} on one {gpu.name}"
                                    + ("" if FERRY in names else
                                       " (not ferry: " + str(why_not(get_engine(FERRY), gpu, qd, qk, 1, 1)) + ")")))
                break
    # 5. the planned layout on an on-prem vLLM / SGLang backend behind ferry gateway
    for name in (VLLM, SGLANG):
        if name in engines:
            alts.append(runtime("backend", name, model, gpu, dtype, kv, mem, memory_utilization,
                                f"the planned layout on {name}, an on-prem backend behind ferry gateway "
                                "(backend kind: openai or ferry; location: onprem)"))
    return LayoutAdvice(engines, ferry_why, planned, tuple(alts))
