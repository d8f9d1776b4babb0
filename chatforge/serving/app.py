"""The FastAPI app: OpenAI-compatible chat completions, the model list, health, the chat page and A/B feedback.

Errors always come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, including
FastAPI's own validation errors (400 instead of its default 422) and unknown routes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.console import console
from chatforge.errors import ChatforgeError
from chatforge.generation import SamplingParams
from chatforge.serving.feedback import Comparisons, UnknownComparison
from chatforge.serving.schemas import ChatCompletionRequest, ChoiceRequest, ComparisonRequest
from chatforge.serving.worker import ModelRegistry, ModelWorker, QueueFull

STATIC_DIR = Path(__file__).parent / "static"
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def describe_validation_error(error: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) for the first problem FastAPI/pydantic found in a request."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None, "invalid_json"
    path = [str(part) for part in first["loc"] if part != "body"]
    if not path:
        return "the request body must be a JSON object", None, "invalid_body"
    param = ".".join(path)
    message = first["msg"].removeprefix("Value error, ")
    return f"{param}: {message}", param, "missing_required_parameter" if first["type"] == "missing" else "invalid_value"


class StopMatcher:
    """Cuts text at the first stop sequence; while streaming, holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to emit now (never part of a stop sequence)."""
        self.buffer += piece
        hits = [index for stop in self.stops if (index := self.buffer.find(stop)) >= 0]
        if hits:
            self.stopped = True
            text, self.buffer = self.buffer[: min(hits)], ""
            return text
        keep = next(
            (size for size in range(min(len(self.buffer), max(map(len, self.stops), default=1) - 1), 0, -1)
             if any(stop.startswith(self.buffer[-size:]) for stop in self.stops)),
            0,
        )
        text, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return text

    def flush(self) -> str:
        text, self.buffer = self.buffer, ""
        return text


def plan_sampling(
    worker: ModelWorker, defaults: SamplingParams, messages: list[dict],
    temperature: float | None, top_p: float | None, max_tokens: int | None,
) -> tuple[SamplingParams, int]:
    """The request's sampling over the params.yaml defaults, checked against the context; and the prompt size."""
    context = worker.context_length
    prompt_tokens = worker.prompt_tokens(messages)
    room = context - prompt_tokens
    if room < 1:
        raise APIError(400, f"the messages take {prompt_tokens} tokens but this model's context is {context} tokens; "
                       "send a shorter conversation", "messages", "context_length_exceeded")
    if max_tokens is not None and max_tokens > context:
        raise APIError(400, f"max_tokens={max_tokens} is above this model's context of {context} tokens",
                       "max_tokens", "invalid_value")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"the messages ({prompt_tokens} tokens) plus max_tokens={max_tokens} exceed this model's "
                       f"context of {context} tokens; lower max_tokens or shorten the conversation",
                       "messages", "context_length_exceeded")
    sampling = replace(
        defaults,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        max_new_tokens=max_tokens if max_tokens is not None else min(defaults.max_new_tokens, room),
    )
    return sampling, prompt_tokens


def create_app(registry: ModelRegistry, defaults: SamplingParams, data_dir: str | Path = "data") -> FastAPI:
    comparisons = Comparisons(Path(data_dir))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        registry.close()

    app = FastAPI(title="chatforge", lifespan=lifespan)

    # ------------------------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, error: RequestValidationError):
        return error_response(400, *describe_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), None, None)

    @app.exception_handler(QueueFull)
    async def _queue_full(_request: Request, error: QueueFull):
        return error_response(503, str(error), None, "overloaded")

    @app.exception_handler(ChatforgeError)
    async def _chatforge_error(_request: Request, error: ChatforgeError):
        return error_response(400, str(error), None, "invalid_value")

    def find_worker(name: str | None) -> ModelWorker:
        worker = registry.get(name)
        if worker is None:
            raise APIError(404, f"the model {name!r} does not exist; served models: {', '.join(registry.workers)}",
                           "model", "model_not_found")
        return worker

    # -------------------------------------------------------------------------------- the API

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": {
                name: {"context_length": w.context_length, "queued": w.queued, "streams_cancelled": w.streams_cancelled}
                for name, w in registry.workers.items()
            },
        }

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "chatforge",
                 "context_length": worker.context_length}
                for name, worker in registry.workers.items()
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        worker = find_worker(body.model)
        messages = [message.model_dump() for message in body.messages]
        sampling, prompt_tokens = plan_sampling(
            worker, defaults, messages, body.temperature, body.top_p, body.requested_max_tokens
        )
        # with a seed, choice i uses seed + i: reproducible, yet the n choices differ
        seeds = [None if body.seed is None else body.seed + index for index in range(body.n)]
        completion = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": worker.name,
                      "system_fingerprint": None}
        if body.stream:
            worker.ensure_room()
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(worker, messages, sampling, body.stop, seeds, completion, prompt_tokens,
                                   include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices, completion_tokens = [], 0
        for index, seed in enumerate(seeds):
            reply = await worker.generate(messages, sampling, seed)
            matcher = StopMatcher(body.stop)
            text = matcher.push(reply.text) + matcher.flush()
            finish = "stop" if matcher.stopped or reply.ended else "length"
            completion_tokens += len(reply.token_ids)
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": finish})
        return {**completion, "object": "chat.completion", "choices": choices,
                "usage": usage(prompt_tokens * body.n, completion_tokens)}

    # ------------------------------------------------------------------------ page and A/B

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/api/comparisons")
    async def new_comparison(body: ComparisonRequest):
        """Two blinded replies: from two models, or two samples of one model. The key stays here."""
        workers = [find_worker(name) for name in body.models]
        workers = workers * 2 if len(workers) == 1 else workers
        messages = [message.model_dump() for message in body.messages]

        async def reply(worker: ModelWorker) -> tuple[str, str]:
            sampling, _ = plan_sampling(worker, defaults, messages, body.temperature, None, body.max_tokens)
            return worker.name, (await worker.generate(messages, sampling, None)).text

        replies = await asyncio.gather(*(reply(worker) for worker in workers))
        return comparisons.add(messages, list(replies))

    @app.post("/api/comparisons/{item_id}/choice")
    async def record_choice(item_id: str, body: ChoiceRequest):
        try:  # a thread: the file lock may wait on another writer
            return await asyncio.to_thread(comparisons.record, item_id, body.choice, body.annotator)
        except UnknownComparison:
            raise APIError(404, f"no pending comparison {item_id!r} (already judged, or the server restarted)",
                           "item_id", "comparison_not_found") from None

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(worker: ModelWorker, messages: list[dict], sampling: SamplingParams, stops: list[str],
                        seeds: list[int | None], completion: dict, prompt_tokens: int, include_usage: bool):
    """Server-sent events in OpenAI's `chat.completion.chunk` format, choice after choice, then `[DONE]`."""

    def event(choices: list[dict], final_usage: dict | None = None) -> str:
        chunk = {**completion, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            chunk["usage"] = final_usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(index: int, content: dict, finish: str | None = None) -> dict:
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}

    completion_tokens = 0
    try:
        for index, seed in enumerate(seeds):
            yield event([delta(index, {"role": "assistant", "content": ""})])
            matcher, generated = StopMatcher(stops), []
            async with contextlib.aclosing(worker.stream(messages, sampling, seed)) as pieces:
                async for piece in pieces:
                    generated.append(piece)
                    if text := matcher.push(piece):
                        yield event([delta(index, {"content": text})])
                    if matcher.stopped:
                        break
            if text := matcher.flush():
                yield event([delta(index, {"content": text})])
            tokens = worker.completion_tokens("".join(generated))
            completion_tokens += tokens
            finish = "stop" if matcher.stopped or tokens < sampling.max_new_tokens else "length"
            yield event([delta(index, {}, finish)])
        if include_usage:
            yield event([], usage(prompt_tokens * len(seeds), completion_tokens))
    except (QueueFull, ChatforgeError) as error:
        yield f"data: {json.dumps(error_body(503 if isinstance(error, QueueFull) else 400, str(error)))}\n\n"
    except Exception as error:  # headers are sent: the error can only travel as an event
        console.print_exception()
        yield f"data: {json.dumps(error_body(500, f'generation failed: {type(error).__name__}'))}\n\n"
    yield "data: [DONE]\n\n"
