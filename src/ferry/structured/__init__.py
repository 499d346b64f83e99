"""Constrained decoding (structured outputs) on llguidance.

    StructuredOutputsParams --GrammarCompiler.compile (cached, off the engine loop)--> CompiledGrammar
    CompiledGrammar.matcher()  -> one GrammarMatcher per sequence (advanced with each token)
    BitmaskFiller.fill(matchers) -> TokenMask (one bit per token, per row) -> the sampler's logits

Below the model and the loader, above the tokenizer: it imports torch, llguidance,
``ferry.tokenizer`` and ``ferry.sampling_params``, never the engine, runner, batch or server.
"""

from ferry.structured.bitmask import BitmaskFiller, TokenMask
from ferry.structured.compiler import CompiledGrammar, GrammarCompiler, GrammarError
from ferry.structured.matcher import GrammarMatcher
from ferry.structured.sources import grammar_source, strict_json_schema

__all__ = ["BitmaskFiller", "CompiledGrammar", "GrammarCompiler", "GrammarError", "GrammarMatcher",
           "TokenMask", "grammar_source", "strict_json_schema"]
