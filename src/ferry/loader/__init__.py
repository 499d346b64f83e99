"""Model loading: a built-in name, a ``.gguf`` file or a Hugging Face folder -> ``LoadedModel``."""

from __future__ import annotations

from pathlib import Path

from ferry.loader.base import (
    LoadedModel,
    ModelFormatError,
    ModelNotFoundError,
    expected_weight_shapes,
)
from ferry.loader.registry import builtin_names, list_models, resolve

_GGUF_MAGIC = b"GGUF"


def load_model(model: str) -> LoadedModel:
    """Config and tokenizer now, weights streamed later by ``LoadedModel.weights()``.

    ``model`` is a built-in name (see ``ferry models``), a path to a ``.gguf`` file, or a Hugging
    Face folder holding ``config.json`` and ``*.safetensors``.
    """
    if model.lower() in builtin_names():
        return _load_path(resolve(model), name=model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {model!r} not found: pass a built-in name ({', '.join(builtin_names())}), "
            "a path to a .gguf file, or a Hugging Face folder (config.json + *.safetensors)")
    return _load_path(path, name=path.name)


def _load_path(path: Path, name: str) -> LoadedModel:
    if path.is_dir():
        from ferry.loader.safetensors_dir import load_safetensors_dir

        return load_safetensors_dir(path, name=name)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelFormatError(f"{path} is not a GGUF file (bad magic {magic!r}); "
                               "pass a .gguf file or a Hugging Face folder")
    from ferry.loader.gguf import load_gguf

    return load_gguf(path, name=name)


__all__ = ["LoadedModel", "ModelFormatError", "ModelNotFoundError", "expected_weight_shapes",
           "list_models", "load_model", "resolve"]
