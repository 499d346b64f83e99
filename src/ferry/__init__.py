"""Ferry: an LLM serving stack. Public API: ``LLM``, ``SamplingParams``, ``RequestOutput``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferry.outputs import CompletionOutput, RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.version import __version__

if TYPE_CHECKING:
    from ferry.engine.llm_engine import LLM


def __getattr__(name: str) -> Any:
    # NOTE: LLM pulls in torch; import it lazily so `ferry plan`/`ferry bench` start fast.
    if name == "LLM":
        from ferry.engine.llm_engine import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
