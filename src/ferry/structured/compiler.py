"""Compile ``StructuredOutputsParams`` for one tokenizer, with a bounded LRU cache.

Compiling (llguidance builds the lexer over the vocabulary) takes from a millisecond to a second
for large schemas; it runs on the caller's thread (the server calls it in a worker thread, never on
its event loop or the engine thread), and llguidance releases the GIL meanwhile. A compiled
grammar is a fresh ``LLMatcher`` kept as a template: each sequence gets a cheap deep copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance

from ferry.sampling_params import StructuredOutputsParams
from ferry.structured.errors import GrammarError
from ferry.structured.matcher import GrammarMatcher
from ferry.structured.sources import constraint_param, grammar_source
from ferry.tokenizer import Tokenizer

DEFAULT_CACHE_SIZE = 128


class CompiledGrammar:
    """One constraint compiled for one tokenizer; ``matcher()`` starts a sequence on it."""

    def __init__(self, template: llguidance.LLMatcher, vocab_size: int) -> None:
        self._template = template
        self.vocab_size = vocab_size  # bits in one row of the token bitmask

    def matcher(self) -> GrammarMatcher:
        # NOTE: only ever copied, never advanced, so sequences on other threads may share it.
        return GrammarMatcher(self._template.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """The compile cache and the llguidance tokenizer of one model's tokenizer (thread-safe).

    ``eos_token_ids``: every id that ends a sequence; once the constraint is complete, they are
    the only tokens allowed. ``vocab_size``: the model's vocabulary (its logits' width), which
    may exceed the tokenizer's.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int], vocab_size: int,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if not eos_token_ids:
            raise ValueError("constrained decoding needs at least one EOS token id")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._tokenizer = tokenizer
        self._eos = list(dict.fromkeys(eos_token_ids))
        self._vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputsParams, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache (held for dict operations only)
        # NOTE: its own lock: building the tokenizer takes ~0.2 s, and ``cached`` runs on the
        # server's event loop, which must not wait for it.
        self._tokenizer_lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self.num_compiled = 0  # compiles that missed the cache (tests and metrics)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (~0.2 s for a 50k vocabulary), once."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    _tokenizer_json(self._tokenizer), n_vocab=self._vocab_size, eos_token=self._eos)
            return self._ll_tokenizer

    def cached(self, params: StructuredOutputsParams) -> CompiledGrammar | None:
        """The compiled grammar if the cache has it (cheap: call it anywhere)."""
        with self._lock:
            grammar = self._cache.get(params)
            if grammar is not None:
                self._cache.move_to_end(params)
            return grammar

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """GrammarError (a ValueError naming the field) when the constraint is invalid."""
        grammar = self.cached(params)
        if grammar is not None:
            return grammar
        tokenizer = self.ll_tokenizer
        source = grammar_source(params)
        template = llguidance.LLMatcher(tokenizer, source, log_level=0)
        if template.is_error():
            raise GrammarError(constraint_param(params), _first_line(template.get_error()))
        grammar = CompiledGrammar(template, tokenizer.vocab_size)
        with self._lock:
            self.num_compiled += 1
            self._cache[params] = grammar
            self._cache.move_to_end(params)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


def _tokenizer_json(tokenizer: Tokenizer) -> str:
    # NOTE: llguidance reads the `tokenizers` JSON itself (byte-level BPE, SentencePiece byte fallback)
    return tokenizer.backend_json()


def _first_line(error: str) -> str:
    # NOTE: llguidance appends its parser state and the whole grammar after the message; the
    # client needs the message (a regex error keeps its caret lines, which point at the mistake).
    text = error.split("\n<state>", 1)[0].strip()
    return text.removeprefix("Parser Error: ") or "the constraint cannot be compiled"
