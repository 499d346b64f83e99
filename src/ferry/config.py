"""Frozen, composed configuration dataclasses.

Every config validates itself in ``__post_init__`` (``ValueError`` naming the field); derived values
are properties; nothing is mutated after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.shapes import ModelShape

_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_FORMATS = ("auto", "dense")


@dataclass(frozen=True, kw_only=True)
class ArchConfig(ModelShape):
    """A llama-family model as the engine runs it: its shape (``ferry.shapes.ModelShape``) plus rope, norm
    and special token ids, in Hugging Face ``config.json`` terms."""

    architecture: str  # e.g. "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: a built-in name, a ``.gguf`` file or a Hugging Face folder."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0
    # "auto": GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K weights stay in their blocks and run on ferry's CPU
    # kernels (float32 on CPU only); "dense": every weight is dequantized to ``dtype`` at load.
    weight_format: str = "auto"

    def __post_init__(self) -> None:
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, "
                             f"got {self.weight_format!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # None: a share of free memory (see runner.memory). Never sized from max_len x max_batch.
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # tests: an exact pool size

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override <= 0:
            raise ValueError("num_gpu_blocks_override must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 30.0
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
