"""The request bodies in ``/openapi.json``, for ``ferry serve`` and ``ferry gateway`` alike (a leaf).

Both read a route's body themselves (the server through a dependency, the gateway in its ``parse``
stage), not as a FastAPI body parameter, so that a bad body is a 400 in OpenAI's shape, checked in
a fixed order with the rest. FastAPI therefore never sees the request models; this module declares
them: a route names its model with ``openapi_extra=request_body(Model)``, and
``publish_request_models`` adds the models' JSON schemas (and those of the models they nest) under
``components/schemas``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    ref = REF_TEMPLATE.format(model=model.__name__)
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": ref}}}}}


def request_schemas(models: Sequence[type[BaseModel]]) -> dict[str, Any]:
    """Schema name -> JSON schema for ``models`` and every model they nest."""
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template=REF_TEMPLATE)
    for model in models:
        # NOTE: pydantic names a schema after its class unless two classes share a name; the
        # routes' $refs assume the class name, so a clash must fail loudly, not dangle.
        if refs[(model, "validation")] != {"$ref": REF_TEMPLATE.format(model=model.__name__)}:
            raise RuntimeError(f"request model {model.__name__} has an ambiguous schema name")
    schemas: dict[str, Any] = top.get("$defs", {})
    return schemas


def publish_request_models(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Add ``models``' schemas to ``app``'s OpenAPI document (built once, when first asked for)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()  # NOTE: FastAPI caches it in app.openapi_schema
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in request_schemas(models).items():
                if name in components and components[name] != schema:
                    raise RuntimeError(f"two different schemas are named {name!r}")
                components[name] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
