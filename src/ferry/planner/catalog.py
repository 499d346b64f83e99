"""Hardware, model and number-format catalogues: YAML data files in ``planner/data``, plus models read
directly from a Hugging Face ``config.json`` (or its folder) or a GGUF file.

Every catalogue value carries its source; the code here only parses and validates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ferry.planner.errors import PlannerError
from ferry.shapes import ModelShape, ShapeError, hf, shape_from_gguf, shape_from_hf_config
from ferry.shapes.gguf import gguf_value

GIB = 1024**3

# ---- GPUs ---------------------------------------------------------------------------------------

_GPU_FIELDS = ("memory_gib", "bandwidth_gb_s", "fp32_tflops", "bf16_tflops", "fp8_tflops", "interconnect",
               "interconnect_gb_s", "gpus_per_node", "runtime_overhead_gib", "power_w",
               "on_demand_usd_per_hour", "reserved_usd_per_hour", "purchase_usd")
_GPU_PRICE_FIELDS = ("on_demand_usd_per_hour", "reserved_usd_per_hour", "purchase_usd", "power_w")


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator (or a CPU socket): memory, speed, interconnect, prices and power."""

    name: str
    description: str
    memory_gib: float
    bandwidth_gb_s: float
    fp32_tflops: float
    bf16_tflops: float
    fp8_tflops: float | None
    interconnect: str
    interconnect_gb_s: float
    gpus_per_node: int
    runtime_overhead_gib: float
    power_w: float
    on_demand_usd_per_hour: float
    reserved_usd_per_hour: float
    purchase_usd: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("memory_gib", "bandwidth_gb_s", "fp32_tflops", "bf16_tflops", "power_w", "purchase_usd",
                     "on_demand_usd_per_hour", "reserved_usd_per_hour"):
            _require_positive(f"gpus.{self.name}.{name}", getattr(self, name))
        for name in ("interconnect_gb_s", "runtime_overhead_gib"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise PlannerError(f"gpus.{self.name}.{name} must be a non-negative number, got {value!r}")
        if self.fp8_tflops is not None:
            _require_positive(f"gpus.{self.name}.fp8_tflops", self.fp8_tflops)
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node <= 0:
            raise PlannerError(f"gpus.{self.name}.gpus_per_node must be a positive integer")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gb_s * 1e9

    def flops(self, compute: str) -> float:
        """Dense FLOP/s at a compute format (``fp32``, ``bf16``, ``fp8``); fp8 falls back to bf16."""
        if compute == "fp32":
            return self.fp32_tflops * 1e12
        if compute == "fp8" and self.fp8_tflops is not None:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    def with_prices(self, overrides: dict[str, Any]) -> GpuSpec:
        """The same GPU with prices or power replaced (from a ``--costs`` file)."""
        unknown = set(overrides) - set(_GPU_PRICE_FIELDS)
        if unknown:
            raise PlannerError(f"costs: gpus.{self.name}: unknown keys {sorted(unknown)}, "
                               f"expected some of {list(_GPU_PRICE_FIELDS)}")
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(overrides)
        values["sources"] = {**self.sources, **{k: "--costs file" for k in overrides}}
        return GpuSpec(**values)


@lru_cache(maxsize=1)
def load_gpus() -> dict[str, GpuSpec]:
    data = _read_data("gpus.yaml")
    gpus = {}
    for name, entry in data.items():
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key in _GPU_FIELDS:
            item = entry.get(key)
            if not isinstance(item, dict) or "value" not in item or not item.get("source"):
                raise PlannerError(f"gpus.yaml: {name}.{key} must be {{value, source}}")
            values[key] = item["value"]
            sources[key] = item["source"]
        gpus[name] = GpuSpec(name=name, description=entry.get("description", name), sources=sources, **values)
    return gpus


def get_gpu(name: str) -> GpuSpec:
    gpus = load_gpus()
    key = name.strip().lower()
    if key not in gpus:
        raise PlannerError(f"unknown GPU {name!r}; known: {', '.join(gpus)}")
    return gpus[key]


# ---- number formats -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DtypeSpec:
    name: str
    bits: float
    compute: str  # fp32 | bf16 | fp8: the matmul rate used for this format
    kv: bool  # may hold the KV cache
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _require_positive(f"dtypes.{self.name}.bits", self.bits)
        if self.compute not in ("fp32", "bf16", "fp8"):
            raise PlannerError(f"dtypes.{self.name}.compute must be fp32, bf16 or fp8, got {self.compute!r}")

    @property
    def bytes(self) -> float:
        return self.bits / 8


@lru_cache(maxsize=1)
def load_dtypes() -> dict[str, DtypeSpec]:
    return {name: DtypeSpec(name=name, **entry) for name, entry in _read_data("dtypes.yaml").items()}


_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float8": "fp8", "fp8_e4m3": "fp8", "awq": "int4", "gptq": "int4"}


def get_dtype(name: str, *, for_kv: bool = False) -> DtypeSpec:
    dtypes = load_dtypes()
    key = _DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in dtypes:
        raise PlannerError(f"unknown dtype {name!r}; known: {', '.join(dtypes)}")
    spec = dtypes[key]
    if for_kv and not spec.kv:
        kv_names = [d for d, s in dtypes.items() if s.kv]
        raise PlannerError(f"--kv-dtype {name!r} cannot hold the KV cache; use one of {', '.join(kv_names)}")
    return spec


# ---- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiPrice:
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("input_usd_per_mtok", "output_usd_per_mtok"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise PlannerError(f"api price {name} must be a non-negative number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec(ModelShape):
    """A decoder-only transformer with a gated MLP (Llama, Qwen2, Mistral, Mixtral, Gemma 2, Phi-3, ...):
    its shape (``ferry.shapes.ModelShape``) plus experts, provenance, published counts and API price."""

    name: str
    architecture: str
    num_local_experts: int = 1
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None  # None: intermediate_size
    shared_expert_intermediate_size: int = 0
    source: str = field(default="", compare=False)
    published_params: float | None = field(default=None, compare=False)
    published_active_params: float | None = field(default=None, compare=False)
    api_price: ApiPrice | None = field(default=None, compare=False)
    # GGUF only: the file's exact parameter count, tensor bytes and its active parameters
    file_params: int | None = None
    file_weight_bytes: int | None = None
    file_active_params: int | None = None
    file_type: str | None = None

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:
            raise PlannerError(f"model {self.name!r}: {e}") from e
        for name in ("num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlannerError(f"model {self.name!r}: {name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise PlannerError(f"model {self.name!r}: num_experts_per_tok exceeds num_local_experts")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    # NOTE: counts follow the Hugging Face module layout: q/k/v/o projections, a gated MLP
    # (gate, up, down) per expert, two RMSNorms per layer, a final norm, and an LM head unless tied.
    def _attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        bias = (q + 2 * kv) if self.attention_bias else 0
        return h * q + 2 * h * kv + q * h + bias

    def _mlp_params(self, experts: int) -> int:
        h = self.hidden_size
        if not self.is_moe:
            return 3 * h * self.intermediate_size
        inter = self.moe_intermediate_size or self.intermediate_size
        router = h * self.num_local_experts
        shared = 3 * h * self.shared_expert_intermediate_size
        return experts * 3 * h * inter + router + shared

    def _count(self, experts: int) -> int:
        h, v = self.hidden_size, self.vocab_size
        per_layer = self._attention_params() + self._mlp_params(experts) + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + self.num_hidden_layers * per_layer + h

    @property
    def total_params(self) -> int:
        return self.file_params if self.file_params is not None else self._count(self.num_local_experts)

    @property
    def active_params(self) -> int:
        """Parameters used per token: MoE models run only ``num_experts_per_tok`` experts."""
        if self.file_active_params is not None:
            return self.file_active_params
        return self._count(self.num_experts_per_tok)

    @property
    def matmul_params(self) -> int:
        """Active parameters that take part in matmuls per token (the embedding lookup does not)."""
        lookup = self.vocab_size * self.hidden_size if not self.tie_word_embeddings else 0
        return self.active_params - lookup


@lru_cache(maxsize=1)
def load_models() -> dict[str, ModelSpec]:
    models = {}
    for name, entry in _read_data("models.yaml").items():
        entry = dict(entry)
        entry.pop("aliases", None)
        # NOTE: the catalogue lists head_dim as config.json does; ModelShape stores it as an override.
        entry["head_dim_override"] = entry.pop("head_dim", None)
        pub = entry.pop("published_params", None)
        pub_active = entry.pop("published_active_params", None)
        api = entry.pop("api_price", None)
        try:
            models[name] = ModelSpec(
                name=name, published_params=pub["value"] if pub else None,
                published_active_params=pub_active["value"] if pub_active else None,
                api_price=ApiPrice(**api) if api else None, **entry)
        except TypeError as e:
            raise PlannerError(f"models.yaml: {name}: {e}") from e
    return models


@lru_cache(maxsize=1)
def _model_aliases() -> dict[str, str]:
    aliases = {}
    for name, entry in _read_data("models.yaml").items():
        aliases[name.lower()] = name
        for alias in entry.get("aliases", ()):
            aliases[str(alias).lower()] = name
    return aliases


def resolve_model(spec: str) -> ModelSpec:
    """A catalogue name or alias, a ``config.json``, a Hugging Face folder, a ``.gguf`` file, or a
    Hub repo id (``org/name``, ``org/name:QUANT``)."""
    text = spec.strip()
    name = _model_aliases().get(text.lower())
    if name is not None:
        return load_models()[name]
    # NOTE: imported here: huggingface_hub loads only when a spec is not a catalogue name
    from ferry.hub import is_repo_id

    if is_repo_id(text):
        return model_from_hub(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return model_from_hf_config(path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return model_from_gguf(ggufs[0])
        raise PlannerError(f"folder {text!r} has no config.json (and not exactly one .gguf file)")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return model_from_gguf(path)
        return model_from_hf_config(path)
    raise PlannerError(f"unknown model {spec!r}: not a catalogue name ({', '.join(load_models())}) "
                       "nor an existing config.json, folder or .gguf file")


def model_from_hub(spec: str, *, revision: str | None = None, download_dir: str | None = None,
                   gguf_file: str | None = None) -> ModelSpec:
    """A Hub repo's shape, as ``ferry serve`` would load it: only ``config.json`` of a safetensors
    repo is downloaded; of a GGUF repo, the chosen quant's file (its tensor table gives the bytes)."""
    from ferry.hub import HubError, resolve_config

    try:
        path = resolve_config(spec, revision=revision, download_dir=download_dir, gguf_file=gguf_file)
    except HubError as e:
        raise PlannerError(str(e)) from e
    if path.suffix.lower() == ".gguf":
        return model_from_gguf(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlannerError(f"cannot read config.json of {spec!r}: {e}") from e
    if not isinstance(data, dict):
        raise PlannerError(f"config.json of {spec!r} is not a JSON object")
    return model_from_hf_dict(data, name=spec.split(":", 1)[0].rsplit("/", 1)[-1], source=spec)


def model_from_hf_config(path: Path) -> ModelSpec:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlannerError(f"cannot read Hugging Face config {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise PlannerError(f"{str(path)!r} is not a JSON object")
    return model_from_hf_dict(data, name=Path(path).parent.name or Path(path).stem, source=str(path))


def model_from_hf_dict(data: dict[str, Any], name: str, source: str = "") -> ModelSpec:
    """Read the architecture from a Hugging Face config dict (multimodal configs: their ``text_config``).

    The shape follows ``ferry.shapes.shape_from_hf_config``, exactly as the engine's loader reads it.
    """
    cfg = hf.text_config(data)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
    try:
        return shape_from_hf_config(
            data, ModelSpec, name=name, architecture=hf.architecture(data) or hf.model_type(data) or "unknown",
            num_local_experts=int(experts), num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1)
            if experts > 1 else 1,
            moe_intermediate_size=cfg.get("moe_intermediate_size"),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            source=source)
    except ShapeError as e:
        raise PlannerError(f"config {source or name!r} {e}; "
                           "ferry plan reads decoder-only transformer configs (Llama-style)") from e
    except TypeError as e:  # NOTE: a value of the wrong type (a list for a size, ...)
        raise PlannerError(f"config {source or name!r}: {e}") from e


# GGUF general.file_type (llama.cpp's LLAMA_FTYPE) -> our dtype name, where we have one
_GGUF_FILE_TYPES = {0: "fp32", 1: "fp16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 15: "q4_k_m", 17: "q5_k_m",
                    18: "q6_k", 32: "bf16"}


def model_from_gguf(path: Path) -> ModelSpec:
    """Read the shape from GGUF metadata and the exact parameter count and bytes from its tensor table."""
    try:
        st = Path(path).stat()
    except OSError as e:
        raise PlannerError(f"cannot read GGUF file {str(path)!r}: {e}") from e
    # NOTE: reading the metadata parses the whole token list (seconds); a changed file has a new key.
    return _model_from_gguf(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _model_from_gguf(path: str, mtime_ns: int, size: int) -> ModelSpec:
    from gguf import GGUFReader  # NOTE: imported here: only GGUF inputs pay for it

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise PlannerError(f"cannot read GGUF file {str(path)!r}: {e}") from e
    # NOTE: the token list is by far the largest array and the shape does not need it (the vocab size
    # comes from token_embd.weight), so it is never converted.
    metadata = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("tokenizer.")}
    arch = metadata.get("general.architecture")
    if not arch:
        raise PlannerError(f"GGUF file {str(path)!r} has no general.architecture")
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    total = sum(int(t.n_elements) for t in reader.tensors)
    base = metadata.get("general.basename") or metadata.get("general.name") or Path(path).stem
    size_label = metadata.get("general.size_label")
    ftype = metadata.get("general.file_type")
    try:
        experts = int(gguf_value(metadata, "expert_count", 0) or 1)
        used = int(gguf_value(metadata, "expert_used_count", 0) or 1) if experts > 1 else 1
        expert_elems = sum(int(t.n_elements) for t in reader.tensors if "_exps" in t.name)
        return shape_from_gguf(
            metadata, tensors, ModelSpec, name=f"{base}-{size_label}" if size_label else str(base),
            architecture=str(arch), num_local_experts=experts, num_experts_per_tok=used,
            source=str(path), file_params=total,
            file_active_params=total - expert_elems * (experts - used) // experts if experts > 1 else total,
            file_weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
            file_type=_GGUF_FILE_TYPES.get(int(ftype)) if ftype is not None else None)
    except ShapeError as e:
        raise PlannerError(f"GGUF file {str(path)!r} {e}") from e


# ---- helpers ------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _read_data(filename: str) -> dict[str, Any]:
    text = resources.files("ferry.planner").joinpath("data", filename).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise PlannerError(f"planner data file {filename} is not a mapping")
    return data


def read_default_costs() -> dict[str, Any]:
    """The default cost assumptions, ``{value, source}`` pairs flattened to ``(value, source)``."""
    return _read_data("costs.yaml")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_positive(key: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise PlannerError(f"{key} must be a positive number, got {value!r}")
