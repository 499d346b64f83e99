"""GGUF files: metadata -> ``ArchConfig`` + ``Tokenizer``; tensors dequantized to float32 with HF names.

Supports what llama.cpp writes for ``general.architecture`` ``llama`` (Llama 2/3, Mistral, SmolLM),
``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` and ``phi3`` (their differences: ``gguf_variants``),
single files and split ones (``name-00001-of-00003.gguf``: pass the first). llama.cpp's converter
permutes llama's q/k rows into GGML's rope layout (rotate interleaved pairs); ``unpermute_rope_rows``
undoes that so the weights match Hugging Face's ``rotate_half`` layout. The other architectures are
written unpermuted (NEOX rope), so they are left alone.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm.auto import tqdm

from ferry.config import ArchConfig
from ferry.kernels.packing import KERNEL_TYPES, QuantizedTensor
from ferry.loader.base import LoadedModel, ModelFormatError, expected_weight_shapes
from ferry.loader.gguf_variants import (
    ARCHITECTURES,
    CONFIG_TENSORS,
    ROPE_PERMUTED,
    block_names,
    variant_fields,
)
from ferry.shapes import ShapeError
from ferry.shapes.gguf import gguf_value, rope_from_gguf, shape_from_gguf
from ferry.tokenizer import Tokenizer

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

_Q = GGMLQuantizationType
# Types gguf-py dequantizes (numpy); the common llama.cpp ones are tested.
SUPPORTED_TYPES = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0, _Q.Q2_K, _Q.Q3_K, _Q.Q4_K,
    _Q.Q5_K, _Q.Q6_K, _Q.IQ4_NL, _Q.IQ4_XS, _Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS, _Q.IQ3_S,
    _Q.IQ1_S, _Q.IQ1_M, _Q.TQ1_0, _Q.TQ2_0,
})

# NOTE: GGUFReader reports a damaged file through whatever numpy or struct raised deep inside.
_READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, EOFError, struct.error)


def open_gguf(path: Path) -> GGUFReader:
    """Open and parse the header, metadata and tensor table; a damaged file -> ModelFormatError."""
    try:
        reader = GGUFReader(str(path), "r")
    except _READ_ERRORS as e:
        raise ModelFormatError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e
    file_size = Path(path).stat().st_size
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes or t.data_offset + t.n_bytes > file_size:
            raise ModelFormatError(f"{path}: tensor {t.name} runs past the end of the file (truncated?)")
    return reader


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key as a plain Python value (arrays become lists)."""
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        try:
            out[key] = fld.contents()
        except _READ_ERRORS as e:  # UnicodeDecodeError is a ValueError
            raise ModelFormatError(f"GGUF metadata key {key!r} is unreadable: {e}") from e
    return out


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF parameter name for a GGUF tensor name; None for tensors that configure the model
    (``rope_freqs``, Phi-3's rope factors) rather than hold a parameter."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in CONFIG_TENSORS:
        return None
    m = _BLOCK_RE.match(gguf_name)
    names = block_names(arch)
    if m is None or m.group(2) not in names:
        raise ModelFormatError(f"unsupported GGUF tensor {gguf_name!r} for a {arch} model")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_paths(path: Path) -> list[Path]:
    """Every file of a split GGUF (llama.cpp's ``-00001-of-00003.gguf`` naming) given its first;
    ``[path]`` for a single file."""
    m = _SHARD_RE.match(path.name)
    if m is None:
        return [path]
    if int(m.group("index")) != 1:
        raise ModelFormatError(f"{path} is shard {int(m.group('index'))} of a split GGUF: pass the first "
                               f"({m.group('stem')}-00001-of-{m.group('count')}.gguf)")
    count = int(m.group("count"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{m.group('count')}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ModelFormatError(f"split GGUF {path.name} is missing its shards {missing}")
    return paths


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: GGML rope row order -> HF ``rotate_half`` order.

    Per head the rows are stored as interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...); HF wants
    the two halves contiguous.
    """
    # w: [n_head * head_dim, ...]   (a weight [out, in] or a bias [out])
    if w.shape[0] % (2 * n_head):
        raise ModelFormatError(f"cannot un-permute {w.shape[0]} rows into {n_head} rope heads")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order ([out, in] for a weight)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelFormatError(f"tensor {t.name}: quantization {t.tensor_type.name} is not supported") from e
    except _READ_ERRORS as e:
        raise ModelFormatError(f"tensor {t.name} ({t.tensor_type.name}) is malformed: {e}") from e
    # NOTE: F32 tensors come back as a view of the read-only memory map; copy so torch owns it.
    return np.array(arr, dtype=np.float32, copy=True).reshape(shape)


def raw_quantized(t: ReaderTensor, shape: tuple[int, ...]) -> QuantizedTensor:
    """A kernel-type weight's blocks (see packing.KERNEL_TYPES), copied out of the memory map, one
    row per output."""
    n, k = shape
    try:
        blocks = np.array(t.data, dtype=np.uint8, copy=True).reshape(n, -1)
        return QuantizedTensor(t.tensor_type, (n, k), blocks)
    except ValueError as e:
        raise ModelFormatError(f"tensor {t.name} ({t.tensor_type.name}) is malformed: {e}") from e


def arch_from_metadata(fields: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]],
                       tokenizer: Tokenizer,
                       read_vector: Callable[[str], list[float]] | None = None) -> ArchConfig:
    """``ArchConfig`` from ``{arch}.*`` metadata; ``tensors`` maps GGUF names to numpy shapes. The shape
    is read by ``ferry.shapes.shape_from_gguf``, the variant fields by ``gguf_variants``; ``read_vector``
    reads a configuration tensor (``rope_freqs``) when the file has one."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFormatError(
            f"unsupported GGUF architecture {arch!r}; ferry runs {', '.join(sorted(ARCHITECTURES))}")
    if "token_embd.weight" not in tensors:
        raise ModelFormatError("GGUF file has no token_embd.weight tensor")

    def no_vector(name: str) -> list[float]:
        raise ModelFormatError(f"cannot read the {name} tensor here")

    try:
        theta, scaling = rope_from_gguf(fields)
        extra = variant_fields(fields, tensors, read_vector or no_vector)
        extra.setdefault("rope_scaling", scaling)
        if extra.get("rope_freq_factors") is not None:
            extra["rope_scaling"] = None  # the factors are the llama3 scaling, already computed
        return shape_from_gguf(
            fields, tensors, ArchConfig, architecture=ARCHITECTURES[arch],
            rms_norm_eps=gguf_value(fields, "attention.layer_norm_rms_epsilon", kind=float),
            rope_theta=theta, bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
            **extra)
    except ShapeError as e:
        raise ModelFormatError(f"GGUF metadata {e}") from e
    except ValueError as e:
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"GGUF metadata describes an invalid model: {e}") from e


def load_gguf(path: Path, name: str | None = None) -> LoadedModel:
    """Read a GGUF file's config and tokenizer now; its weights stream from ``weights()``.

    ``path`` is a single file or the first file of a split one (its other shards beside it).
    """
    path = Path(path)
    readers = [open_gguf(p) for p in shard_paths(path)]
    fields = read_metadata(readers[0])
    try:
        tokenizer = Tokenizer.from_gguf_metadata(fields)
    except ValueError as e:
        raise ModelFormatError(f"{path}: {e}") from e
    all_tensors = [t for r in readers for t in r.tensors]
    by_name = {t.name: t for t in all_tensors}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in all_tensors}

    def read_vector(tensor_name: str) -> list[float]:
        return dequantize_tensor(by_name[tensor_name]).reshape(-1).tolist()

    arch = arch_from_metadata(fields, shapes, tokenizer, read_vector)
    gguf_arch = str(fields["general.architecture"])

    names: dict[str, str] = {}
    for t in all_tensors:
        mapped = hf_name(t.name, gguf_arch)
        if mapped is not None:
            names[t.name] = mapped
    expected = expected_weight_shapes(arch)
    got = {names[g]: shapes[g] for g in names}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{path}: tensors do not match the metadata: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for t in all_tensors:
        if t.name in names and t.tensor_type not in SUPPORTED_TYPES:
            raise ModelFormatError(f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, "
                                   f"which ferry cannot read (it reads {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})")
    for hf, shape in got.items():
        if shape != expected[hf]:
            raise ModelFormatError(f"{path}: {hf} has shape {list(shape)}, metadata implies {list(expected[hf])}")

    permute = gguf_arch in ROPE_PERMUTED
    heads = {"self_attn.q_proj": arch.num_attention_heads, "self_attn.k_proj": arch.num_key_value_heads}

    def weights(keep_quantized: bool) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        tensors = [t for t in all_tensors if t.name in names]
        for t in tqdm(tensors, desc=f"Loading {path.name}", unit="tensor", disable=None):
            out = names[t.name]
            module = out.rsplit(".", 1)[0].split(".", 3)[-1]  # e.g. "self_attn.q_proj"
            n_head = heads.get(module) if permute else None
            if keep_quantized and t.tensor_type in KERNEL_TYPES and len(shapes[t.name]) == 2:
                q = raw_quantized(t, shapes[t.name])
                if n_head is not None:
                    q = q.take_rows(unpermute_rope_rows(np.arange(q.shape[0]), n_head))
                yield out, q
                continue
            w = dequantize_tensor(t)
            if n_head is not None:
                w = unpermute_rope_rows(w, n_head)
            yield out, torch.from_numpy(np.ascontiguousarray(w))

    # NOTE: absolute, not resolved: in the Hub cache a file is a link to a content-named blob, and
    # a split file's shards are found by the link's own name.
    return LoadedModel(name=name or path.name, source=path.absolute(), arch=arch, tokenizer=tokenizer,
                       weight_iter=weights)


__all__ = ["arch_from_metadata", "dequantize_tensor", "hf_name", "load_gguf",
           "open_gguf", "read_metadata", "shard_paths", "unpermute_rope_rows"]
