"""The FastAPI app: OpenAI-compatible chat completions, the model list, health, the chat page and A/B feedback.

Each model decodes its requests together (continuous batching, `serving/engine.py`); this module turns requests
into rows and rows back into OpenAI's responses. The schemas in `serving/schemas.py` and the errors in
`serving/http_errors.py` make /openapi.json state what the server does. With an API key every route needs it
(`serving/auth.py`); the A/B routes, which write ratings and labels, exist only when the server collects feedback.
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
from jinja2 import TemplateError

from chatforge.console import console
from chatforge.inference.sampling import SamplingParams
from chatforge.serving.auth import RequireKey
from chatforge.serving.completions import Completion
from chatforge.serving.engine import QueueFull
from chatforge.serving.engine_process import EngineGone
from chatforge.serving.feedback import Comparisons, EmptyReply, UnknownComparison
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


def check_max_tokens(limit: int, **fields: int | None) -> None:
    """The schema's `maximum` of the max_tokens fields: the server's limit (`--max-tokens`, else the longest
    served context), known only at startup."""
    for name, value in fields.items():
        if value is not None and value > limit:
            raise APIError(400, f"{name}={value} is above this server's limit of {limit} tokens (/openapi.json states "
                           "it)", name, "invalid_value")


def plan_sampling(worker: ModelWorker, defaults: SamplingParams, prompt_tokens: int, max_tokens: int | None,
                  **overrides) -> SamplingParams:
    """The request's sampling over the params.yaml defaults (`overrides` that are not None). max_tokens is an upper
    bound: a reply also ends where the model's context does, so only a prompt that fills the context is refused."""
    context = worker.context_length
    room = context - prompt_tokens
    if room < 1:
        raise APIError(400, f"the messages take {prompt_tokens} tokens but this model's context is {context} tokens; "
                       "send a shorter conversation", "messages", "context_length_exceeded")
    chosen = {name: value for name, value in overrides.items() if value is not None}
    wanted = max_tokens if max_tokens is not None else defaults.max_new_tokens
    return replace(defaults, **chosen, max_new_tokens=min(wanted, room))


def queued(worker: ModelWorker, prompt: list[int], sampling: SamplingParams, seeds: list[int | None],
           stops: list[str], ignore_eos: bool = False, logprobs: int | None = None) -> Completion:
    try:
        return Completion(worker.engine, worker.tokenizer, worker.token_bytes, prompt, sampling, seeds, stops,
                          ignore_eos, logprobs)
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
    """Each completion's choices as {text, finish, tokens, logprobs (entries, or None)}; None if the client left
    first (rows cancelled)."""

    async def collect(completion: Completion) -> list[dict]:
        choices = [{"text": "", "finish": None, "tokens": 0, "logprobs": None} for _ in completion.choices]
        async for piece in completion.pieces():
            choice = choices[piece.index]
            choice["text"] += piece.text
            choice["finish"], choice["tokens"] = piece.finish, piece.tokens
            if piece.logprobs is not None:
                choice["logprobs"] = (choice["logprobs"] or []) + piece.logprobs
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
               max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None, collect_feedback: bool = False,
               max_tokens: int | None = None) -> FastAPI:
    """`api_key`: required on every route (None: open). `collect_feedback`: serve the A/B routes, which write
    ratings and labels under `data_dir`. `max_tokens`: the largest max_tokens a request may ask for (None: the
    longest context of the served models)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        registry.close()

    max_tokens_limit = max_tokens or max(worker.context_length for worker in registry.workers.values())
    app = FastAPI(title="chatforge", lifespan=lifespan, description=__doc__.split("\n\n")[0])
    app.openapi = served_openapi(app, list(registry.workers), max_tokens_limit, with_key=api_key is not None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)  # added last, runs first: no body is read without the key
    install_error_handlers(app)

    def find_worker(name: str | None) -> ModelWorker:
        worker = registry.get(name)
        if worker is None:
            raise APIError(404, f"the model {name!r} does not exist; served models: {', '.join(registry.workers)}",
                           "model", "model_not_found")
        return worker

    # -------------------------------------------------------------------------------- the API

    def prompt_of(worker: ModelWorker, messages: list[dict]) -> list[int]:
        try:
            return worker.prompt_ids(messages)
        except (ValueError, TemplateError) as error:  # a template that refuses the conversation (raise_exception)
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise APIError(400, f"model {worker.name!r}'s chat template cannot render these messages ({first_line})",
                           "messages", "invalid_value") from None

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "models": {name: worker.health() for name, worker in registry.workers.items()},
                "collect_feedback": collect_feedback}

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
        check_max_tokens(max_tokens_limit, max_tokens=body.max_tokens, max_completion_tokens=body.max_completion_tokens)
        worker = find_worker(body.model)
        prompt = prompt_of(worker, [message.model_dump() for message in body.messages])
        sampling = plan_sampling(worker, defaults, len(prompt), body.requested_max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty)
        # with a seed, choice i uses seed + i: reproducible, yet the n choices differ
        seeds = [None if body.seed is None else body.seed + index for index in range(body.n)]
        completion = queued(worker, prompt, sampling, seeds, body.stops, body.ignore_eos, body.logprobs_top)
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
        choices = [{"index": index, "message": {"role": "assistant", "content": choice["text"]},
                    "logprobs": None if choice["logprobs"] is None else {"content": choice["logprobs"]},
                    "finish_reason": choice["finish"]} for index, choice in enumerate(results[0])]
        return {**header, "object": "chat.completion", "choices": choices,
                "usage": usage(len(prompt) * body.n, sum(choice["tokens"] for choice in results[0]))}

    # ------------------------------------------------------------------------ page and A/B

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if not collect_feedback:
        return app
    comparisons = Comparisons(Path(data_dir))  # the A/B routes: two blinded replies, then the choice is written
    choice_link = {"RecordChoice": {"operationId": "record_choice", "parameters": {"item_id": "$response.body#/id"}}}

    @app.post("/api/comparisons", response_model=Comparison,
              responses={200: {"links": choice_link}, **documented(400, 404, 413, 429, 503)})
    async def new_comparison(body: ComparisonRequest, request: Request):
        """Two blinded replies of two different models to the same new user message. The key stays here."""
        check_max_tokens(max_tokens_limit, max_tokens=body.max_tokens)
        workers = [find_worker(name) for name in body.models]
        messages = body.conversation
        completions: list[Completion] = []
        try:
            for worker in workers:
                prompt = prompt_of(worker, messages)
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

    @app.post("/api/comparisons/{item_id}/choice", response_model=ChoiceResult,
              responses=documented(400, 404, 409, 413),
              operation_id="record_choice")
    async def record_choice(body: ChoiceRequest, item_id: str = PathParam(pattern=COMPARISON_ID_PATTERN)):
        try:  # a thread: the file lock may wait on another writer
            return await asyncio.to_thread(comparisons.record, item_id, body.choice, body.annotator)
        except UnknownComparison:
            raise APIError(404, f"no pending comparison {item_id!r} (already judged, or the server restarted)",
                           "item_id", "comparison_not_found") from None
        except EmptyReply as error:  # the request is well formed: the comparison's state refuses it
            raise APIError(409, f"reply {error.side} is empty, and a preference with an empty reply is no training "
                                "data; choose tie (the rating is still recorded) or ask again", "choice",
                           "empty_reply") from None

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

    def delta(index: int, content: dict, finish: str | None = None, logprobs: list[dict] | None = None) -> dict:
        return {"index": index, "delta": content, "logprobs": {"content": logprobs} if logprobs else None,
                "finish_reason": finish}

    completion_tokens = 0
    try:
        for index in range(len(completion.choices)):
            yield event([delta(index, {"role": "assistant", "content": ""})])
        async with contextlib.aclosing(completion.pieces()) as pieces:
            async for piece in pieces:
                if piece.text or piece.logprobs:  # a token's logprobs come with it, even before its text can
                    yield event([delta(piece.index, {"content": piece.text}, logprobs=piece.logprobs)])
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
