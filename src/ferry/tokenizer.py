"""Tokenizer: Hugging Face ``tokenizers`` plus the model's chat template (sandboxed jinja2).

Built from an HF folder (``tokenizer.json`` + ``tokenizer_config.json``) or from GGUF metadata alone
(byte-level BPE or SentencePiece rebuilt from ``tokenizer.ggml.*`` by ``ferry.gguf_vocab``), so
serving never needs ``transformers``. Both paths mirror what ``transformers.AutoTokenizer`` builds for
the same files, and the tests check that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from ferry.gguf_vocab import bytes_to_unicode as _bytes_to_unicode  # noqa: F401  (tests/loader uses it)
from ferry.gguf_vocab import gguf_vocab
from ferry.jsonfile import read_json_object


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
        """The tokenizer GGUF metadata alone describes: byte-level BPE (``tokenizer.ggml.model ==
        "gpt2"``) or SentencePiece (``"llama"``), see ``ferry.gguf_vocab``.

        ``fields`` maps GGUF keys to plain Python values (lists for arrays).
        """
        vocab = gguf_vocab(fields)
        special = vocab.special_tokens
        _set_template_processing(vocab.backend, special["bos_token"] if vocab.add_bos else None,
                                 special["eos_token"] if vocab.add_eos else None)
        return cls(vocab.backend, special_tokens=special, eos_token_ids=vocab.eos_token_ids,
                   chat_template=vocab.chat_template)

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

    def backend_json(self) -> str:
        """The ``tokenizers`` definition as JSON (what grammar engines build their token tables from)."""
        return self._backend.to_str()

    # ----------------------------------------------------------------------------- chat

    def replace_chat_template(self, template: str) -> None:
        """Use ``template`` (Jinja source) instead of the model's own (``--chat-template``).

        Compiled at once, so a broken template is a ``ValueError`` at start-up, not per request.
        """
        self._compiled_template = _compile_template(template)
        self.chat_template = template

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
