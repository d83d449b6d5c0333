"""OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions).

Unknown fields are refused with a 400 naming them, except the few OpenAI clients
commonly send that have no effect on one local model (``ACCEPTED_IGNORED``).
Fields OpenAI defines that this worker does not implement (tools, n > 1,
logit_bias, echo, suffix, best_of > 1, audio/modalities) are refused by name
too; README "Use it with OpenAI clients" lists both sets.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .schemas import PROMPT_CEILING, U64_MAX
from .schemas import prompt_text as _text

# Sent by common clients (SDKs, LangChain, editors); no meaning for one local model, so accepted and ignored.
ACCEPTED_IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                    "safety_identifier")
MAX_STOPS = 4
MAX_STOP_CHARS = 256
I64_MIN = -(2**63)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # newer SDKs may send it; no effect here


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_ or {}}
        return out


class _Sampling(_Body):
    """Fields common to both endpoints. top_k/min_p/repetition_penalty are vLLM-style extensions."""

    model: str = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default 1 (OpenAI's)")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1 << 20)
    min_p: float | None = Field(default=None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=I64_MIN, le=U64_MAX, description="absent: a random seed per request")
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only 1")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0, description="only empty")
    # accepted and ignored (see ACCEPTED_IGNORED)
    user: str | None = Field(default=None, max_length=4096)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(default=None, max_length=64)
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=4096)
    safety_identifier: str | None = Field(default=None, max_length=4096)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        for s in items:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must be 1-{MAX_STOP_CHARS} characters")
            _text(s)
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=PROMPT_CEILING)

    _check = field_validator("text")(classmethod(lambda cls, v: _text(v)))


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts (no images/audio)")
    name: str | None = Field(default=None, max_length=256)

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        if isinstance(v, str):
            _text(v)
        elif len(v) > 1024:
            raise ValueError("at most 1024 content parts")
        return v

    def for_template(self) -> dict[str, Any]:
        """``developer`` is OpenAI's newer name for ``system``; parts are joined into one string."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tool_choice: Literal["none"] | None = Field(default=None, description="tools are not supported: only 'none'")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens; send one of them")
        return self

    @property
    def output_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="one prompt (a list of exactly one string is accepted)")
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] | None = None
    suffix: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if len(items) != 1:
            raise ValueError("exactly one prompt string (batches of prompts are not supported)")
        if not items[0] or len(items[0]) > PROMPT_CEILING:
            raise ValueError(f"must be 1-{PROMPT_CEILING} characters")
        _text(items[0])
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def output_limit(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"
