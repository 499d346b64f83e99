"""The synchronous engine (tokenize -> EngineCore -> detokenize) and the offline ``LLM`` API."""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from ferry.batch.request import Request, RequestStatus, child_request_id
from ferry.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from ferry.engine.core import EngineCore, EngineStats
from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.engine.output_processor import OutputProcessor, RequestState
from ferry.jsonfile import read_json_object
from ferry.loader import LoadedModel, load_model, load_tokenizer
from ferry.loader.safetensors_dir import sampling_defaults
from ferry.outputs import CompletionOutput, RequestOutput
from ferry.runner.model_runner import resolve_device
from ferry.sampling_params import SamplingParams, StructuredOutputsParams
from ferry.structured import CompiledGrammar, GrammarCompiler
from ferry.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A prompt is text, or vLLM's token form {"prompt_token_ids": [...]}; a raw id list is accepted too.
PromptType = Union[str, dict[str, Any], Sequence[int]]

# generation_config.json keys -> the SamplingParams fields they are defaults for
_DEFAULT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                   "max_new_tokens": "max_tokens"}


def resolve_dtype(dtype: str, device: torch.device, native_dtype: str | None) -> str:
    """``--dtype auto`` as vLLM reads it, for the device ferry runs on.

    CPU: float32 (ferry's kernels and its CPU path compute in float32). CUDA: the checkpoint's
    dtype, except that a float32 checkpoint runs in bfloat16 as in vLLM (half the memory), and a
    GGUF file (no native dtype) in bfloat16; float16 where the GPU has no bfloat16.
    """
    if dtype != "auto":
        return dtype
    if device.type != "cuda":
        return "float32"
    wanted = native_dtype if native_dtype in ("bfloat16", "float16") else "bfloat16"
    if wanted == "bfloat16" and not torch.cuda.is_bf16_supported():
        return "float16"
    return wanted


def packed_bf16(model: ModelConfig, source: Path) -> bool:
    """Whether bfloat16 on this model means bfloat16 GEMMs over packed GGUF weights (CPU, GGUF file,
    --weight-format auto) rather than dense bfloat16 weights."""
    return (model.dtype == "bfloat16" and source.suffix == ".gguf" and model.weight_format == "auto"
            and resolve_device(model.device).type == "cpu")


def read_chat_template(value: str) -> str:
    """``--chat-template``: a file's path, or the template itself (as vLLM tells them apart)."""
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        # NOTE: vLLM's rule: text holding none of "{", "}" or a newline was meant as a path.
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"chat template {value!r} looks like a file path but cannot be "
                             f"read: {exc}") from exc
    # NOTE: as vLLM, escapes typed on a command line ("\\n") mean the characters they name (only
    # in ASCII text: decoding escapes would garble other characters)
    return codecs.decode(value, "unicode_escape") if value.isascii() else value


def generation_defaults(setting: str, loaded: LoadedModel) -> dict[str, Any]:
    """``--generation-config``: "auto" -> the model's generation_config.json sampling defaults,
    "vllm" -> none, else a folder whose generation_config.json gives them."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        return dict(loaded.generation_defaults)
    folder = Path(setting).expanduser()
    if not folder.is_dir():
        raise ValueError(f"generation config {setting!r} is not auto, vllm or a folder")
    return sampling_defaults(read_json_object(folder / "generation_config.json"))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        m = config.model
        loaded = load_model(m.model, revision=m.revision, download_dir=m.download_dir,
                            gguf_file=m.gguf_file)
        torch.manual_seed(m.seed)
        dtype = resolve_dtype(m.dtype, resolve_device(m.device), loaded.native_dtype)
        if dtype != m.dtype:
            logger.info("dtype auto: %s", dtype)
            config = dataclasses.replace(config, model=dataclasses.replace(m, dtype=dtype))
        if packed_bf16(config.model, loaded.source):
            # NOTE: dense bfloat16 would dequantize every GGUF weight and lose the kernels (a third of
            # float32's single-stream speed); bfloat16 GEMMs over the packed blocks keep both.
            logger.info("--dtype bfloat16 on CPU with GGUF weights: float32 activations, bfloat16 "
                        "matmuls for large steps over the packed weights")
            config = dataclasses.replace(config, model=dataclasses.replace(
                config.model, dtype="float32", matmul_dtype="bfloat16"))
        self.config = config
        self.model_name = loaded.name
        # NOTE: --revision is the model's (vLLM has --tokenizer-revision for the tokenizer's)
        self.tokenizer: Tokenizer = (load_tokenizer(m.tokenizer, download_dir=m.download_dir)
                                     if m.tokenizer else loaded.tokenizer)
        if m.chat_template is not None:
            self.tokenizer.replace_chat_template(read_chat_template(m.chat_template))
        # Sampling defaults for requests that leave a field unset (the server applies them;
        # ``max_tokens`` is applied here, where the prompt's length is known).
        self.generation_defaults: dict[str, Any] = {
            _DEFAULT_FIELDS[k]: v for k, v in generation_defaults(m.generation_config, loaded).items()
            if k in _DEFAULT_FIELDS}
        if self.generation_defaults:
            logger.info("sampling defaults from the generation config (%s): %s; "
                        "--generation-config vllm turns them off", m.generation_config,
                        self.generation_defaults)
        self.arch = loaded.arch
        self.core = EngineCore(config, loaded.arch, loaded.weights)
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = tuple(sorted(set(self.tokenizer.eos_token_ids)
                                          | set(loaded.arch.eos_token_ids)))
        self.processor = OutputProcessor(self.tokenizer)
        # Constrained decoding: grammars compiled for this tokenizer, cached by constraint.
        self.grammars = GrammarCompiler(self.tokenizer, self.eos_token_ids, self.arch.vocab_size)

    # -- building requests (pure: safe to call from any thread) -----------------------------
    def compile_grammar(self, structured: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled constraint (cached); GrammarError (a ValueError naming the field) when it
        is invalid. Slow on a cache miss: call it off the event loop and off the engine thread."""
        return self.grammars.compile(structured)

    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                     grammar: CompiledGrammar | None = None) -> RequestState:
        """Tokenize and validate; raises ValueError with a clear message on bad input.

        ``grammar``: ``params.structured_outputs`` compiled already (``compile_grammar``); when
        None and the params have a constraint, it is compiled here, on the calling thread.
        """
        if params.structured_outputs is not None and grammar is None:
            grammar = self.compile_grammar(params.structured_outputs)
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        n_prompt = len(ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(f"prompt is {n_prompt} tokens but the model's context is "
                             f"{self.max_model_len} tokens")
        # NOTE: a max_tokens default from the generation config caps what is left of the context
        # (as vLLM); only an explicit max_tokens past the context is an error.
        left = self.max_model_len - n_prompt
        max_tokens = params.max_tokens or min(left, self.generation_defaults.get("max_tokens", left))
        if n_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        self.core.check_fits(n_prompt, max_tokens)
        children = [self._child(child_request_id(request_id, i), ids, params, max_tokens, i,
                                grammar if params.structured_outputs is not None else None)
                    for i in range(params.n)]
        # NOTE: the prompt's last tokens are decoding context: without them a sentencepiece
        # tokenizer drops the first generated token's leading space (" Paris" -> "Paris").
        detoks = [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                         params.include_stop_str_in_output, prompt_token_ids=ids)
                  for _ in range(params.n)]
        outputs = [CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        return RequestState(request_id, text, ids, children, detoks, outputs)

    def _child(self, rid: str, ids: list[int], params: SamplingParams, max_tokens: int,
               index: int, grammar: CompiledGrammar | None = None) -> Request:
        request = Request(rid, ids, params, self.eos_token_ids, max_tokens)
        if grammar is not None:
            request.grammar = grammar.matcher()  # each choice of n walks the grammar on its own
        if params.seed is not None:
            # NOTE: choice i of a seeded request draws from seed + i: reproducible, yet distinct.
            request.generator = torch.Generator(device=self.core.runner.device)
            request.generator.manual_seed(params.seed + index)
        return request

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return None, [int(t) for t in prompt]

    # -- driving the core (one thread) -------------------------------------------------------
    def add(self, state: RequestState) -> None:
        if state.request_id in self.processor:
            raise ValueError(f"duplicate request id {state.request_id!r}")
        added: list[Request] = []
        try:
            for child in state.children:
                self.core.add_request(child)
                added.append(child)
        except ValueError:
            for child in added:
                self.core.finish_request(child.request_id, RequestStatus.FINISHED_ABORTED)
            raise
        self.processor.add(state)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        self.add(self.make_request(request_id, prompt, params))

    def abort_request(self, request_id: str) -> None:
        state = self.processor.remove(request_id)
        if state is not None:
            for child in state.children:
                self.core.finish_request(child.request_id, RequestStatus.FINISHED_ABORTED)

    def abort_all(self) -> None:
        """Abort every unfinished request and free its blocks (shutdown)."""
        for request_id in self.processor.request_ids():
            self.abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        outputs, stop_hits = self.processor.process(self.core.step())
        for hit in stop_hits:
            self.core.finish_request(hit.child_id, RequestStatus.FINISHED_STOPPED, hit.stop)
        return outputs

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def stats(self) -> EngineStats:
        return self.core.stats()


class LLM:
    """Offline batch inference: ``LLM(model).generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str = "smollm2-135m-instruct", *, dtype: str = "float32",
                 device: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 block_size: int = 16, kv_cache_memory: int | None = None,
                 enable_prefix_caching: bool = True, num_gpu_blocks_override: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_chunked_prefill: bool = True, weight_format: str = "auto",
                 revision: str | None = None, download_dir: str | None = None,
                 gguf_file: str | None = None,
                 speculative_config: SpeculativeConfig | dict[str, Any] | None = None) -> None:
        spec = (SpeculativeConfig.from_dict(speculative_config)
                if isinstance(speculative_config, dict) else speculative_config)
        config = EngineConfig(
            ModelConfig(model, dtype, device, max_model_len, seed, weight_format, revision=revision,
                        download_dir=download_dir, gguf_file=gguf_file),
            CacheConfig(block_size, kv_cache_memory, enable_prefix_caching,
                        num_gpu_blocks_override),
            SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill),
            speculative=spec)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams()`` with the generation config's defaults (vLLM's method of this name);
        what ``generate`` uses when given none."""
        defaults = dict(self.engine.generation_defaults)
        if "max_tokens" in defaults:  # NOTE: the engine caps it by what the context leaves
            defaults["max_tokens"] = None
        return SamplingParams(**defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order."""
        prompt_list = self._as_list(prompts)
        params = sampling_params or self.get_default_sampling_params()
        param_list = ([params] * len(prompt_list) if isinstance(params, SamplingParams)
                      else list(params))
        if len(param_list) != len(prompt_list):
            raise ValueError("need one SamplingParams per prompt, or a single one for all")
        # Validate everything before adding anything, so a bad prompt leaves nothing behind.
        states = [self.engine.make_request(str(next(self._ids)), p, sp)
                  for p, sp in zip(prompt_list, param_list)]
        return self._run(states)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts: list[PromptType] = [
            {"prompt_token_ids": self.tokenizer.encode_chat(conv, add_generation_prompt)}
            for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def _run(self, states: Iterable[RequestState]) -> list[RequestOutput]:
        order: dict[str, int] = {}
        try:
            for i, state in enumerate(states):
                self.engine.add(state)
                order[state.request_id] = i
            results: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            for request_id in order:  # leave no request (and no KV block) behind
                self.engine.abort_request(request_id)
            raise
        return [results[rid] for rid in sorted(results, key=order.__getitem__)]

    @staticmethod
    def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if prompts and all(isinstance(t, int) for t in prompts):  # a single list of token ids
            return [prompts]  # type: ignore[list-item]
        return list(prompts)  # type: ignore[arg-type]
