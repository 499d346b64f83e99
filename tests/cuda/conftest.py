"""The CUDA path, measured where a GPU is: every test in this folder is skipped, with one message,
when ``torch.cuda.is_available()`` is false (so the CPU-only machines that run the suite say so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

SKIP_MESSAGE = ("CUDA is not available (torch.cuda.is_available() is False): the CUDA path is not "
                "measured on this machine; run tests/cuda on a GPU machine")


@pytest.fixture(scope="session", autouse=True)
def needs_cuda() -> None:
    # NOTE: session-scoped so that it runs before the module fixtures that load models onto the GPU
    if not torch.cuda.is_available():
        pytest.skip(SKIP_MESSAGE)


@pytest.fixture(scope="session")
def hf_smollm2_cpu(smollm2_path: Path) -> Any:
    """transformers' own reading of the GGUF (dequantized to float32), on CPU; tests move copies."""
    from hf_reference import load_hf_gguf

    return load_hf_gguf(smollm2_path)
