"""/openapi.json as the server behaves: FastAPI's schema, corrected where it cannot know better by itself.

- FastAPI declares a 422 for every route with a body; this server answers validation errors with 400
  (OpenAI's convention), declared per route (`http_errors.documented`), so the 422 goes.
- Model names are only known at startup: they become the `examples` of the `model`/`models` fields, so
  clients and schema-driven testers can form requests that reach a model (unknown names are a 404).
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

MODEL_FIELDS = {("ChatCompletionRequest", "model"): lambda names: names,
                ("ComparisonRequest", "models"): lambda names: [names[:1], names[:2]]}


def served_openapi(app: FastAPI, model_names: list[str]):
    """A replacement for `app.openapi` (built once, then cached like FastAPI's own)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            components = schema["components"]["schemas"]
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for (component, field), examples in MODEL_FIELDS.items():
                components[component]["properties"][field]["examples"] = examples(model_names)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
