"""``--tokenizer``: count output tokens when a server sends no usage, and size synthetic prompts exactly.

Accepts a ``tokenizer.json``, a Hugging Face folder holding one, a ``.gguf`` file (its tokenizer is
rebuilt from the metadata by ``ferry.tokenizer``), or a built-in model name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class BenchTokenizer:
    """encode/decode without special tokens: counts exactly the text a server streamed."""

    def __init__(self, backend: Any, hf_tokenizers: bool) -> None:
        self._backend = backend
        self._hf = hf_tokenizers  # a raw `tokenizers.Tokenizer` returns an Encoding, not ids

    def encode(self, text: str) -> list[int]:
        out = self._backend.encode(text, add_special_tokens=False)
        return list(out.ids if self._hf else out)

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)


def _from_gguf(path: Path) -> BenchTokenizer:
    from gguf import GGUFReader

    from ferry.tokenizer import Tokenizer

    reader = GGUFReader(str(path), "r")
    # NOTE: only the tokenizer keys are decoded; the tensors are never touched.
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return BenchTokenizer(Tokenizer.from_gguf_metadata(fields), hf_tokenizers=False)


def load_tokenizer(spec: str) -> BenchTokenizer:
    """A tokenizer from a ``tokenizer.json``, an HF folder, a ``.gguf`` file or a built-in model name."""
    p = Path(spec)
    if not p.exists() and "/" not in spec and not p.suffix:
        from ferry.loader.registry import resolve  # NOTE: only for built-in names (imports torch)

        p = resolve(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"--tokenizer: no such file: {p}")
    try:
        if p.suffix == ".gguf":
            return _from_gguf(p)
        from tokenizers import Tokenizer

        return BenchTokenizer(Tokenizer.from_file(str(p)), hf_tokenizers=True)
    except ValueError:
        raise
    except Exception as e:  # NOTE: tokenizers and gguf raise bare Exceptions for malformed files
        raise ValueError(f"--tokenizer: cannot read {p}: {e}") from e
