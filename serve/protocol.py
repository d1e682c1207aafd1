"""The OpenAI request bodies the server accepts (pydantic), and its errors in OpenAI's shape.

Every field a client may send is declared: a field the server cannot honour (best_of > 1, echo, suffix, tools,
logit_bias, ...) is a 400 naming it, and a field it does not know is a 400 too, rather than being silently ignored.
Honoured as vLLM does: n, logprobs/top_logprobs, presence/frequency penalties, and vLLM's extensions `ignore_eos`,
`add_special_tokens`, `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `include_stop_str_in_output`,
`return_tokens_as_token_ids`, `stream_options.continuous_usage_stats` (serve/sampling.py and serve/choices.py say how).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .limits import MAX_LOGPROBS

INT64 = 2 ** 63
# Stop strings are matched against every new token's text: at most MAX_STOPS of them (OpenAI allows 4, vLLM sets no
# bound), each at most MAX_STOP_CHARS characters; past either, a 400.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_CHOICES = 128  # n x prompts of one request


class ApiError(Exception):
    """An HTTP error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(field: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported by this server (field '{field}')", param=field,
                    code="unsupported_parameter")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; with include_usage, every chunk carries its choice's usage


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=2 * INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and not used
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # unsupported unless empty
    # vLLM extensions
    ignore_eos: bool = False
    top_k: int | None = None  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[int] | None = Field(None, max_length=1024)
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"

    def check_common(self) -> None:
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias")
        if self.top_k is not None and self.top_k < -1:
            raise ApiError(400, f"top_k must be -1 (off), 0 (off) or at least 1, got {self.top_k}", param="top_k")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if (isinstance(self.stop, list) and any(not s for s in self.stop)) or self.stop == "":
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if len(self.stops) > MAX_STOPS:
            raise ApiError(400, f"expected at most {MAX_STOPS} stop strings, got {len(self.stops)}", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stops):
            raise ApiError(400, f"expected stop strings of at most {MAX_STOP_CHARS} characters, got one of "
                           f"{max(len(s) for s in self.stops)}", param="stop")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token the engine reports (None: no logprobs at all)."""
        if isinstance(self.logprobs, bool) or self.logprobs is None:  # chat: logprobs + top_logprobs
            return (getattr(self, "top_logprobs", None) or 0) if self.logprobs else None
        return self.logprobs  # completions: logprobs = the number of alternatives


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    add_special_tokens: bool = False  # vLLM's; prefixtune trains without special tokens, so off by default

    def check(self) -> None:
        self.check_common()
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of > 1")
        if self.echo:
            raise unsupported("echo", "echoing the prompt")
        if self.suffix:
            raise unsupported("suffix", "a suffix (insertion)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def text(self, i: int) -> str:
        if self.tool_calls or self.tool_call_id is not None or self.role == "tool":
            raise unsupported(f"messages[{i}]", "tool calling")
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise unsupported(f"messages[{i}].content", f"content of type {part.type!r} (only text)")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "when using top_logprobs, logprobs must be set to true", param="top_logprobs")
        if self.tools or self.functions:
            raise unsupported("tools" if self.tools else "functions", "tool calling")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise unsupported("tool_choice" if self.tool_choice not in (None, "none") else "function_call",
                              "tool calling")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", f"response_format {self.response_format.get('type')!r}")

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeCompletionRequest(_Strict):
    """POST /tokenize with a prompt (vLLM's shape; add_special_tokens defaults to False, as on /v1/completions here)."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """POST /tokenize with chat messages, formatted by the chat template as /v1/chat/completions does."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class LoadAdapterRequest(_Strict):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's name: replace a task of that name


class UnloadAdapterRequest(_Strict):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored


def validation_error(e: ValidationError) -> ApiError:
    """A pydantic error as one 400: every bad field with what was expected."""
    by_field: dict[str, list[str]] = {}
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        field = loc[0] if loc else "body"
        if err["type"] == "extra_forbidden":
            msg = f"field '{'.'.join(loc)}' is not supported by this server"
        elif err["type"] == "missing":
            msg = f"field '{'.'.join(loc)}' is required"
        else:
            where = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float",
                                                                                          "bool", "function-after"))
            msg = f"{where or field}: {err['msg']}"
        if msg not in by_field.setdefault(field, []):
            by_field[field].append(msg)
    first = next(iter(by_field), None)
    text = "; ".join(m for msgs in by_field.values() for m in msgs)
    return ApiError(400, f"invalid request: {text}", param=first)


def parse(model: type[BaseModel], body) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, f"expected a JSON object as the request body, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
