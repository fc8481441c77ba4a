"""The OpenAI-compatible request and response schemas, and their one mapping onto ``SamplingParams``.

Requests are parsed by pydantic in strict mode: an integer field takes JSON integers only (not
``true``, ``2.0`` or ``"2"``), a number field takes finite numbers only (no ``NaN``), strings are
strings, token ids are integers >= 0. Numeric ranges come from ``SamplingParams.RANGES`` — the
same table the Python API checks — so the HTTP schema and the engine cannot disagree. The
OpenAPI document (:mod:`pagedq.serve.openapi`) is generated from these models.

Unknown fields are ignored, as OpenAI and vLLM do; fields pagedq does not implement (``echo``,
``suffix``, tools, ``response_format``) are refused with a 400 that says so.
"""

# mypy: disable-error-code="valid-type,misc"
# (field types here are built by functions from the SamplingParams table, and the sampling
# fields are a model created at import time: both are beyond a static checker)
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WrapValidator,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from pagedq.options import wire_fields
from pagedq.sampling_params import FLAGS, LOGIT_BIAS, RANGES, SamplingParams

from .errors import bad_request

TokenId = Annotated[StrictInt, Field(ge=0)]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]


def _one_of(what: str):
    """A union whose failure reads as one rule ("must be a string or ...") instead of one error
    per branch."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("one_of", f"must be {what}") from None

    return WrapValidator(validate)


def _ranged(name: str, default: Any, description: str | None = None) -> Any:
    """The annotated type of a sampling field, from ``SamplingParams.RANGES``."""
    r = RANGES[name]
    base = StrictInt if r.kind is int else Finite
    typ: Any = Annotated[base, Field(ge=r.ge, gt=r.gt, le=r.le)]
    if r.optional:
        typ = typ | None
    return Annotated[typ, Field(default=default, description=description or r.describe())]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


_UNSUPPORTED = {
    "echo": "echo is not supported: send the prompt text yourself",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "response_format (JSON mode) is not supported",
}


def _sampling_fields() -> dict[str, Any]:
    """The request fields that are SamplingParams fields under their own names
    (:func:`pagedq.options.wire_fields`): type, range, default and description from there."""
    out: dict[str, Any] = {}
    wire = set(wire_fields())
    for f in dataclasses.fields(SamplingParams):
        if f.name not in wire:
            continue
        doc = f.metadata.get("help")
        if f.name in RANGES:
            out[f.name] = (
                _ranged(f.name, f.default, doc and f"{doc}; {RANGES[f.name].describe()}"),
                f.default,
            )
        elif f.name in FLAGS:
            out[f.name] = (StrictBool, Field(f.default, description=doc))
        elif f.name == "stop_token_ids":
            out[f.name] = (list[TokenId] | None, Field(None, description=doc))
        else:  # a new SamplingParams field must be given its HTTP form here
            raise TypeError(f"SamplingParams.{f.name} has no HTTP form in pagedq.serve.protocol")
    return out


_SamplingFields = create_model("_SamplingFields", __base__=_Strict, **_sampling_fields())


class GenerationRequest(_SamplingFields):
    """Fields shared by completions and chat completions."""

    model: StrictStr | None = Field(None, description="the served model id (GET /v1/models)")
    stop: Annotated[StrictStr | list[StrictStr] | None, _one_of("a string or a list of strings")] = Field(
        None, description="up to max_stop stop strings"
    )
    logit_bias: dict[StrictStr, Finite] | None = Field(
        None, description='token id (as a string) -> bias in [-100, 100], e.g. {"50256": -100}'
    )
    user: StrictStr | None = Field(None, description="who the request is for (a label for metrics)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # refused with a 400 saying so
    echo: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit() or not key.isascii():
                raise ValueError(f'keys must be token ids written as strings, like "50256", got {key!r}')
            LOGIT_BIAS.check(f"logit_bias[{key}]", value)
        return bias

    def refuse_unsupported(self) -> None:
        for name, why in _UNSUPPORTED.items():
            if getattr(self, name) not in (None, False, [], {}, ""):
                raise bad_request(why, name)

    def common_params(self) -> dict:
        kw = {name: getattr(self, name) for name in wire_fields()}
        kw["stop"] = self.stop
        if self.logit_bias:
            kw["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = Annotated[
    Annotated[StrictStr, Field(description="one prompt")]
    | Annotated[list[TokenId], Field(min_length=1, description="one prompt as token ids")]
    | Annotated[
        list[StrictStr | Annotated[list[TokenId], Field(min_length=1)]],
        Field(min_length=1, description="several prompts, each a string or token ids"),
    ],
    _one_of(
        "a string, a non-empty list of token ids (integers >= 0), or a non-empty list of prompts "
        "(each a string or a non-empty list of token ids)"
    ),
]


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: _ranged("max_tokens", 16, "tokens to generate at most (null: up to max_model_len)")
    logprobs: _ranged("logprobs", None, "return the top-k log-probabilities of each token (<= max_logprobs)")
    best_of: StrictInt | None = Field(None, description="must equal n when given")

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(cast(list, p))

    def sampling_params(self) -> SamplingParams:
        self.refuse_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(
                f"best_of must equal n (pagedq returns every sample), got {self.best_of}", "best_of"
            )
        return _sampling_params(self.common_params(), max_tokens=self.max_tokens, logprobs=self.logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: NonEmptyStr = Field(description="system, user, assistant, ... (the chat template decides)")
    content: Annotated[
        StrictStr | list[TextPart] | None,
        _one_of('a string, null or a list of text parts {"type": "text", "text": "..."}'),
    ] = None
    name: StrictStr | None = None

    def for_template(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: _ranged("max_tokens", None, "tokens to generate at most (null: up to max_model_len)")
    max_completion_tokens: _ranged("max_tokens", None, "OpenAI's newer name of max_tokens")
    logprobs: StrictBool = False
    top_logprobs: _ranged("logprobs", None, "with logprobs: true, the k most likely tokens (<= max_logprobs)")
    add_generation_prompt: StrictBool = True

    def sampling_params(self) -> SamplingParams:
        self.refuse_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return _sampling_params(
            self.common_params(),
            max_tokens=max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


def _sampling_params(kw: dict, **more) -> SamplingParams:
    try:
        return SamplingParams(**kw, **more)
    except ValueError as e:  # a rule across fields (min_tokens <= max_tokens, ...)
        raise bad_request(str(e)) from None


# --- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


FinishReason = Literal["stop", "length", "abort", "error"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason
    token_ids: list[int] = Field(description="the generated token ids (beside OpenAI's fields, as vLLM)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason
    token_ids: list[int]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "pagedq"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: str = Field(description="ready | starting | restarting | draining | stopped")
    model: str | None = None
    detail: str | None = Field(None, description="why the engine is not ready (its last error)")
    restarts: int = 0
