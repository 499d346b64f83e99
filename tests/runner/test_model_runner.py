"""ModelRunner details that need no model: which ids min_tokens must block."""

from __future__ import annotations

from ferry.engine.request import Request
from ferry.runner.model_runner import ModelRunner
from ferry.sampling_params import SamplingParams


def test_min_tokens_blocks_every_eos_id_of_the_batch() -> None:
    # The tokenizer's EOS and the model config's may differ; a request stops on either, so
    # min_tokens must block the union, not just the model config's.
    a = Request("a", [1], SamplingParams(min_tokens=3), eos_token_ids=(2, 7))
    b = Request("b", [1], SamplingParams(), eos_token_ids=(2, 9))
    assert ModelRunner._eos_ids([a, b]) == [2, 7, 9]
