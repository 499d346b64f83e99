"""Frozen, composed configuration dataclasses.

Every config validates itself in ``__post_init__`` (``ValueError`` naming the field); derived values
are properties; nothing is mutated after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.shapes import ModelShape

_DTYPES = ("float32", "bfloat16", "float16")
# "auto" is resolved by the engine once the model is read (see ferry.engine.llm_engine.resolve_dtype)
_MODEL_DTYPES = ("auto", *_DTYPES)
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
    # -- the variants of the one decoder (ferry.model.llama); defaults are plain Llama ---------------
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_pytorch_tanh" (Gemma)
    qk_norm: bool = False  # RMSNorm over each q and k head before rope (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and MLP too (4 per layer)
    embedding_scale: float | None = None  # embeddings times this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (Gemma); None: head_dim
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # the same on the output logits (Gemma 2)
    sliding_window: int | None = None  # a sliding layer attends to the last this-many positions
    # per layer: True for a sliding-window layer; empty: every layer is sliding iff sliding_window
    sliding_layers: tuple[bool, ...] = ()
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3), plain rope
    # GGUF ``rope_freqs``: per-frequency divisors llama.cpp stores for llama3 rope scaling
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_hidden_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} values, "
                             f"head_dim {self.head_dim} needs {self.head_dim // 2}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer; None for a full-attention layer."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @property
    def kv_window(self) -> int | None:
        """The window when every layer slides (KV blocks behind it can be freed), else None."""
        if self.sliding_window is None or (self.sliding_layers and not all(self.sliding_layers)):
            return None
        return self.sliding_window


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: a built-in name, a ``.gguf`` file, a Hugging Face folder or Hub repo id."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0
    # "auto": GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights stay in their blocks and run on
    # ferry's CPU kernels (float32 on CPU only); "dense": every weight is dequantized to ``dtype``.
    weight_format: str = "auto"
    # Where the model comes from when ``model`` is a Hugging Face Hub repo id (see ferry.hub).
    revision: str | None = None  # branch, tag or commit
    download_dir: str | None = None  # None: the huggingface_hub cache (HF_HOME)
    gguf_file: str | None = None  # which .gguf of a GGUF repo (else the ``repo:QUANT`` tag or the only one)
    # Overrides of what the model ships with (vLLM's flags of the same names).
    tokenizer: str | None = None  # a folder or repo id holding tokenizer.json
    chat_template: str | None = None  # a template file's path, or the template text itself
    # "auto": sampling defaults from the model's generation_config.json; "vllm": none; else a folder
    generation_config: str = "auto"
    # CPU with packed GGUF weights and dtype float32 only: steps with many rows multiply in this dtype
    # over the weights dequantized on the fly (bfloat16 on AMX), the rest stays float32. Set by the
    # engine for --dtype bfloat16 on such models (see ferry.engine.llm_engine.resolve_dtype).
    matmul_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, "
                             f"got {self.weight_format!r}")
        if self.dtype not in _MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {_MODEL_DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.matmul_dtype not in (None, "bfloat16"):
            raise ValueError(f"matmul_dtype must be None or bfloat16, got {self.matmul_dtype!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # None: a share of free memory (see runner.memory). Never sized from max_len x max_batch.
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # tests: an exact pool size
    # vLLM's --gpu-memory-utilization: the share of the device's total memory (MemTotal on CPU) for
    # weights + KV cache; the KV budget is what is left of it (see runner.memory). Excludes
    # kv_cache_memory.
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override <= 0:
            raise ValueError("num_gpu_blocks_override must be positive")
        if self.gpu_memory_utilization is not None:
            if not 0 < self.gpu_memory_utilization <= 1:
                raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                                 f"{self.gpu_memory_utilization}")
            if self.kv_cache_memory is not None:
                raise ValueError("give gpu_memory_utilization or kv_cache_memory, not both")


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


SPECULATIVE_METHODS = ("ngram", "draft_model")
_SPECULATIVE_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "model", "disable_by_batch_size")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, as vLLM's ``--speculative-config`` JSON reads.

    ``ngram``: propose the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``). ``draft_model``:
    a smaller model of the same vocabulary (``model``) proposes them, greedily.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None  # the draft model (draft_model): a name, path or Hub id
    # NOTE: as vLLM's key: a step with this many running requests or more proposes nothing. Under
    # load the extra verification rows cost more than the decode steps they save (c=8 ran at
    # 0.88x without speculation in benchmarks/speculative.py), while one stream gains ~1.5x.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {SPECULATIVE_METHODS}, "
                             f"got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16], got "
                             f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= "
                             f"prompt_lookup_min ({self.prompt_lookup_min})")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 2:
            raise ValueError("disable_by_batch_size must be >= 2 (speculation for batches smaller "
                             f"than it), got {self.disable_by_batch_size}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative method draft_model needs a model "
                             "(--speculative-model or \"model\" in --speculative-config)")
        if self.method == "ngram" and self.model:
            raise ValueError(f"speculative method ngram takes no model, got {self.model!r}")

    def enabled_for(self, batch_size: int) -> bool:
        """Whether a step with ``batch_size`` running requests proposes tokens."""
        return self.disable_by_batch_size is None or batch_size < self.disable_by_batch_size

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SpeculativeConfig:
        """vLLM's ``speculative_config`` dict; ``model`` without ``method`` means draft_model, and
        ``method: "draft"`` is read as draft_model. ValueError names an unknown or bad key."""
        if not isinstance(value, dict):
            # NOTE: a ValueError like every other bad config, so callers catch one type
            raise ValueError(  # noqa: TRY004
                f"speculative config must be a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_SPECULATIVE_KEYS))
        if unknown:
            raise ValueError(f"speculative config: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(_SPECULATIVE_KEYS)})")
        fields = dict(value)
        if "method" not in fields:
            fields["method"] = "draft_model" if fields.get("model") else "ngram"
        if fields["method"] == "draft":  # vLLM's older spelling
            fields["method"] = "draft_model"
        for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                    "disable_by_batch_size"):
            if key == "disable_by_batch_size" and fields.get(key) is None:
                continue
            if key in fields and (not isinstance(fields[key], int) or isinstance(fields[key], bool)):
                raise ValueError(f"speculative config: {key} must be an integer, got "
                                 f"{fields[key]!r}")
        # NOTE: as vLLM: one of prompt_lookup_max/min given alone sets the other too
        if "prompt_lookup_min" in fields and "prompt_lookup_max" not in fields:
            fields["prompt_lookup_max"] = fields["prompt_lookup_min"]
        if "prompt_lookup_max" in fields and "prompt_lookup_min" not in fields:
            fields["prompt_lookup_min"] = fields["prompt_lookup_max"]
        return cls(**fields)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # the name responses carry (None: the model's own)
    served_model_aliases: tuple[str, ...] = ()  # more names requests may use (listed in /v1/models)
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 30.0
    log_format: str = "text"
    log_requests: bool = True  # one access-log line per request
    uvicorn_log_level: str = "info"
    max_logprobs: int = 20  # most logprobs / top_logprobs a request may ask for; -1: no cap
    root_path: str = ""  # the path prefix a proxy serves this server under ("" or "/prefix")
    # CORS (vLLM's --allowed-origins ...); no origin: no CORS headers at all
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # HTTPS (uvicorn): both files, or neither
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0  # ssl.CERT_NONE; 2 (CERT_REQUIRED) asks clients for a certificate
    # tool calling (vLLM's --enable-auto-tool-choice, --tool-call-parser)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # None: the one the chat template's format asks for
    exclude_tools_when_tool_choice_none: bool = False
    strict_params: bool = False  # unknown request fields: a 400 instead of ignored with a warning

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name requests may use, the one responses carry first (empty: the model's own)."""
        return (self.served_model_name, *self.served_model_aliases) if self.served_model_name \
            else ()

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if self.served_model_aliases and not self.served_model_name:
            raise ValueError("served_model_aliases need a served_model_name")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be >= -1, got {self.max_logprobs}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"root_path must start with / and not end with one, got "
                             f"{self.root_path!r}")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError("ssl_keyfile and ssl_certfile go together")
