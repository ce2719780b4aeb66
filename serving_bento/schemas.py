"""Request bodies of the chat endpoints, validated strictly, and the limits that apply to them.

Every way a body can be wrong ends as :class:`RequestError` (a 4xx with one message naming the
field), never as an exception escaping into the server: the corpus in
``tests/serving_bento/test_malformed.py`` holds that line. Types are strict (``"0.5"`` is not a
temperature); unknown *generation* keys are refused rather than silently ignored, while unknown
top-level keys of the OpenAI bodies are ignored because official clients send fields we do not
use (``n=1``, ``presence_penalty=0``, ...).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RequestError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Strict = ConfigDict(strict=True, extra="forbid")
Lenient = ConfigDict(strict=True, extra="ignore")
NonEmpty = Annotated[str, Field(min_length=1)]


class TextPart(BaseModel):
    model_config = Lenient
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = Lenient
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class GenerateKwargs(BaseModel):
    """Kaito's ``generate_kwargs`` (the transformers ``generate`` arguments it passes through)."""

    model_config = Strict
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=1)
    do_sample: bool = True
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=10, ge=0)
    seed: int | None = None
    # accepted for compatibility with Kaito clients; only these values are possible here
    num_beams: Literal[1] = 1
    min_length: Literal[0] = 0
    early_stopping: bool = False
    typical_p: Literal[1, 1.0] = 1
    repetition_penalty: Literal[1, 1.0] = 1
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


class KaitoChatRequest(BaseModel):
    """``POST /chat`` as Kaito's inference API takes it: a prompt or a list of messages."""

    model_config = Strict
    prompt: NonEmpty | None = None
    messages: list[Message] | None = None
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    generate_kwargs: GenerateKwargs = Field(default_factory=GenerateKwargs)


class StreamOptions(BaseModel):
    model_config = Lenient
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    model_config = Lenient
    model: NonEmpty
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops


class ChatCompletionRequest(_OpenAIBase):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_OpenAIBase):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode JSON and validate it; every failure becomes a RequestError naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise RequestError(400, f"{where}: {first['msg']}{more}", param=where) from None
