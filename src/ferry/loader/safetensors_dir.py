"""Hugging Face model folders: ``config.json``, ``*.safetensors`` (single or sharded with an index),
``tokenizer.json`` and ``generation_config.json``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ferry.config import ArchConfig
from ferry.jsonfile import read_json_object
from ferry.loader.base import LoadedModel, ModelFormatError, expected_weight_shapes
from ferry.loader.hf_variants import GEMMA, MODEL_TYPES, SUPPORTED, TEXT_MODELS, variant_fields
from ferry.shapes import ShapeError, hf
from ferry.tokenizer import Tokenizer

_INDEX = "model.safetensors.index.json"


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    return read_json_object(path, missing_ok=missing_ok, error=ModelFormatError)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ModelFormatError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def arch_from_config(config: Mapping[str, Any], generation: Mapping[str, Any],
                     tokenizer: Tokenizer) -> ArchConfig:
    """``ArchConfig`` from ``config.json`` (+ ``generation_config.json`` eos ids); the shape as
    ``ferry.shapes.shape_from_hf_config`` reads it."""
    architecture = hf.architecture(config) or MODEL_TYPES.get(hf.model_type(config), "")
    architecture = TEXT_MODELS.get(architecture, architecture)
    if architecture not in SUPPORTED:
        raise ModelFormatError(f"unsupported architecture {architecture or config.get('model_type')!r}; "
                               f"ferry runs {', '.join(sorted(SUPPORTED))}")
    if config.get("mlp_bias"):
        raise ModelFormatError("mlp_bias=true is not supported")
    theta, scaling = hf.rope_from_hf_config(config)
    eos = _ids(generation.get("eos_token_id")) or _ids(config.get("eos_token_id")) or tokenizer.eos_token_ids
    bos = generation.get("bos_token_id", config.get("bos_token_id", tokenizer.bos_token_id))
    try:
        return hf.shape_from_hf_config(
            config, ArchConfig, architecture=architecture, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling, bos_token_id=bos, eos_token_ids=eos,
            **variant_fields(architecture, config))
    except ShapeError as e:
        raise ModelFormatError(f"config.json {e}") from e
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"config.json describes an invalid model: {e}") from e


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: from the index when there is one."""
    if (path / _INDEX).is_file():
        weight_map = _read_json(path / _INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{path / _INDEX} has no weight_map")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFormatError(f"{path}: shards listed in {_INDEX} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (only .safetensors weights are supported)" if any(path.glob("*.bin")) else ""
        raise ModelFormatError(f"{path} has no *.safetensors weights{hint}")
    return files


def _scan(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Language-model tensor name -> (file, name in the file, shape), reading only the headers."""
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = text_model_name(key)
                    if name is not None:
                        found[name] = (f, key, tuple(sf.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{f} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    return found


def load_safetensors_dir(path: Path, name: str | None = None) -> LoadedModel:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(f"{path} is not a Hugging Face model folder: it has no config.json")
    config = _read_json(config_file)
    generation = _read_json(path / "generation_config.json", missing_ok=True)
    try:
        tokenizer = Tokenizer.from_hf_folder(path)
    except ValueError as e:
        raise ModelFormatError(f"{path}: {e}") from e
    arch = arch_from_config(config, generation, tokenizer)

    found = _scan(shard_files(path))
    expected = expected_weight_shapes(arch)
    ignored = {k for k in found if k.endswith("rotary_emb.inv_freq")}
    if arch.tie_word_embeddings:
        ignored.add("lm_head.weight")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignored)
    if missing or unexpected:
        raise ModelFormatError(f"{path}: weights do not match config.json: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if found[key][2] != shape:
            raise ModelFormatError(f"{path}: {key} has shape {list(found[key][2])}, config implies {list(shape)}")

    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(found[key][0], []).append(key)

    gemma = arch.architecture in GEMMA

    def weights(keep_quantized: bool) -> Iterator[tuple[str, torch.Tensor]]:
        del keep_quantized  # safetensors folders hold no GGUF blocks
        with tqdm(total=len(expected), desc=f"Loading {path.name}", unit="tensor", disable=None) as bar:
            for f, keys in by_file.items():
                try:
                    with safe_open(str(f), framework="pt", device="cpu") as sf:
                        for key in keys:
                            tensor = sf.get_tensor(found[key][1]).to(torch.float32)
                            if gemma and key.endswith("norm.weight"):
                                # NOTE: Gemma's RMSNorm scales by (1 + weight); ferry's by weight
                                # (llama.cpp's converter adds the 1 the same way).
                                tensor = tensor + 1.0
                            bar.update(1)
                            yield key, tensor
                except SafetensorError as e:
                    raise ModelFormatError(f"{f}: cannot read tensor data: {e}") from e

    native = hf.text_config(config).get("torch_dtype") or config.get("torch_dtype") or config.get("dtype")
    return LoadedModel(name=name or path.name, source=path.resolve(), arch=arch, tokenizer=tokenizer,
                       weight_iter=weights, generation_defaults=sampling_defaults(generation),
                       native_dtype=native if native in ("bfloat16", "float16", "float32") else None)


# Multimodal checkpoints whose language model ferry serves on its own (text in, text out): its
# weights sit under a prefix (transformers 4's on the Hub, 5's in memory), the vision tower and the
# projector are not read.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_NOT_TEXT = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def text_model_name(key: str) -> str | None:
    """A checkpoint tensor's name as the language model's (``model.layers...``); None for vision."""
    if key.startswith(_NOT_TEXT):
        return None
    for prefix, replacement in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return key


# generation_config.json keys that are sampling defaults (vLLM's --generation-config auto applies the same)
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def sampling_defaults(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling defaults of a ``generation_config.json`` (numbers only; other keys ignored)."""
    return {k: generation[k] for k in _SAMPLING_KEYS
            if isinstance(generation.get(k), (int, float)) and not isinstance(generation.get(k), bool)}
