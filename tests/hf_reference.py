"""Hugging Face transformers as the correctness reference (dev dependency only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# prompts whose greedy continuations ferry must reproduce (tests/engine/test_parity.py, tests/cuda)
PARITY_PROMPTS = [
    "The quick brown fox",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Paris is the capital of",
    "Once upon a time, in a land far away, there lived a dragon who loved",
    "Q: What is 7 times 8?\nA:",
    "Les chats sont",
]


def load_hf(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_hf_gguf(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face greedy decoding of one prompt, no padding, EOS ignored."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
