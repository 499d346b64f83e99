"""Tokenizer: Hugging Face ``tokenizers`` plus the model's chat template (sandboxed jinja2).

Built from an HF folder (``tokenizer.json`` + ``tokenizer_config.json``) or from GGUF metadata alone
(a byte-level BPE rebuilt from ``tokenizer.ggml.*``), so serving never needs ``transformers``. Both
paths mirror what ``transformers.AutoTokenizer`` builds for the same files, and the tests check that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from ferry.jsonfile import read_json_object

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

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


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
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


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str | None],
        eos_token_ids: Sequence[int],
        chat_template: str | None,
    ) -> None:
        # special_tokens: {"bos_token": "<s>", "eos_token": ..., "unk_token": ..., "pad_token": ...}
        self._backend = backend
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        bos = self._special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos is not None else None
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        # NOTE: the ids `decode(skip_special_tokens=True)` drops: every added token marked special,
        # which is wider than transformers' `all_special_ids` (only bos/eos/unk/pad) but is what
        # its decode actually skips.
        self.all_special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.chat_template: str | None = chat_template
        probe = backend.encode("a", add_special_tokens=True).ids
        self.add_bos: bool = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self._compiled_template: jinja2.Template | None = None

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_hf_folder(cls, path: Path) -> Tokenizer:
        """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``,
        ``generation_config.json``) of a Hugging Face model folder."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # NOTE: the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"cannot read {tok_file}: {e}") from e
        config = read_json_object(path / "tokenizer_config.json", missing_ok=True)
        special = {name: _token_content(config.get(name))
                   for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        template = _chat_template_from_config(path, config)
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is not None or add_eos is not None or backend.post_processor is None:
            # NOTE: same rule as transformers: an explicit flag (or no post-processor) rebuilds
            # the post-processor from bos/eos.
            _set_template_processing(backend, special["bos_token"] if add_bos else None,
                                     special["eos_token"] if add_eos else None)
        eos_ids: list[int] = []
        if special["eos_token"] is not None and backend.token_to_id(special["eos_token"]) is not None:
            eos_ids.append(backend.token_to_id(special["eos_token"]))
        generation = read_json_object(path / "generation_config.json", missing_ok=True)
        eos_ids += _as_id_list(generation.get("eos_token_id"))
        return cls(backend, special_tokens=special, eos_token_ids=eos_ids, chat_template=template)

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """A byte-level BPE (``tokenizer.ggml.model == "gpt2"``) from GGUF metadata alone.

        ``fields`` maps GGUF keys to plain Python values (lists for arrays).
        """
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer {model!r}: only byte-level BPE ('gpt2') is supported")
        tokens = list(fields.get("tokenizer.ggml.tokens") or ())
        merges_raw = list(fields.get("tokenizer.ggml.merges") or ())
        if not tokens or not merges_raw:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        token_types = list(fields.get("tokenizer.ggml.token_type") or ())
        spelling = _bytes_to_unicode()
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
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
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
        # Control tokens (e.g. <|im_start|>) are matched whole and are special; user-defined ones
        # (e.g. <think>) are matched whole but kept on decode. A "control" token outside the byte
        # alphabet is a llama.cpp mislabel and would grow the vocabulary, so it is skipped.
        control = [t for t, ty in zip(tokens, token_types)
                   if ty == _TOKEN_TYPE_CONTROL and set(t) <= alphabet]
        control += [t for t in special.values() if t is not None and t not in control]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        user = [t for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        _set_template_processing(
            backend,
            special["bos_token"] if fields.get("tokenizer.ggml.add_bos_token", False) else None,
            special["eos_token"] if fields.get("tokenizer.ggml.add_eos_token", False) else None,
        )
        eos_ids = [int(fields[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                            "tokenizer.ggml.eom_token_id") if fields.get(k) is not None]
        return cls(backend, special_tokens=special, eos_token_ids=eos_ids,
                   chat_template=fields.get("tokenizer.chat_template"))

    # ----------------------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            tok = self._backend.id_to_token(int(i))
            if tok is None:
                raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size} tokens")
            out.append(tok)
        return out

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ----------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render ``messages`` with the model's template, like ``transformers``' apply_chat_template.

        Extra keyword arguments (``tools``, ``enable_thinking``...) become template variables.
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use a completion (raw prompt) instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        variables = {**self._special_tokens, "tools": None, "documents": None, **template_kwargs}
        try:
            return self._compiled_template.render(
                messages=_plain(messages), add_generation_prompt=add_generation_prompt, **_plain(variables))
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        # NOTE: the template writes its own special tokens, so none are added here (as in HF).
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------- helpers


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unexpected special token entry {value!r} in tokenizer_config.json")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def _chat_template_from_config(path: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template in {path / 'tokenizer_config.json'} must be a string")
    return template


def _set_template_processing(backend: _Backend, bos: str | None, eos: str | None) -> None:
    specials = []
    single = "$A:0"
    pair = "$A:0 $B:1"
    if bos is not None:
        specials.append((bos, backend.token_to_id(bos)))
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
    if eos is not None:
        specials.append((eos, backend.token_to_id(eos)))
        single = f"{single} {eos}:0"
        pair = pair.replace("$A:0", f"$A:0 {eos}:0").replace("$B:1", f"$B:1 {eos}:1")
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types, so templates cannot reach rich objects' methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):  # pydantic models from the server's request bodies
        return _plain(value.model_dump(exclude_none=True))
    raise TypeError(f"chat messages must hold JSON-like values, got {type(value).__name__}")


def _compile_template(source: str) -> jinja2.Template:
    """The same sandboxed environment transformers renders chat templates in."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # NOTE: jinja's own tojson HTML-escapes, which would corrupt prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from e
