"""LLMEngine.make_request: what each request's detokenizer is built with."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from ferry import LLM, SamplingParams
from ferry.tokenizer import Tokenizer


def _sentencepiece_like() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581The": 3, "\u2581capital": 4, "\u2581is": 5,
             "\u2581Paris": 6}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()  # drops the leading space of the decoded text
    return Tokenizer(backend, special_tokens={"eos_token": "</s>"}, eos_token_ids=[2],
                     chat_template=None)


def test_first_generated_token_keeps_its_leading_space(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), num_gpu_blocks_override=16, max_model_len=64)
    llm.engine.tokenizer = _sentencepiece_like()
    state = llm.engine.make_request("r", {"prompt_token_ids": [3, 4, 5]},
                                    SamplingParams(max_tokens=2))
    detok = state.detokenizers[0]
    detok.update([6])
    # As vLLM: the continuation of "The capital is" is " Paris", so prompt + text reads right.
    assert detok.output_text == " Paris"
