"""A request's structured-output fields -> one ``StructuredOutputsParams`` (or None).

The ways a client asks for constrained output, on chat and completions alike:

    response_format      {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    structured_outputs   vLLM's object: one of json, json_object, regex, choice, grammar
    guided_json, guided_regex, guided_choice, guided_grammar   vLLM's older top-level names

At most one of them may be given (``response_format: text`` asks for nothing). Shape errors are
400s naming the field here; a schema, regex or grammar that does not compile is a 400 from the
engine's compile step, whose message names the field kept in ``StructuredOutputsParams.source``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ferry.openai_errors import bad_request
from ferry.sampling_params import StructuredOutputsParams
from ferry.server.protocol import ResponseFormat

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# vLLM's structured_outputs knobs that tune its own backends: accepted, no effect here.
_IGNORED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties",
                    "whitespace_pattern", "disable_fallback", "backend")


class _StructuredFields(Protocol):
    structured_outputs: dict[str, Any] | None
    guided_json: dict[str, Any] | str | None
    guided_regex: str | None
    guided_choice: list[str] | None
    guided_grammar: str | None


def structured_outputs_of(req: _StructuredFields) -> StructuredOutputsParams | None:
    """The request's one constraint, or None; OpenAIError (400 naming the field) when the fields
    are malformed or more than one asks for a constraint."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    response_format: ResponseFormat | None = getattr(req, "response_format", None)
    if response_format is not None and response_format.type != "text":
        found.append(("response_format", _from_response_format(response_format)))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _from_vllm_object(req.structured_outputs)))
    guided = {"guided_json": ("json", req.guided_json), "guided_regex": ("regex", req.guided_regex),
              "guided_choice": ("choice", req.guided_choice),
              "guided_grammar": ("grammar", req.guided_grammar)}
    for name, (kind, value) in guided.items():
        if value is not None:
            found.append((name, _params(name, kind, value)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"Give at most one structured output constraint; got {names}.",
                          param=found[1][0])
    return found[0][1] if found else None


def _from_response_format(fmt: ResponseFormat) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, source="response_format")
    spec = fmt.json_schema
    if not isinstance(spec, dict):
        raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object.",
                          param="response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_request("response_format.json_schema.name must be a string.",
                          param="response_format.json_schema.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("response_format.json_schema.strict must be a boolean.",
                          param="response_format.json_schema.strict")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: no schema is any JSON object
        return StructuredOutputsParams(json_object=True, source="response_format.json_schema")
    return _params("response_format.json_schema.schema", "json", schema)


def _from_vllm_object(obj: dict[str, Any]) -> StructuredOutputsParams:
    if "structural_tag" in obj and obj["structural_tag"] is not None:
        raise bad_request("structured_outputs.structural_tag is not supported by this server.",
                          param="structured_outputs.structural_tag")
    unknown = [k for k in obj if k not in _KINDS and k not in _IGNORED_OPTIONS
               and k != "structural_tag"]
    if unknown:
        raise bad_request(f"structured_outputs has no field {unknown[0]!r}; it takes one of "
                          f"{', '.join(_KINDS)}.", param=f"structured_outputs.{unknown[0]}")
    given = [k for k in _KINDS if obj.get(k) not in (None, False)]
    if len(given) != 1:
        raise bad_request("structured_outputs must set exactly one of "
                          f"{', '.join(_KINDS)} (got {', '.join(given) or 'none'}).",
                          param="structured_outputs")
    kind = given[0]
    return _params(f"structured_outputs.{kind}", kind, obj[kind])


def _params(param: str, kind: str, value: Any) -> StructuredOutputsParams:
    """One constraint of ``kind`` from a request value, checked for shape (not compiled)."""
    if kind == "json":
        if not isinstance(value, (dict, str)) or isinstance(value, bool):
            raise bad_request(f"{param} must be a JSON schema (an object, or its JSON text).",
                              param=param)
        return StructuredOutputsParams(json=value, source=param)
    if kind == "json_object":
        if value is not True:
            raise bad_request(f"{param} must be true.", param=param)
        return StructuredOutputsParams(json_object=True, source=param)
    if kind == "choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) for c in value)):
            raise bad_request(f"{param} must be a non-empty list of strings.", param=param)
        return StructuredOutputsParams(choice=tuple(value), source=param)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string.", param=param)
    if kind == "regex":
        return StructuredOutputsParams(regex=value, source=param)
    return StructuredOutputsParams(grammar=value, source=param)
