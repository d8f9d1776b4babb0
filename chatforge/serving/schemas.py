"""Request and response shapes of the OpenAI-compatible API and of the A/B endpoints.

Requests are validated here (types and ranges); checks that need the model (context length) live in
the app. Unknown fields are ignored, as OpenAI clients send options this server does not use.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

MAX_CHOICES = 8       # `n`: replies per request
MAX_STOP_SEQUENCES = 4  # as OpenAI
ANNOTATOR_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # it becomes a file name in data/labels/


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


def _check_conversation(messages: list[Message]) -> list[Message]:
    if messages[-1].role != "user":
        raise ValueError("the last message must have role 'user'")
    return messages


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    model: StrictStr | None = None  # None: the first served model
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    stop: list[str] = Field(None, validate_default=True)  # a string or a list; [] when absent
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    _last_is_user = field_validator("messages")(_check_conversation)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, stop):
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stops

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ComparisonRequest(BaseModel):
    """Two blinded replies to the same conversation: from two models, or two samples of one."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)
    models: list[StrictStr] = Field(min_length=1, max_length=2)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)

    _last_is_user = field_validator("messages")(_check_conversation)


class ChoiceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    choice: Literal["A", "B", "tie"]
    annotator: StrictStr

    @field_validator("annotator")
    @classmethod
    def _check_annotator(cls, annotator: str) -> str:
        if not ANNOTATOR_PATTERN.match(annotator):
            raise ValueError("annotator: 1-64 letters, digits, '_', '.', '-' (it names data/labels/<annotator>.jsonl)")
        return annotator
