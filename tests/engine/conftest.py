"""Engine test fixtures: the Hugging Face reference for SmolLM2, loaded once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hf_reference import load_hf_gguf


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path) -> Any:
    return load_hf_gguf(smollm2_path)
