"""The tokenizer built from GGUF metadata / an HF folder matches transformers' AutoTokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferry.loader.gguf import open_gguf, read_metadata
from ferry.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nmore",
    "ünïcödé façade naïve — “quotes” … ½ ∑ ∞",
    "日本語のテキストと中文文本, 한국어",
    "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇫🇷 and skin 👍🏽",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>after <repo_name> and <filename>x",
    "<|im_start|><|im_start|>  <|im_end|>",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org",
    "It's they're we'll I'd don't",
    "\u200b zero-width \u00a0 nbsp \ufeff bom",
    "A" * 300,
    "mixed CASE camelCase snake_case kebab-case",
]

MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke 🎉"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?\n\n  (explain)"},
    ],
]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(smollm2_path)))


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def folder_tokenizer(hf_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_folder(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_folder_tokenizer(hf_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))


@pytest.fixture(params=["gguf", "folder"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Any]:
    if request.param == "gguf":
        return request.getfixturevalue("gguf_tokenizer"), request.getfixturevalue("hf_gguf_tokenizer")
    return request.getfixturevalue("folder_tokenizer"), request.getfixturevalue("hf_folder_tokenizer")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, hf = pair
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair: tuple[Tokenizer, Any], messages: list[dict[str, Any]],
                                            add_generation_prompt: bool) -> None:
    ours, hf = pair
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(hf_ids, dict) or hasattr(hf_ids, "input_ids"):
        hf_ids = hf_ids["input_ids"]
    assert ids == list(hf_ids)
    assert text.startswith("<|im_start|>")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_special_ids_and_vocab(pair: tuple[Tokenizer, Any]) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids[0] == hf.eos_token_id == 2
    assert set(hf.all_special_ids) <= ours.all_special_ids
    assert not ours.add_bos
    # Every id we call special is one HF's decode drops too.
    for i in sorted(ours.all_special_ids):
        assert hf.decode([i], skip_special_tokens=True) == ""
        assert ours.decode([i]) == ""


def test_convert_ids_rejects_out_of_range(gguf_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gguf_tokenizer.convert_ids_to_tokens([gguf_tokenizer.vocab_size + 5])


def test_folder_reads_generation_config_eos(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    for f in hf_tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.eos_token_ids == (2, 0)


def test_folder_add_bos_flag_rebuilds_post_processor(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    import json

    for f in hf_tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.add_bos
    assert tok.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False)


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def _tiny_metadata(**extra: Any) -> dict[str, Any]:
    from ferry.gguf_vocab import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + ["Ġt", "he", "Ġthe", "<s>", "</s>", "<think>", "Ġthe"]
    types = [1] * len(byte_chars) + [1, 1, 1, 3, 3, 4, 1]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": 259,
        "tokenizer.ggml.eos_token_id": 260,
        **extra,
    }


def test_gguf_metadata_bos_and_added_tokens() -> None:
    tok = Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.add_bos_token": True,
                                                         "tokenizer.ggml.eot_token_id": 261}))
    assert tok.add_bos and tok.bos_token_id == 259
    assert tok.eos_token_ids == (260, 261)
    ids = tok.encode("the<think> the")
    assert ids[0] == 259
    assert 261 in ids  # user-defined token matched whole
    assert tok.decode(ids) == "the<think> the"  # kept on decode: not special
    assert tok.all_special_ids == frozenset({259, 260})
    assert tok.encode(" the", add_special_tokens=False) == [tok.token_to_id("Ġthe")]


def test_gguf_metadata_rejects_other_tokenizers() -> None:
    for model in ("t5", "bert", None):
        with pytest.raises(ValueError, match=r"unsupported GGUF tokenizer .*'gpt2'.*'llama'"):
            Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.model": model}))
    with pytest.raises(ValueError, match="merge"):
        Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.merges": ["abc"]}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.bos_token_id": 10**6}))


def test_chat_template_errors_and_filters() -> None:
    md = _tiny_metadata()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf_metadata(md).apply_chat_template([{"role": "user", "content": "x"}])
    template = ("{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}"
                "{{ messages[0] | tojson }}|{{ bos_token }}|{{ strftime_now('%Y') | length }}")
    tok = Tokenizer.from_gguf_metadata({**md, "tokenizer.chat_template": template})
    out = tok.apply_chat_template([{"role": "user", "content": "<a & b>"}])
    assert out == '{"role": "user", "content": "<a & b>"}|<s>|4'  # no HTML escaping
    with pytest.raises(ValueError, match="only one message"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    sandbox = Tokenizer.from_gguf_metadata({**md, "tokenizer.chat_template": "{{ messages.append(1) }}"})
    with pytest.raises(ValueError, match="unsafe|access"):  # jinja SecurityError, re-raised
        sandbox.apply_chat_template([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_pre_tokenizer_split_and_add_bos_match_transformers(tmp_path: Path, gguf_tokenizer: Tokenizer,
                                                                 smollm2_path: Path, pre: str) -> None:
    """SmolLM2's vocabulary under another `tokenizer.ggml.pre` and add_bos_token=True."""
    import gguf
    from transformers import AutoTokenizer

    md = read_metadata(open_gguf(smollm2_path))
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    w.add_token_merges(md["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(path)))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.add_bos
    for text in TEXTS + ["x  \n\n  y", "I'VE got 1000000 cats!!!\n\n"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # The split regex is really in use: SmolLM2's own (GPT-2) split tokenizes this differently.
    assert ours.encode("x  \n\n  y", add_special_tokens=False) != gguf_tokenizer.encode("x  \n\n  y")
