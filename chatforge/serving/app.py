"""The FastAPI app: OpenAI-compatible chat completions, the model list, health, the chat page and A/B feedback.

Each model decodes its requests together (continuous batching, `serving/engine.py`); this module turns requests
into rows and rows back into OpenAI's responses. The schemas in `serving/schemas.py` and the errors in
`serving/http_errors.py` make /openapi.json state what the server does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from chatforge.console import console
from chatforge.generation import SamplingParams
from chatforge.serving.completions import Completion
from chatforge.serving.engine import QueueFull
from chatforge.serving.engine_process import EngineGone
from chatforge.serving.feedback import Comparisons, UnknownComparison
from chatforge.serving.contract import served_openapi
from chatforge.serving.http_errors import APIError, BodyLimit, documented, error_body, install_error_handlers
from chatforge.serving.schemas import (COMPARISON_ID_PATTERN, ChatCompletion, ChatCompletionRequest, ChoiceRequest,
                                       ChoiceResult, Comparison, ComparisonRequest, Health, ModelList)
from chatforge.serving.worker import ModelRegistry, ModelWorker

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
CLIENT_GONE = 499  # nginx's "client closed request": logged only, nobody is there to read it
STREAM_DOC = {"text/event-stream": {"schema": {  # one server-sent event
    "type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {
        "type": "string", "description": "A `chat.completion.chunk` (JSON), an error object (JSON) if generation "
                                         "failed after the events began, or `[DONE]`, the last event."}}},
    "description": "With `stream: true`: server-sent events, choices interleaved."}}


def plan_sampling(worker: ModelWorker, defaults: SamplingParams, prompt_tokens: int, max_tokens: int | None,
                  **overrides) -> SamplingParams:
    """The request's sampling over the params.yaml defaults (`overrides` that are not None), checked against
    the model's context."""
    context = worker.context_length
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
    chosen = {name: value for name, value in overrides.items() if value is not None}
    max_new_tokens = max_tokens if max_tokens is not None else min(defaults.max_new_tokens, room)
    return replace(defaults, **chosen, max_new_tokens=max_new_tokens)


def queued(worker: ModelWorker, prompt: list[int], sampling: SamplingParams, seeds: list[int | None],
           stops: list[str], ignore_eos: bool = False) -> Completion:
    try:
        return Completion(worker.engine, worker.tokenizer, prompt, sampling, seeds, stops, ignore_eos)
    except QueueFull as error:
        raise APIError(429, f"model {worker.name!r}: {error}", None, "overloaded",
                       {"Retry-After": str(error.retry_after_s)}) from None
    except EngineGone as error:
        raise APIError(503, f"model {worker.name!r}: {error}; restart the server", None,
                       "engine_unavailable") from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (its body was read already, so only the disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collected(completions: list[Completion], request: Request) -> list[list[dict]] | None:
    """Each completion's choices as {text, finish, tokens}; None if the client left first (rows cancelled)."""

    async def collect(completion: Completion) -> list[dict]:
        choices = [{"text": "", "finish": None, "tokens": 0} for _ in completion.choices]
        async for piece in completion.pieces():
            choice = choices[piece.index]
            choice["text"] += piece.text
            choice["finish"], choice["tokens"] = piece.finish, piece.tokens
        return choices

    work = asyncio.ensure_future(asyncio.gather(*(collect(completion) for completion in completions)))
    gone = asyncio.ensure_future(until_disconnected(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()
        for completion in completions:
            completion.cancel()
        return None
    return work.result()


def create_app(registry: ModelRegistry, defaults: SamplingParams, data_dir: str | Path = "data",
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    comparisons = Comparisons(Path(data_dir))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        registry.close()

    app = FastAPI(title="chatforge", lifespan=lifespan, description=__doc__.split("\n\n")[0])
    app.openapi = served_openapi(app, list(registry.workers))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    install_error_handlers(app)

    def find_worker(name: str | None) -> ModelWorker:
        worker = registry.get(name)
        if worker is None:
            raise APIError(404, f"the model {name!r} does not exist; served models: {', '.join(registry.workers)}",
                           "model", "model_not_found")
        return worker

    # -------------------------------------------------------------------------------- the API

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "models": {name: worker.health() for name, worker in registry.workers.items()}}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "chatforge",
             "context_length": worker.context_length}
            for name, worker in registry.workers.items()
        ]}

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": STREAM_DOC}, **documented(400, 404, 413, 429, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        worker = find_worker(body.model)
        prompt = worker.prompt_ids([message.model_dump() for message in body.messages])
        sampling = plan_sampling(worker, defaults, len(prompt), body.requested_max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                 repetition_penalty=body.repetition_penalty)
        # with a seed, choice i uses seed + i: reproducible, yet the n choices differ
        seeds = [None if body.seed is None else body.seed + index for index in range(body.n)]
        completion = queued(worker, prompt, sampling, seeds, body.stops, body.ignore_eos)
        header = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": worker.name,
                  "system_fingerprint": None}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(completion, header, len(prompt), include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await collected([completion], request)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        choices = [{"index": index, "message": {"role": "assistant", "content": choice["text"]}, "logprobs": None,
                    "finish_reason": choice["finish"]} for index, choice in enumerate(results[0])]
        return {**header, "object": "chat.completion", "choices": choices,
                "usage": usage(len(prompt) * body.n, sum(choice["tokens"] for choice in results[0]))}

    # ------------------------------------------------------------------------ page and A/B

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    choice_link = {"RecordChoice": {"operationId": "record_choice", "parameters": {"item_id": "$response.body#/id"}}}

    @app.post("/api/comparisons", response_model=Comparison,
              responses={200: {"links": choice_link}, **documented(400, 404, 413, 429, 503)})
    async def new_comparison(body: ComparisonRequest, request: Request):
        """Two blinded replies: from two models, or two samples of one model. The key stays here."""
        workers = [find_worker(name) for name in body.models]
        workers = workers * 2 if len(workers) == 1 else workers
        messages = [message.model_dump() for message in body.messages]
        completions: list[Completion] = []
        try:
            for worker in workers:
                prompt = worker.prompt_ids(messages)
                sampling = plan_sampling(worker, defaults, len(prompt), body.max_tokens, temperature=body.temperature)
                completions.append(queued(worker, prompt, sampling, [None], []))
        except APIError:
            for completion in completions:
                completion.cancel()
            raise
        results = await collected(completions, request)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        return comparisons.add(messages, [(worker.name, result[0]["text"]) for worker, result in zip(workers, results)])

    @app.post("/api/comparisons/{item_id}/choice", response_model=ChoiceResult, responses=documented(400, 404, 413),
              operation_id="record_choice")
    async def record_choice(body: ChoiceRequest, item_id: str = PathParam(pattern=COMPARISON_ID_PATTERN)):
        try:  # a thread: the file lock may wait on another writer
            return await asyncio.to_thread(comparisons.record, item_id, body.choice, body.annotator)
        except UnknownComparison:
            raise APIError(404, f"no pending comparison {item_id!r} (already judged, or the server restarted)",
                           "item_id", "comparison_not_found") from None

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(completion: Completion, header: dict, prompt_tokens: int, include_usage: bool):
    """Server-sent events in OpenAI's `chat.completion.chunk` format, choices interleaved, then `[DONE]`."""

    def event(choices: list[dict], final_usage: dict | None = None) -> str:
        chunk = {**header, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            chunk["usage"] = final_usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(index: int, content: dict, finish: str | None = None) -> dict:
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}

    completion_tokens = 0
    try:
        for index in range(len(completion.choices)):
            yield event([delta(index, {"role": "assistant", "content": ""})])
        async with contextlib.aclosing(completion.pieces()) as pieces:
            async for piece in pieces:
                if piece.text:
                    yield event([delta(piece.index, {"content": piece.text})])
                if piece.finish:
                    completion_tokens += piece.tokens
                    yield event([delta(piece.index, {}, piece.finish)])
        if include_usage:
            yield event([], usage(prompt_tokens * len(completion.choices), completion_tokens))
    except Exception as error:  # headers are sent: the error can only travel as an event
        console.print_exception()
        yield f"data: {json.dumps(error_body(500, f'generation failed: {type(error).__name__}'))}\n\n"
    finally:
        completion.cancel()  # the client may have gone: its rows leave the batch
    yield "data: [DONE]\n\n"
