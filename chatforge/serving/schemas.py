"""Request, response and error shapes of the OpenAI-compatible API and of the A/B endpoints.

These models are the contract: FastAPI writes them into /openapi.json, so every rule that JSON Schema can
state (types, ranges, patterns, lengths) is a field constraint here, and the request models are strict (no
"0.5" for a number) and closed (an unknown field is a 400 naming it, as OpenAI answers). OpenAI parameters this
server does not implement are declared with the one value that asks for nothing (`tools: []`, `logit_bias: {}`,
`frequency_penalty: 0`, ...): any other value is a 400 naming the parameter (`NOT_IMPLEMENTED` says why), so a
client that relies on one learns it at once instead of getting a reply that ignored it. What the schema cannot
state, the field's description says: the prompt must fit the model's context (it depends on tokens).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_CHOICES = 8  # `n`: replies per request
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI
ANNOTATOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # it becomes a file name in data/labels/
COMPARISON_ID_PATTERN = r"^web-[0-9a-f]{16}$"
NOT_BLANK = r"\S"  # a prompt with at least one character that is not whitespace
JSON_SAFE_INTEGER = 2**53 - 1  # every JSON reader holds it exactly (torch takes 64-bit seeds)
CONVERSATION = ("The conversation so far. When the last message is the assistant's, the reply continues it "
                "(assistant prefill, as vLLM's continue_final_message) and holds only the continuation; otherwise "
                "it is a new assistant turn. The rendered conversation must fit the model's context "
                "(GET /v1/models: context_length), else 400 `context_length_exceeded`.")
MAX_TOKENS = ("The most tokens the reply may have; it also ends at the end of the model's context "
              "(finish_reason `length`). Default: params.yaml `generate.max_new_tokens`, within the context.")

# OpenAI parameter → (why this server does not implement it, the value it accepts: the one that asks for nothing)
NOT_IMPLEMENTED = {
    "frequency_penalty": ("no frequency penalty; `repetition_penalty` (as vLLM) is this server's", "0"),
    "presence_penalty": ("no presence penalty; `repetition_penalty` (as vLLM) is this server's", "0"),
    "logit_bias": ("no logit bias", "{}"),
    "tools": ("this server does not call tools", "[]"),
    "tool_choice": ("this server does not call tools", '"none"'),
    "parallel_tool_calls": ("this server does not call tools", "null"),
    "functions": ("this server does not call functions", "[]"),
    "function_call": ("this server does not call functions", '"none"'),
    "response_format": ("no constrained decoding: replies are free text (docs/serving.md says why)",
                        '{"type": "text"}'),
    "audio": ("replies are text only", "null"),
    "modalities": ("replies are text only", '["text"]'),
    "prediction": ("no predicted outputs", "null"),
    "reasoning_effort": ("these models have no reasoning mode", "null"),
    "verbosity": ("no verbosity control", "null"),
    "web_search_options": ("no web search", "null"),
    "store": ("completions are not stored", "false"),
    "metadata": ("completions are not stored, so there is nothing to tag", "{}"),
    "service_tier": ("there is one service tier", '"auto" or "default"'),
}


def not_implemented(name: str, **constraints):
    """The field of an OpenAI parameter this server does not implement, accepting only its neutral value."""
    why, accepted = NOT_IMPLEMENTED[name]
    return Field(None, description=f"Not implemented: {why}. Accepted only as {accepted} (or absent); any other "
                                   "value is a 400 naming it.", **constraints)


def _whole_number(value):
    """JSON Schema's integers include 7.0; strict pydantic takes only 7. (A string or a bool stays refused.)"""
    return int(value) if isinstance(value, float) and value.is_integer() else value


REQUEST = ConfigDict(strict=True, extra="forbid")
TOP_LOGPROBS_NEED_LOGPROBS = {  # OpenAI's rule, stated in the schema too
    "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}
StopSequence = Annotated[str, Field(min_length=1)]


class Message(BaseModel):
    model_config = REQUEST

    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = REQUEST

    include_usage: bool = False


class TextFormat(BaseModel):
    model_config = REQUEST

    type: Literal["text"]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(**REQUEST, json_schema_extra=TOP_LOGPROBS_NEED_LOGPROBS)

    messages: list[Message] = Field(min_length=1, description=CONVERSATION)
    model: str | None = Field(None, description="A served model's id (GET /v1/models); default: the first one.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension (as vLLM): sample among the k best; 0 = off.")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0,
                                             description="Extension (as vLLM): CTRL-style penalty; 1 = off.")
    max_tokens: int | None = Field(None, ge=1, description=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    ignore_eos: bool = Field(False, description="Extension (as vLLM): generate max_tokens tokens, past the end of "
                                                "the turn (benchmarks of fixed-length replies).")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-JSON_SAFE_INTEGER, le=JSON_SAFE_INTEGER,
                             description="Choice i samples with seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description=(
        "Each reply token's log-probability under the model: the log-softmax of its raw logits, before the "
        "repetition penalty, temperature, top-k and top-p (as vLLM's default raw_logprobs)."))
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "The most likely tokens at each position, with their log-probabilities; above 0 it needs "
        "`logprobs: true`."))
    user: str | None = Field(None, description="Accepted for OpenAI clients; it changes no reply.")
    safety_identifier: str | None = Field(None, description="Accepted for OpenAI clients; it changes no reply.")
    prompt_cache_key: str | None = Field(None, description="Accepted for OpenAI clients; it changes no reply.")
    frequency_penalty: float | None = not_implemented("frequency_penalty", ge=0, le=0)
    presence_penalty: float | None = not_implemented("presence_penalty", ge=0, le=0)
    logit_bias: dict[str, float] | None = not_implemented("logit_bias", max_length=0)
    tools: list[dict] | None = not_implemented("tools", max_length=0)
    tool_choice: Literal["none"] | None = not_implemented("tool_choice")
    parallel_tool_calls: None = not_implemented("parallel_tool_calls")
    functions: list[dict] | None = not_implemented("functions", max_length=0)
    function_call: Literal["none"] | None = not_implemented("function_call")
    response_format: TextFormat | None = not_implemented("response_format")
    audio: None = not_implemented("audio")
    modalities: list[Literal["text"]] | None = not_implemented("modalities")
    prediction: None = not_implemented("prediction")
    reasoning_effort: None = not_implemented("reasoning_effort")
    verbosity: None = not_implemented("verbosity")
    web_search_options: None = not_implemented("web_search_options")
    store: Literal[False] | None = not_implemented("store")
    metadata: dict[str, str] | None = not_implemented("metadata", max_length=0)
    service_tier: Literal["auto", "default"] | None = not_implemented("service_tier")

    _whole_numbers = field_validator("top_k", "max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs",
                                     mode="before")(_whole_number)

    @field_validator("store", mode="before")
    @classmethod
    def _store_is_a_boolean(cls, value):
        if value is not None and not isinstance(value, bool):  # Literal[False] alone takes 0, which equals False
            raise ValueError("Input should be false")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def logprobs_top(self) -> int | None:
        """None: no logprobs; else how many alternatives each token's entry lists."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ComparisonRequest(BaseModel):
    """Two blinded replies of two different models to the same new user message."""

    model_config = REQUEST

    messages: list[Message] = Field([], description="The conversation before `prompt` (may be empty).")
    prompt: str = Field(pattern=NOT_BLANK, description="The user's new message, which both replies answer.")
    models: list[str] = Field(min_length=2, max_length=2, json_schema_extra={"uniqueItems": True},
                              description="Two different served models (a model is not compared with itself).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, description=MAX_TOKENS)

    _whole_numbers = field_validator("max_tokens", mode="before")(_whole_number)

    @field_validator("models")
    @classmethod
    def _two_models(cls, models: list[str]) -> list[str]:
        if models[0] == models[1]:
            raise ValueError("name two different models: a model compared with itself tells nothing about models")
        return models

    @property
    def conversation(self) -> list[dict]:
        return [message.model_dump() for message in self.messages] + [{"role": "user", "content": self.prompt}]


class ChoiceRequest(BaseModel):
    model_config = REQUEST

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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's UTF-8 bytes (a token may hold part of a character).")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(description="One entry per reply token (the end of turn is not content).")


class Choice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: ChoiceLogprobs | None = Field(description="With `logprobs: true`; else null.")
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
    collect_feedback: bool = Field(description="Whether the A/B routes that write ratings and labels are on "
                                               "(`chatforge serve --collect-feedback`).")


class Comparison(BaseModel):
    id: str
    replies: dict[Literal["A", "B"], str]


class ChoiceResult(BaseModel):
    id: str
    choice: Literal["A", "B", "tie"]
    winner: str
    key: dict[Literal["A", "B"], str]
    written: list[str]
