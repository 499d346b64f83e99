"""Reading the small JSON files of a model folder (config, tokenizer config, generation config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, *, missing_ok: bool = False,
                     error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` for a missing file when ``missing_ok``; else ``error``."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data
