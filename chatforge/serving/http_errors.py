"""Errors as the API promises them: OpenAI's error object, declared in /openapi.json where they can happen.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`: ours, FastAPI's validation
errors (400, not its default 422, which is also taken out of the schema), unknown routes (404) and wrong
methods (405, with `Allow`). Bodies above the cap get 413 without being read to the end. `serving/contract.py`
takes FastAPI's 422 out of the schema.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatforge.serving.schemas import NOT_IMPLEMENTED, ErrorResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
ERROR_DESCRIPTIONS = {
    400: "Invalid JSON or fields, an OpenAI parameter this server does not implement (code "
         "`unsupported_parameter`, `param` names it), an unknown field (code `unknown_parameter`), or messages "
         "longer than the model's context (code `context_length_exceeded`).",
    401: "No API key, or a wrong one: send `Authorization: Bearer <key>` (`chatforge serve --api-key`).",
    404: "No such model (code `model_not_found`) or no such pending comparison.",
    409: "A or B preferred where a reply is empty (code `empty_reply`): such a pair is no training data, so nothing "
         "is written and the comparison stays pending (a tie can still be recorded).",
    413: "The request body is larger than the server accepts (`chatforge serve --max-body-bytes`).",
    429: "The model's queue is full (`chatforge serve --max-queue`); retry after `Retry-After` seconds.",
    503: "The model's engine process has exited (code `engine_unavailable`); restart `chatforge serve`.",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def documented(*statuses: int) -> dict:
    """`responses=` for a route that can answer `statuses`: the error object, and Retry-After with 429."""
    responses = {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}
    if 429 in responses:
        responses[429]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                                     "schema": {"type": "integer"}}}
    return responses


def describe_validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first problem FastAPI/pydantic found in a request."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", None, "invalid_json")
    path = [str(part) for part in first["loc"] if part not in ("body", "path")]
    if not path:
        return APIError(400, "the request body must be a JSON object", None, "invalid_body")
    if path[0] in NOT_IMPLEMENTED:
        why, accepted = NOT_IMPLEMENTED[path[0]]
        return APIError(400, f"Unsupported parameter: {path[0]!r}: {why}; leave it out (only {accepted} is "
                             "accepted)", path[0], "unsupported_parameter")
    param = ".".join(path)
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param!r}; /openapi.json lists the accepted "
                             "ones", param, "unknown_parameter")
    message = first["msg"].removeprefix("Value error, ")
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return APIError(400, f"{param}: {message}", param, code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request, error: RequestValidationError):
        return error_response(describe_validation_error(error))

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods (their Allow header kept), 413
    async def _http_error(_request, error: HTTPException):
        return error_response(APIError(error.status_code, str(error.detail), headers=error.headers))


class BodyLimit:
    """ASGI middleware: a body above `max_bytes` (by Content-Length, or as it streams in) is a 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        declared_too_large = declared.isdigit() and int(declared) > self.max_bytes
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            # raised inside the route's body read, so the error handlers answer it
            if declared_too_large or received > self.max_bytes:
                raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)
