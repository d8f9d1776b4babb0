"""Request, response and error shapes of the OpenAI-compatible API and of the A/B endpoints.

These models are the contract: FastAPI writes them into /openapi.json, so every rule that JSON Schema can
state (types, ranges, patterns, lengths) is a field constraint here, and the request models are strict (no
"0.5" for a number). What it cannot state, the field's description says and the app answers with a
documented 400: the last message must be the user's, and the prompt plus max_tokens must fit the model's
context. Unknown fields of a completion request are ignored, as OpenAI clients send options this server does
not use; the A/B endpoints forbid them.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CHOICES = 8  # `n`: replies per request
MAX_STOP_SEQUENCES = 4  # as OpenAI
ANNOTATOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # it becomes a file name in data/labels/
COMPARISON_ID_PATTERN = r"^web-[0-9a-f]{16}$"
JSON_SAFE_INTEGER = 2**53 - 1  # every JSON reader holds it exactly (torch takes 64-bit seeds)
LAST_IS_USER = "The conversation so far; the last message must have role 'user' (else 400)."

REQUEST = ConfigDict(strict=True, extra="ignore")
StopSequence = Annotated[str, Field(min_length=1)]


class Message(BaseModel):
    model_config = REQUEST

    role: Literal["system", "user", "assistant"]
    content: str


def _check_conversation(messages: list[Message]) -> list[Message]:
    if messages[-1].role != "user":
        raise ValueError("the last message must have role 'user'")
    return messages


class StreamOptions(BaseModel):
    model_config = REQUEST

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = REQUEST

    messages: list[Message] = Field(min_length=1, description=LAST_IS_USER)
    model: str | None = Field(None, description="A served model's id (GET /v1/models); default: the first one.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension (as vLLM): sample among the k best; 0 = off.")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0,
                                             description="Extension (as vLLM): CTRL-style penalty; 1 = off.")
    max_tokens: int | None = Field(None, ge=1, description="The prompt plus max_tokens must fit the model's "
                                                            "context (GET /v1/models: context_length), else 400.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    ignore_eos: bool = Field(False, description="Extension (as vLLM): generate max_tokens tokens, past the end of "
                                                "the turn (benchmarks of fixed-length replies).")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-JSON_SAFE_INTEGER, le=JSON_SAFE_INTEGER,
                             description="Choice i samples with seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    _last_is_user = field_validator("messages")(_check_conversation)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop


class ComparisonRequest(BaseModel):
    """Two blinded replies to the same conversation: from two models, or two samples of one."""

    model_config = ConfigDict(strict=True, extra="forbid")

    messages: list[Message] = Field(min_length=1, description=LAST_IS_USER)
    models: list[str] = Field(min_length=1, max_length=2)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)

    _last_is_user = field_validator("messages")(_check_conversation)


class ChoiceRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    choice: Literal["A", "B", "tie"]
    annotator: str = Field(pattern=ANNOTATOR_PATTERN, description="It names data/labels/<annotator>.jsonl.")


# ------------------------------------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ModelHealth(BaseModel):
    context_length: int
    max_batch: int
    active: int = Field(description="Rows decoding now.")
    queued: int = Field(description="Rows waiting for a place in the batch.")
    cancelled: int = Field(description="Rows stopped early: client gone, or a stop sequence reached.")


class Health(BaseModel):
    status: Literal["ok"]
    models: dict[str, ModelHealth]


class Comparison(BaseModel):
    id: str
    replies: dict[Literal["A", "B"], str]


class ChoiceResult(BaseModel):
    id: str
    choice: Literal["A", "B", "tie"]
    winner: str
    key: dict[Literal["A", "B"], str]
    written: list[str]
