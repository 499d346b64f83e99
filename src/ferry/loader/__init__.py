"""Model loading: a built-in name, a ``.gguf`` file, a Hugging Face folder or a Hub repo id ->
``LoadedModel``."""

from __future__ import annotations

from pathlib import Path

from ferry.hub import TOKENIZER_FILES, HubError, is_repo_id
from ferry.hub import resolve as resolve_hub
from ferry.loader.base import (
    LoadedModel,
    ModelFormatError,
    ModelNotFoundError,
    expected_weight_shapes,
)
from ferry.loader.registry import builtin_names, list_models, resolve
from ferry.tokenizer import Tokenizer

_GGUF_MAGIC = b"GGUF"


def load_model(model: str, *, revision: str | None = None, download_dir: str | None = None,
               gguf_file: str | None = None) -> LoadedModel:
    """Config and tokenizer now, weights streamed later by ``LoadedModel.weights()``.

    ``model`` is a built-in name (see ``ferry models``), a path to a ``.gguf`` file, a Hugging Face
    folder holding ``config.json`` and ``*.safetensors``, or a Hub repo id (``org/name``, with
    ``:QUANT`` or ``gguf_file`` for a GGUF repo) downloaded into the huggingface_hub cache (or
    ``download_dir``) at ``revision``. Every failure is a ``ModelNotFoundError`` or a
    ``ModelFormatError`` with a one-line message.
    """
    path = locate_model(model, revision=revision, download_dir=download_dir, gguf_file=gguf_file)
    return load_path(path, name=model if is_repo_id(model) or model.lower() in builtin_names() else path.name)


def locate_model(model: str, *, revision: str | None = None, download_dir: str | None = None,
                 gguf_file: str | None = None) -> Path:
    """The local file or folder ``model`` names (downloading a Hub repo's missing files), unresolved:
    a split GGUF's first shard keeps its name, so its siblings can be found next to it."""
    if model.lower() in builtin_names():
        return resolve(model)
    path = Path(model).expanduser()
    if path.exists():
        return path / gguf_file if gguf_file is not None and path.is_dir() else path
    if is_repo_id(model):
        return _from_hub(model, revision=revision, download_dir=download_dir, gguf_file=gguf_file)
    raise ModelNotFoundError(
        f"model {model!r} not found: pass a built-in name ({', '.join(builtin_names())}), "
        "a path to a .gguf file, a Hugging Face folder (config.json + *.safetensors), "
        "or a Hub repo id (org/name, org/name:QUANT)")


def load_tokenizer(ref: str, *, revision: str | None = None, download_dir: str | None = None) -> Tokenizer:
    """A tokenizer alone (vLLM's ``--tokenizer``): a folder with tokenizer.json, a .gguf file, or a
    repo id, of which only the tokenizer files are downloaded."""
    path = Path(ref).expanduser()
    if not path.exists() and is_repo_id(ref):
        path = _from_hub(ref, revision=revision, download_dir=download_dir,
                         allow_patterns=[*TOKENIZER_FILES, "generation_config.json"])
    elif not path.exists():
        raise ModelNotFoundError(f"tokenizer {ref!r} not found: pass a folder with tokenizer.json, "
                                 "a .gguf file or a Hub repo id (org/name)")
    if path.is_file():
        return load_path(path, name=path.name).tokenizer
    try:
        return Tokenizer.from_hf_folder(path)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read the tokenizer of {ref!r}: {exc}") from exc


def _from_hub(model: str, **kwargs: object) -> Path:
    try:
        return resolve_hub(model, **kwargs)  # type: ignore[arg-type]
    except HubError as exc:
        # NOTE: one type for every "cannot have this model" case; the HubError subclass (auth,
        # offline, ambiguous quant...) stays reachable as __cause__.
        raise ModelNotFoundError(str(exc)) from exc


def load_path(path: Path, name: str) -> LoadedModel:
    """A local .gguf file or Hugging Face folder, by its first bytes."""
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
           "list_models", "load_model", "load_path", "load_tokenizer", "locate_model", "resolve"]
