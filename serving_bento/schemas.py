"""Request bodies of the chat endpoints, validated strictly, and the limits that apply to them.

Every way a body can be wrong ends as :class:`RequestError` (a 4xx with one message naming the
field), never as an exception escaping into the server: the corpus in
``tests/serving_bento/test_malformed.py`` holds that line (including JSON that Python's parser
refuses with other errors than ``JSONDecodeError``: integers over 4300 digits, deep nesting).
Types are strict (``"0.5"`` is not a temperature, ``NaN`` is not a number). Unknown keys are
refused, never silently ignored: an OpenAI parameter this service does not implement
(``tools``, ``response_format``, ``audio``, ...) is a 400 naming it, so a client never gets an
answer that silently lacks what it asked for. Parameters that change nothing at their neutral
value (``presence_penalty: 0``, ``logit_bias: {}``, ``user``) are accepted.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RequestError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = ("authentication_error" if self.status == 401 else "server_error" if self.status >= 500
                else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Strict = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
Lenient = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
NonEmpty = Annotated[str, Field(min_length=1)]

# torch.Generator.manual_seed takes exactly this range; anything else raised inside the engine
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]

MAX_STOP_STRINGS = 4  # OpenAI's own limit
MAX_STOP_CHARS = 128  # a stop string is held back from the stream while it may still match

# OpenAI parameters that change the answer and that this service does not implement: refused by
# name (a 400), because ignoring them would return something else than what the client asked for
UNSUPPORTED_OPENAI = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "structured output (JSON mode, JSON schema) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported",
    "reasoning_effort": "reasoning effort is not supported",
}
# values of those parameters that ask for nothing beyond what this service does
NEUTRAL_OPENAI: dict[str, list[Any]] = {"modalities": [["text"]], "best_of": [1]}


class TextPart(BaseModel):
    model_config = Lenient
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_turns_only(cls, data: Any) -> Any:
        # tool-call turns (an assistant's tool_calls with null content, a tool's answer) get a clear
        # answer instead of "content: input should be a string"
        if isinstance(data, dict) and (data.get("tool_calls") or data.get("function_call") is not None
                                       or data.get("role") in ("tool", "function") or "tool_call_id" in data):
            raise ValueError("tool and function call messages are not supported: this service has no tool "
                             "calling; send text turns (system, developer, user, assistant with content) only")
        if isinstance(data, dict):
            # a reply sent back as it came (the openai client's message.model_dump()) carries
            # refusal/annotations/audio/tool_calls as null: nothing is asked of us by those
            data = {k: v for k, v in data.items() if v is not None or k == "content"}
            if data.get("tool_calls") == []:
                del data["tool_calls"]
        return data

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
    seed: Seed | None = None
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
    adapter: NonEmpty | None = Field(default=None, description="an adapter name or the base model's id "
                                     "(KAIFLOW_ADAPTER_MODE=per-request); default: the base model")
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    generate_kwargs: GenerateKwargs = Field(default_factory=GenerateKwargs)


class StreamOptions(BaseModel):
    model_config = Lenient
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    model_config = Strict
    model: NonEmpty
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    # neutral values only: they change nothing, so clients that always send them keep working
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None
    user: str | None = None
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in UNSUPPORTED_OPENAI.items():
                if data.get(name) not in (None, False, *NEUTRAL_OPENAI.get(name, [])):
                    raise RequestError(400, f"{name}: {why} by this service", param=name, code="unsupported_parameter")
            # null/false: the client asks for nothing this service lacks
            data = {k: v for k, v in data.items() if k not in UNSUPPORTED_OPENAI}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings of at most {MAX_STOP_CHARS} "
                             "characters each")
        return stops


class ChatCompletionRequest(_OpenAIBase):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_OpenAIBase):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API's limit

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode JSON and validate it; every failure becomes a RequestError naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer over sys.get_int_max_str_digits() digits
        raise RequestError(400, f"the body is not acceptable JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "the body is not acceptable JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except RecursionError:  # deep nesting in a value the parser accepted (below its own limit)
        raise RequestError(400, "the body is not acceptable JSON: nested too deeply") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise RequestError(400, f"{where}: {first['msg']}{more}", param=where) from None
