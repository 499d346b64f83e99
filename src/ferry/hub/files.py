"""Which files of a repo ferry needs: one GGUF quant (every shard of it), or the safetensors set.

Pure functions over the repo's file list (paths relative to the repo root); nothing here talks to
the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ferry.hub.errors import AmbiguousFileError, FileNotInRepoError

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_QUANT = "Q4_K_M"  # what llama-server -hf and Ollama pick when no tag is given

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")
_QUANT = re.compile(r"^(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|B?F16|F32|FP16|FP32|MXFP4(?:_MOE)?)$", re.IGNORECASE)
_SEPARATORS = re.compile(r"[-./]")


@dataclass(frozen=True)
class GgufQuant:
    """One loadable GGUF: a single file, or every shard of a split one (first shard first)."""

    label: str  # the quant tag read from the name ("Q4_K_M"), else the file's stem
    files: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.files[0]


def _gguf_key(path: str) -> tuple[str, int, int]:
    """``dir/Model-Q4_K_M-00001-of-00003.gguf`` -> (``dir/Model-Q4_K_M``, 1, 3); unsplit: (stem, 1, 1)."""
    stem = path[: -len(".gguf")]
    shard = _SHARD.search(stem)
    if shard is None:
        return stem, 1, 1
    return stem[: shard.start()], int(shard[1]), int(shard[2])


def _label(key: str) -> str:
    tokens = [t for t in _SEPARATORS.split(key) if _QUANT.match(t)]
    return tokens[-1].upper() if tokens else PurePosixPath(key).name


def _is_projector(path: str) -> bool:
    # NOTE: multimodal repos ship the vision projector as another .gguf; it is never the model.
    return "mmproj" in PurePosixPath(path).name.lower()


def gguf_quants(files: Iterable[str]) -> list[GgufQuant]:
    """The repo's loadable GGUFs, shards grouped, projector files left out, sorted by path."""
    groups: dict[str, dict[int, str]] = {}
    totals: dict[str, int] = {}
    for path in files:
        if not path.lower().endswith(".gguf") or _is_projector(path):
            continue
        key, index, total = _gguf_key(path)
        groups.setdefault(key, {})[index] = path
        totals[key] = max(totals.get(key, 1), total)
    quants = []
    for key in sorted(groups):
        shards = groups[key]
        if sorted(shards) != list(range(1, totals[key] + 1)):
            continue  # NOTE: an incomplete split set cannot be loaded; it is not offered
        quants.append(GgufQuant(_label(key), tuple(shards[i] for i in sorted(shards))))
    return quants


def _describe(quants: list[GgufQuant]) -> str:
    return ", ".join(q.label if q.label != PurePosixPath(q.first).stem else q.first for q in quants)


def select_gguf(repo_id: str, files: Iterable[str], tag: str | None = None,
                gguf_file: str | None = None) -> GgufQuant:
    """The quant to download: an explicit file name, else the tag, else the only (or Q4_K_M) one.

    A tag matches a file when it appears in its path between separators (``-``, ``.``, ``/``) or at
    an end, case-insensitively: ``q4_k_m`` matches ``Llama-3.2-3B-Instruct-Q4_K_M.gguf`` but ``Q4_K``
    does not. A tag ending in ``.gguf`` is a file name.
    """
    listed = list(files)
    quants = gguf_quants(listed)
    if gguf_file is None and tag is not None and tag.lower().endswith(".gguf"):
        gguf_file, tag = tag, None
    if gguf_file is not None:
        return _by_file_name(repo_id, quants, gguf_file)
    if not quants:
        raise FileNotInRepoError(f"repo {repo_id!r} has no .gguf files")
    if tag is not None:
        pattern = re.compile(rf"(?:^|[-./]){re.escape(tag)}(?:$|[-./])", re.IGNORECASE)
        matches = [q for q in quants if pattern.search(_gguf_key(q.first)[0])]
        if not matches:
            raise FileNotInRepoError(f"no file of {repo_id!r} matches the quant {tag!r}; "
                                     f"available: {_describe(quants)}")
        if len(matches) > 1:
            raise AmbiguousFileError(f"quant {tag!r} of {repo_id!r} matches several files: "
                                     f"{', '.join(q.first for q in matches)}; pass one with --gguf-file")
        return matches[0]
    if len(quants) == 1:
        return quants[0]
    default = [q for q in quants if q.label == DEFAULT_QUANT]
    if len(default) == 1:
        return default[0]
    raise AmbiguousFileError(f"{repo_id!r} has several quants: {_describe(quants)}; "
                             f"pick one as {repo_id}:QUANT")


def _by_file_name(repo_id: str, quants: list[GgufQuant], name: str) -> GgufQuant:
    wanted = name.strip("/")
    for exact in (True, False):
        for q in quants:
            for f in q.files:
                if (f == wanted or PurePosixPath(f).name == wanted) if exact else (
                        f.lower() == wanted.lower() or PurePosixPath(f).name.lower() == wanted.lower()):
                    return q
    listing = ", ".join(f for q in quants for f in q.files[:1]) or "none"
    raise FileNotInRepoError(f"repo {repo_id!r} has no GGUF file {name!r}; its GGUF files: {listing}")


def is_gguf_repo(files: Iterable[str], tag: str | None, gguf_file: str | None) -> bool:
    """A tag or a gguf file name asks for GGUF; otherwise safetensors win when the repo has both."""
    listed = list(files)
    if tag is not None or gguf_file is not None:
        return True
    return not root_safetensors(listed) and any(f.lower().endswith(".gguf") for f in listed)


def root_safetensors(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))


def safetensors_metadata_files(repo_id: str, files: Iterable[str]) -> list[str]:
    """The small files of a safetensors repo: config, generation config, tokenizer, weight index."""
    listed = set(files)
    if "config.json" not in listed:
        raise FileNotInRepoError(f"repo {repo_id!r} has no config.json")
    if not root_safetensors(listed):
        other = sorted(f for f in listed if f.endswith((".bin", ".pt", ".pth", ".h5", ".onnx", ".msgpack")))
        found = f" (it has {', '.join(other[:3])}{', ...' if len(other) > 3 else ''})" if other else ""
        raise FileNotInRepoError(f"repo {repo_id!r} has no .safetensors or .gguf weights{found}; "
                                 "ferry loads only those two formats")
    wanted = (*CONFIG_FILES, *TOKENIZER_FILES, SAFETENSORS_INDEX)
    return [f for f in wanted if f in listed]


def safetensors_weight_files(repo_id: str, files: Iterable[str], index: dict[str, Any] | None) -> list[str]:
    """The weights to fetch: those the index names, else ``model.safetensors``, else every root file.

    NOTE: from the index when there is one, as the loader reads them: repos such as Mistral's also
    hold a ``consolidated.safetensors`` copy that would double the download.
    """
    listed = set(files)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FileNotInRepoError(f"{SAFETENSORS_INDEX} of {repo_id!r} has no weight_map")
        names = sorted({str(v) for v in weight_map.values()})
        missing = [n for n in names if n not in listed]
        if missing:
            raise FileNotInRepoError(f"{SAFETENSORS_INDEX} of {repo_id!r} names files the repo lacks: "
                                     f"{', '.join(missing[:3])}")
        return names
    if "model.safetensors" in listed:
        return ["model.safetensors"]
    return root_safetensors(listed)
