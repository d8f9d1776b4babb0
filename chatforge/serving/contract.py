"""/openapi.json as the server behaves: FastAPI's schema, corrected where it cannot know better by itself.

- FastAPI declares a 422 for every route with a body; this server answers validation errors with 400
  (OpenAI's convention), declared per route (`http_errors.documented`), so the 422 goes.
- Model names are only known at startup: they become the `examples` of the `model`/`models` fields, so
  clients and schema-driven testers can form requests that reach a model (unknown names are a 404).
- So is the largest `max_tokens` a request may ask for (`--max-tokens`, else the longest served context): it
  becomes the fields' `maximum`.
- With an API key, every operation requires the bearer scheme and declares its 401.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from chatforge.serving.http_errors import ERROR_DESCRIPTIONS

MODEL_FIELDS = {("ChatCompletionRequest", "model"): lambda names: names,
                ("ComparisonRequest", "models"): lambda names: [names[:2]]}
MAX_TOKENS_FIELDS = [("ChatCompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_completion_tokens"),
                     ("ComparisonRequest", "max_tokens")]
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}


def served_openapi(app: FastAPI, model_names: list[str], max_tokens_limit: int, with_key: bool):
    """A replacement for `app.openapi` (built once, then cached like FastAPI's own)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if with_key:
                        operation["responses"]["401"] = {"description": ERROR_DESCRIPTIONS[401],
                                                         "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            components = schema["components"]["schemas"]
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for (component, field), examples in MODEL_FIELDS.items():
                if component in components:  # the A/B routes exist only when the server collects feedback
                    components[component]["properties"][field]["examples"] = examples(model_names)
            for component, field in MAX_TOKENS_FIELDS:
                if component in components:
                    number = next(shape for shape in components[component]["properties"][field]["anyOf"]
                                  if shape.get("type") == "integer")
                    number["maximum"] = max_tokens_limit
            if with_key:
                schema["components"]["securitySchemes"] = {"apiKey": {
                    "type": "http", "scheme": "bearer",
                    "description": "`chatforge serve --api-key` (or CHATFORGE_API_KEY); the chat page may send it "
                                   "as an HTTP Basic password."}}
                schema["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
