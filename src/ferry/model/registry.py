"""Hugging Face ``architectures`` name -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

from ferry.config import ArchConfig

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
    "Gemma2ForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
    "Gemma3ForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("ferry.model.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(f"unsupported architecture {architecture!r}; ferry supports "
                         f"{', '.join(supported_architectures())}")
    module, cls = _MODELS[architecture]
    return getattr(importlib.import_module(module), cls)


def build_model(arch: ArchConfig) -> nn.Module:
    return model_class(arch.architecture)(arch)
