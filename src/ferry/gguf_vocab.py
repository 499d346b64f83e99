"""A GGUF file's vocabulary (``tokenizer.ggml.*`` metadata) as a Hugging Face ``tokenizers`` backend.

Two vocabulary kinds, named by ``tokenizer.ggml.model``:

- ``"gpt2"``: byte-level BPE with the file's merges (SmolLM2, Llama 3, Qwen2...).
- ``"llama"``: SentencePiece BPE (Llama 2, Mistral, Gemma, Phi-3...): pieces spelled with ``▁`` for
  a space, ``<0xNN>`` byte-fallback pieces, a score per piece and no merges. The merges are rebuilt
  from the scores (Gemma: from the pieces' order), which is how ``transformers`` reads these files.

Each build mirrors what ``transformers.AutoTokenizer.from_pretrained(folder, gguf_file=...)`` builds
for the same file, so the token ids are the same; the tests check that on real and generated files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

SUPPORTED_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}

# GGUF token types (llama.cpp `llama_token_type`).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_SPACE = "\u2581"  # SentencePiece's spelling of a space: "▁"

# Pre-tokenizer split regexes for `tokenizer.ggml.pre` values; other values use GPT-2's own regex
# (ByteLevel with use_regex=True), as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}

# SentencePiece vocabularies whose text handling is set by `general.architecture` (as transformers
# picks it; nothing else in the file says so). Others follow `tokenizer.ggml.add_space_prefix`.
_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})
_PHI3_ARCHS = frozenset({"phi3"})


@dataclass(frozen=True)
class GGUFVocab:
    """A backend without post-processor, plus what the caller needs to finish the tokenizer."""

    backend: Backend  # model, normalizer, pre-tokenizer, decoder and added tokens
    special_tokens: dict[str, str | None]  # bos_token, eos_token, unk_token, pad_token
    add_bos: bool
    add_eos: bool
    eos_token_ids: tuple[int, ...]  # eos, then eot / eom where the file names them
    chat_template: str | None


def gguf_vocab(fields: Mapping[str, Any]) -> GGUFVocab:
    """Build the vocabulary ``fields`` (GGUF keys -> plain Python values, lists for arrays) describe."""
    model = fields.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        supported = ", ".join(f"{name!r} ({kind})" for name, kind in SUPPORTED_MODELS.items())
        raise ValueError(f"unsupported GGUF tokenizer tokenizer.ggml.model={model!r}; supported: {supported}")
    # NOTE: the tokens as the file spells them; the builders may respell some for their vocabulary,
    # but special and added tokens are named and matched by the file's spelling (as in transformers).
    tokens = [str(t) for t in fields.get("tokenizer.ggml.tokens") or ()]
    if not tokens:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens")
    if model == "gpt2":
        backend = _byte_level_bpe(fields, tokens)
        default_add_bos = False
    else:
        backend = _sentencepiece_bpe(fields, tokens)
        # NOTE: llama.cpp (and transformers) add BOS to a SentencePiece vocabulary that says nothing.
        default_add_bos = True

    def token_at(key: str) -> str | None:
        idx = fields.get(key)
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens):
            raise ValueError(f"{key}={idx} is outside the vocabulary of {len(tokens)} tokens")
        return tokens[int(idx)]

    special = {
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
    }
    _add_marked_tokens(backend, fields, tokens, special, byte_level=model == "gpt2")
    eos_ids = tuple(int(fields[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                            "tokenizer.ggml.eom_token_id") if fields.get(k) is not None)
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    return GGUFVocab(backend=backend, special_tokens=special, add_bos=add_bos and special["bos_token"] is not None,
                     add_eos=add_eos and special["eos_token"] is not None, eos_token_ids=eos_ids,
                     chat_template=fields.get("tokenizer.chat_template"))


# --------------------------------------------------------------------------------- byte-level BPE


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level_bpe(fields: Mapping[str, Any], tokens: Sequence[str]) -> Backend:
    merges_raw = list(fields.get("tokenizer.ggml.merges") or ())
    if not merges_raw:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # NOTE: a few converters store tokens as raw text; respell those in the byte alphabet.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {m!r} in GGUF metadata")
        merges.append((parts[0], parts[1]))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                 continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False, byte_fallback=False))
    split = _PRE_TOKENIZER_SPLITS.get(fields.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


# --------------------------------------------------------------------------------- SentencePiece


def _sentencepiece_bpe(fields: Mapping[str, Any], tokens: Sequence[str]) -> Backend:
    """SentencePiece pieces -> a BPE with byte fallback; the text handling by architecture.

    ====================  ===========================================  =========================
    style                 encode                                       decode
    ====================  ===========================================  =========================
    Llama 2 / Mistral     " " -> "▁", one "▁" before the text unless   "▁" -> " ", drop the
    (add_space_prefix)    it already starts with one                   first leading space
    Gemma                 " " -> "▁", nothing prepended                "▁" -> " "
    Phi-3                 "▁" before every text run, " " -> "▁"        as Llama 2
    other, with           " " -> "▁", nothing prepended                "▁" -> " "
    add_space_prefix
    false
    ====================  ===========================================  =========================

    Gemma and Phi-3 are told by ``general.architecture``, as transformers tells them; for the others
    the file's ``tokenizer.ggml.add_space_prefix`` (default true) decides, as in llama.cpp.
    """
    arch = fields.get("general.architecture", "")
    if arch in _GEMMA_ARCHS:
        # NOTE: Gemma files store whitespace pieces (user-defined "▁▁"...) with real spaces; the
        # text side spells spaces "▁", so respell them. Gemma's scores do not follow its merge
        # order, the pieces' order in the file does (first = merged first), as transformers reads
        # these files.
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        scores = list(fields.get("tokenizer.ggml.scores") or ())
        if len(scores) != len(tokens):
            raise ValueError(f"GGUF metadata has {len(scores)} tokenizer.ggml.scores "
                             f"for {len(tokens)} tokenizer.ggml.tokens")
        priority = dict(zip(tokens, (float(s) for s in scores)))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    # NOTE: every piece that is not in the vocabulary falls back to its UTF-8 bytes (<0xNN>);
    # fuse_unk only matters for a vocabulary missing byte pieces.
    backend = Backend(models.BPE(vocab=vocab, merges=_merges_from_priority(vocab, priority), dropout=None,
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    text_decoders = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch in _PHI3_ARCHS:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
        text_decoders.append(decoders.Strip(" ", 1, 0))
    elif arch in _GEMMA_ARCHS or not fields.get("tokenizer.ggml.add_space_prefix", True):
        # NOTE: transformers ignores a false add_space_prefix outside Gemma and prefixes anyway;
        # llama.cpp and the SentencePiece model do not, and the model was trained on their ids.
        backend.normalizer = normalizers.Replace(" ", _SPACE)
    else:
        # NOTE: "first": the prefix goes before the start of the text only, not after a special
        # token inside it, and not when the text already starts with a space (transformers'
        # non-legacy Llama rule).
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
        text_decoders.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(text_decoders)
    return backend


def _merges_from_priority(vocab: Mapping[str, int], priority: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a piece vocabulary: every split of a piece into two pieces.

    Merges producing a higher-priority piece come first; between equal priorities the longer left
    part, then the longer right part, then the order the pieces are listed in. This is the order
    transformers derives, so the same text gets the same ids (files whose scores are all equal, as
    llama.cpp writes for a vocabulary read from tokenizer.json, rest on the tie-breaks alone).
    """
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for piece, score in priority.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                candidates.append((-score, -len(left), -len(right), len(candidates), left, right))
    candidates.sort()  # NOTE: len(candidates) is unique, so the sort never compares the strings
    return [(c[4], c[5]) for c in candidates]


# --------------------------------------------------------------------------------- added tokens


def _add_marked_tokens(backend: Backend, fields: Mapping[str, Any], tokens: Sequence[str],
                       special: Mapping[str, str | None], *, byte_level: bool) -> None:
    """Control tokens (``<|im_start|>``, ``<s>``) are matched whole and are special; user-defined
    ones (``<think>``) are matched whole but kept on decode."""
    token_types = list(fields.get("tokenizer.ggml.token_type") or ())
    vocab = backend.get_vocab(with_added_tokens=False)
    # NOTE: in a byte-level vocabulary a "control" token outside the byte alphabet is a llama.cpp
    # mislabel and would grow the vocabulary, so it is skipped.
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [t for t, ty in zip(tokens, token_types)
               if ty == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [t for t, ty in zip(tokens, token_types) if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    # NOTE: a named token (bos/eos/unk/pad) the file marks user-defined stays a plain added token,
    # as in transformers, which adds the named ones last and only when not added yet.
    named = [t for t in dict.fromkeys(special.values()) if t is not None and t not in control and t not in user]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if named:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
