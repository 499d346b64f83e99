"""GGUF vocabularies -> ferry's Tokenizer: the same ids as transformers' GGUF tokenizer.

SentencePiece ("llama") vocabularies are trained here (tests/spm_fixtures.py) in three styles -- Llama 2
(space prefix), Gemma (none), Phi-3 -- and written as GGUF files the way llama.cpp writes them;
byte-level BPE ("gpt2") uses SmolLM2's real GGUF, also under the Llama 3 pre-tokenizer.
Each is compared with ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` on a multilingual,
code and emoji text set with special and added tokens inside the text, and SentencePiece ones also
with the SentencePiece model itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from spm_fixtures import (
    GEMMA_LAYOUT,
    LLAMA_LAYOUT,
    PHI3_LAYOUT,
    TEXTS,
    SpmLayout,
    texts_for,
    train_sentencepiece,
    write_spm_gguf,
)

from ferry.loader.gguf import open_gguf, read_metadata
from ferry.tokenizer import Tokenizer

LAYOUTS = {"llama": LLAMA_LAYOUT, "gemma2": GEMMA_LAYOUT, "phi3": PHI3_LAYOUT}
N_TEXTS = len(texts_for(LLAMA_LAYOUT))
TEMPLATE = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


@dataclasses.dataclass
class SpmCase:
    layout: SpmLayout
    proto: bytes  # the SentencePiece model the GGUF was written from
    path: Path
    ours: Tokenizer
    hf: Any

    @property
    def texts(self) -> list[str]:
        return texts_for(self.layout)


def _load_hf(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _load_ours(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(path)))


@pytest.fixture(scope="module")
def spm_protos() -> dict[str, bytes]:
    return {name: train_sentencepiece(layout) for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def spm(request: pytest.FixtureRequest, spm_protos: dict[str, bytes],
        tmp_path_factory: pytest.TempPathFactory) -> SpmCase:
    layout = LAYOUTS[request.param]
    path = write_spm_gguf(tmp_path_factory.mktemp(f"spm-{request.param}") / "tok.gguf",
                          spm_protos[request.param], layout, chat_template=TEMPLATE)
    return SpmCase(layout, spm_protos[request.param], path, _load_ours(path), _load_hf(path))


def _sentencepiece(proto: bytes) -> Any:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=proto)


# --------------------------------------------------------------------------------- SentencePiece


@pytest.mark.parametrize("i", range(N_TEXTS))
def test_spm_ids_and_decode_match_transformers(spm: SpmCase, i: int) -> None:
    text = spm.texts[i]
    for add_special in (True, False):
        ids = spm.ours.encode(text, add_special_tokens=add_special)
        assert ids == spm.hf.encode(text, add_special_tokens=add_special), (text, spm.ours.convert_ids_to_tokens(ids))
        assert spm.ours.convert_ids_to_tokens(ids) == spm.hf.convert_ids_to_tokens(ids)
        for skip in (True, False):
            assert spm.ours.decode(ids, skip_special_tokens=skip) == spm.hf.decode(ids, skip_special_tokens=skip)


def _round_trip_expected(layout: SpmLayout, text: str) -> str | None:
    """What decoding gives back; None where only the spaces may differ (Phi-3 with special tokens)."""
    if layout.arch == "phi3":
        # NOTE: Phi-3 prefixes a space to every run of text, also after a special token inside it.
        return None if any(s in text for s in layout.specials_in_text) else text
    if layout.add_dummy_prefix and text.startswith(" "):
        # NOTE: transformers' Llama rule: no prefix when the text already starts with a space, so
        # " x" and "x" both encode as "▁x" and one leading space is lost.
        return text[1:]
    return text


@pytest.mark.parametrize("i", range(N_TEXTS))
def test_spm_decode_round_trips(spm: SpmCase, i: int) -> None:
    text = spm.texts[i]
    expected = _round_trip_expected(spm.layout, text)
    decoded = spm.ours.decode(spm.ours.encode(text, add_special_tokens=False), skip_special_tokens=False)
    if expected is None:
        assert decoded.replace(" ", "") == text.replace(" ", "") and len(decoded) >= len(text)
        return
    assert decoded == expected
    if not any(s in text for s in spm.layout.specials_in_text):
        assert spm.ours.decode(spm.ours.encode(text)) == expected  # BOS added, then skipped


def test_spm_streaming_decode_matches_whole_decode(spm: SpmCase) -> None:
    """The engine's incremental detokenizer, fed one id at a time, gives the text a whole decode
    gives: byte-fallback pieces join into characters, the first leading space goes as in decode."""
    from ferry.engine.detokenizer import IncrementalDetokenizer

    for text in spm.texts:
        ids = spm.ours.encode(text)
        detok = IncrementalDetokenizer(spm.ours)
        for i in ids:
            detok.update([i])
            assert "\ufffd" not in detok.output_text, text
        assert detok.output_text == spm.ours.decode(ids), text


def test_spm_plain_text_matches_sentencepiece(spm: SpmCase) -> None:
    """An independent reference: the SentencePiece model the GGUF came from."""
    sp = _sentencepiece(spm.proto)
    checked = 0
    for text in spm.texts:
        if any(s in text for s in spm.layout.specials_in_text):
            continue  # SentencePiece does not match control tokens inside text
        if spm.layout.add_dummy_prefix and text.startswith(" "):
            continue  # SentencePiece prefixes a second "▁"; transformers (and so ferry) do not
        assert spm.ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        checked += 1
    assert checked >= 20
    assert spm.ours.encode("🎉 e\u0301", add_special_tokens=False) == sp.encode("🎉 e\u0301")


def test_spm_byte_fallback_pieces(spm: SpmCase) -> None:
    text = "한국어"  # not in the training corpus: every character falls back to its UTF-8 bytes
    pieces = spm.ours.convert_ids_to_tokens(spm.ours.encode(text, add_special_tokens=False))
    byte_pieces = [p for p in pieces if p.startswith("<0x")]
    assert len(byte_pieces) == len(text.encode("utf-8"))
    assert spm.ours.decode(spm.ours.encode(text, add_special_tokens=False)) == text


def test_spm_special_and_added_tokens(spm: SpmCase) -> None:
    layout, ours, hf = spm.layout, spm.ours, spm.hf
    assert ours.vocab_size == len(hf) == _sentencepiece(spm.proto).vocab_size()
    assert ours.bos_token_id == hf.bos_token_id == layout.bos_id
    assert ours.eos_token_ids == (layout.eos_id,) and hf.eos_token_id == layout.eos_id
    assert ours.add_bos and ours.encode("x")[0] == layout.bos_id
    assert ours.chat_template == TEMPLATE
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "[INST] hi [/INST]"
    assert set(hf.all_special_ids) <= ours.all_special_ids
    named = {layout.unk_id, layout.bos_id, layout.eos_id} | ({layout.pad_id} if layout.pad_id >= 0 else set())
    control = {ours.token_to_id(t) for t in layout.control}
    assert ours.all_special_ids == named | control
    for i in sorted(ours.all_special_ids):  # control tokens: matched whole, skipped on decode
        token = ours.convert_ids_to_tokens([i])[0]
        assert ours.encode(f"a{token}b", add_special_tokens=False)[1:2] == [i]
        assert ours.decode([i]) == "" == hf.decode([i], skip_special_tokens=True)
        assert ours.decode([i], skip_special_tokens=False) == token
    for token in (t for t in layout.user_defined if t.startswith("<")):  # user-defined: whole, and kept
        i = ours.token_to_id(token)
        assert i is not None and i not in ours.all_special_ids
        assert i in ours.encode(f"x{token}y", add_special_tokens=False)
        decoded = ours.decode(ours.encode(f"x{token}y", add_special_tokens=False))
        assert decoded == (f"x{token} y" if layout.arch == "phi3" else f"x{token}y")  # Phi-3: see above


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_spm_equal_scores_match_transformers(tmp_path: Path, spm_protos: dict[str, bytes], name: str) -> None:
    """Every score the same (-1000.0, llama.cpp's LlamaHfVocab): the merge order then rests on the
    tie-breaks (longer parts first, then the pieces' order); Gemma's never reads the scores."""
    layout = LAYOUTS[name]
    path = write_spm_gguf(tmp_path / "tok.gguf", spm_protos[name], layout, same_score=-1000.0)
    ours, hf = _load_ours(path), _load_hf(path)
    for text in texts_for(layout):
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    if name == "gemma2":  # the same ids as with the model's own scores
        real = _load_ours(write_spm_gguf(tmp_path / "real.gguf", spm_protos[name], layout))
        assert all(ours.encode(t) == real.encode(t) for t in texts_for(layout))


def test_spm_gemma_whitespace_pieces(tmp_path: Path) -> None:
    """Gemma stores whitespace pieces with real spaces (user-defined "  "): they are BPE pieces "▁▁"
    merged in the file's order, not added tokens matched in raw text."""
    import gguf

    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>", "a", "\u2581", "\u2581a", "  "])
    w.add_token_scores([0.0] * 8)  # Gemma's merge order is the pieces' order, whatever the scores
    w.add_token_types([3, 3, 3, 2, 1, 1, 1, 4])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, hf = _load_ours(path), _load_hf(path)
    assert ours.convert_ids_to_tokens(ours.encode("  ", add_special_tokens=False)) == ["\u2581\u2581"]
    assert ours.encode("  a", add_special_tokens=False) == [5, 6]  # "▁" + "▁a": "▁a" merges first
    for text in ("  ", "  a", "a  a", " a", "a"):
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == text == hf.decode(hf.encode(text), skip_special_tokens=True)


@pytest.mark.parametrize("add_bos,add_eos", [(None, None), (False, True), (True, True)])
def test_spm_add_bos_eos_flags_match_transformers(tmp_path: Path, spm_protos: dict[str, bytes],
                                                  add_bos: bool | None, add_eos: bool | None) -> None:
    """A file without the flags adds BOS (llama.cpp's default for SentencePiece), as transformers does."""
    path = write_spm_gguf(tmp_path / "tok.gguf", spm_protos["llama"], LLAMA_LAYOUT, add_bos=add_bos, add_eos=add_eos)
    ours, hf = _load_ours(path), _load_hf(path)
    assert ours.add_bos == (add_bos is not False)
    for text in ("Hello world", "", "日本語 🎉", "[INST] hi [/INST]"):
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert (ids[-1:] == [LLAMA_LAYOUT.eos_id]) == bool(add_eos)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_spm_named_user_defined_token_stays_plain(tmp_path: Path, spm_protos: dict[str, bytes]) -> None:
    """An EOS the file marks user-defined is matched whole but kept on decode, as in transformers."""
    import gguf

    md = read_metadata(open_gguf(write_spm_gguf(tmp_path / "src" / "tok.gguf", spm_protos["llama"], LLAMA_LAYOUT)))
    think = md["tokenizer.ggml.tokens"].index("<think>")
    path = tmp_path / "eos.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_scores(md["tokenizer.ggml.scores"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(think)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, hf = _load_ours(path), _load_hf(path)
    ids = ours.encode("a<think>b")
    assert ids == hf.encode("a<think>b") and think in ids
    assert ours.eos_token_ids == (think,)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a<think>b"


def test_spm_without_space_prefix_follows_the_file(tmp_path: Path) -> None:
    """A non-Gemma file with add_space_prefix=false gets no "▁" prefix, like the SentencePiece model
    it came from (llama.cpp honours the flag; transformers ignores it outside Gemma)."""
    layout = dataclasses.replace(LLAMA_LAYOUT, add_dummy_prefix=False)
    proto = train_sentencepiece(layout)
    ours = _load_ours(write_spm_gguf(tmp_path / "tok.gguf", proto, layout))
    sp = _sentencepiece(proto)
    for text in TEXTS:  # no special tokens in these
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert ours.decode(ids) == text
    assert ours.convert_ids_to_tokens(ours.encode("a b", add_special_tokens=False))[0] == "a"


def test_spm_malformed_metadata() -> None:
    base = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "\u2581", "\u2581a"],
            "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0], "tokenizer.ggml.token_type": [2, 1, 1, 1]}
    with pytest.raises(ValueError, match="2 tokenizer.ggml.scores for 4"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.scores": [0.0, 1.0]})
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.tokens": []})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.eos_token_id": 4})
    tok = Tokenizer.from_gguf_metadata(base)  # no bos: nothing to add, whatever the default
    assert not tok.add_bos and tok.bos_token_id is None
    assert tok.encode("a a") == [3, 3]
    assert tok.decode([3, 3]) == "a a"


# --------------------------------------------------------------------------------- byte-level BPE

BPE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<filename>", "<think>", "</think>"]
BPE_TEXTS = TEXTS + [
    "<|im_start|>user\nBonjour, ça va ? 🎉<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>after <filename>x.py\n<think>plan</think> answer",
    " ".join(BPE_SPECIALS) + "".join(BPE_SPECIALS),
]


def _bpe_gguf(path: Path, md: dict[str, Any], pre: str) -> Path:
    """SmolLM2's tokenizer as a tokenizer-only GGUF under another pre-tokenizer, with add_bos and two
    user-defined tokens appended."""
    import gguf

    tokens = list(md["tokenizer.ggml.tokens"]) + ["<think>", "</think>"]
    types = list(md["tokenizer.ggml.token_type"]) + [gguf.TokenType.USER_DEFINED] * 2
    w = gguf.GGUFWriter(str(path), md["general.architecture"])
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(md["tokenizer.ggml.merges"])
    w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(md["tokenizer.ggml.unknown_token_id"])
    w.add_pad_token_id(md["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(True)
    w.add_add_space_prefix(md["tokenizer.ggml.add_space_prefix"])
    w.add_chat_template(md["tokenizer.chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path: Path) -> dict[str, Any]:
    return read_metadata(open_gguf(smollm2_path))  # NOTE: read once: opening the model file is slow


@pytest.fixture(scope="module", params=["smollm2", "llama-bpe"])
def bpe(request: pytest.FixtureRequest, smollm2_path: Path, smollm2_metadata: dict[str, Any],
        tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    """SmolLM2's own GGUF; then its vocabulary under the Llama 3 split regex (test_tokenizer.py checks
    Qwen2's on a shorter text set)."""
    if request.param == "smollm2":
        return Tokenizer.from_gguf_metadata(smollm2_metadata), _load_hf(smollm2_path)
    path = _bpe_gguf(tmp_path_factory.mktemp(f"bpe-{request.param}") / "tok.gguf", smollm2_metadata, request.param)
    return _load_ours(path), _load_hf(path)


def test_bpe_ids_and_decode_match_transformers(bpe: tuple[Tokenizer, Any]) -> None:
    ours, hf = bpe
    assert ours.vocab_size == len(hf)
    for text in BPE_TEXTS:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_bpe_special_and_added_tokens(bpe: tuple[Tokenizer, Any]) -> None:
    ours, hf = bpe
    assert ours.bos_token_id == hf.bos_token_id == 1 and ours.eos_token_ids[0] == hf.eos_token_id == 2
    assert ours.add_bos == (hf.encode("a")[:1] == [1])
    assert set(hf.all_special_ids) <= ours.all_special_ids
    for token in BPE_SPECIALS:
        i = ours.token_to_id(token)
        if i is None:
            continue  # <think> only exists in the rewritten files
        assert ours.encode(f"a{token}b", add_special_tokens=False)[1:2] == [i] == hf.encode(
            f"a{token}b", add_special_tokens=False)[1:2]
        kept = ours.decode([i])
        assert kept == hf.decode([i], skip_special_tokens=True)
        assert kept == ("" if i in ours.all_special_ids else token)
