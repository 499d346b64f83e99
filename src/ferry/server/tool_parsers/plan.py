"""What a chat request's ``tools`` and ``tool_choice`` mean for one generation (vLLM's rules):

- ``none`` (or no tools): no parsing; the template still sees the tools unless the server runs
  with ``--exclude-tools-when-tool-choice-none``.
- ``auto``: the model may call tools; its output is read by the server's parser. It needs
  ``--enable-auto-tool-choice`` (a 400 otherwise, as vLLM).
- ``required`` / a named function: the grammar (``structured_outputs.json``) makes the output a
  valid call, whatever the server's flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferry.config import ServerConfig
from ferry.sampling_params import StructuredOutputsParams
from ferry.server.protocol import ChatCompletionRequest, NamedToolChoice
from ferry.server.tool_parsers import (
    needs_special_tokens,
    parser_factory,
    parser_for_template,
)
from ferry.server.tool_parsers.base import ToolCallExtractor
from ferry.server.tool_parsers.forced import (
    NamedCall,
    RequiredCalls,
    function_parameters,
    required_schema,
)


class ToolChoiceError(ValueError):
    """A request whose tools cannot be honoured as asked; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None  # what the chat template gets as ``tools``
    extractor: Callable[[], ToolCallExtractor] | None = None  # one per choice; None: plain text
    structured_outputs: StructuredOutputsParams | None = None  # the grammar that forces a call
    keep_special_tokens: bool = False  # the parser's markers are special tokens
    calls_finish: bool = True  # a choice that called tools finishes with "tool_calls"


def plan_tools(req: ChatCompletionRequest, config: ServerConfig,
               chat_template: str | None) -> ToolPlan:
    """The plan for ``req``; ``ToolChoiceError`` when it cannot be served."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if not tools or choice is None or choice == "none":
        hidden = choice == "none" and config.exclude_tools_when_tool_choice_none
        return ToolPlan(template_tools=None if hidden or not tools else tools)
    functions = [t["function"] for t in tools]
    if isinstance(choice, NamedToolChoice):
        function = next(f for f in functions if f["name"] == choice.function.name)
        name = function["name"]
        return ToolPlan(tools, lambda: NamedCall(name),
                        StructuredOutputsParams(json=function_parameters(function)),
                        calls_finish=False)
    if choice == "required":
        try:
            schema = required_schema(functions, parallel=req.parallel_tool_calls is not False)
        except ValueError as exc:
            raise ToolChoiceError("tools", str(exc)) from exc
        names = [f["name"] for f in functions]
        return ToolPlan(tools, lambda: RequiredCalls(names), StructuredOutputsParams(json=schema))
    # auto
    parser = config.tool_call_parser or parser_for_template(chat_template)
    if not config.enable_auto_tool_choice or parser is None:
        raise ToolChoiceError("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice '
                              "and --tool-call-parser to be set")
    return ToolPlan(tools, parser_factory(parser), keep_special_tokens=needs_special_tokens(parser))
