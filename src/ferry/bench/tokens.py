"""``--tokenizer``: count output tokens when a server sends no usage, and size synthetic prompts exactly."""

from __future__ import annotations

from pathlib import Path


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``); no special tokens are added."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(spec: str) -> HFTokenizer:
    """``spec``: a ``tokenizer.json`` file or a Hugging Face model folder holding one."""
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if p.suffix == ".gguf":
        raise ValueError(f"--tokenizer needs a tokenizer.json or a folder holding one, not a GGUF file: {spec}")
    if not p.is_file():
        raise ValueError(f"--tokenizer: no tokenizer.json at {p}")
    try:
        return HFTokenizer(p)
    except Exception as e:  # NOTE: tokenizers raises a bare Exception for malformed files
        raise ValueError(f"--tokenizer: cannot read {p}: {e}") from e
