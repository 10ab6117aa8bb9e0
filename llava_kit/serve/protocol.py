"""The OpenAI chat-completions API as pydantic models: what a request may hold, and the shapes of answers and errors.

    body = ChatCompletionRequest.model_validate_json(raw)      # pydantic.ValidationError -> 400 (`api_error`)

Types are strict (`"0.5"` is not a number, `1` is not `true`), numbers are finite (NaN, Infinity and 1e400 are
refused), and the JSON parser (pydantic's, in Rust) refuses nesting deeper than 200 levels with an ordinary
error, so no body can reach Python's recursion limit. Fields llava-kit does not use are ignored, except those
whose answer would silently differ from what the client asked for (tools, logprobs, several choices, JSON
output): `requests.py` refuses those with a 400 naming them.

Message content is kept as sent (`Any`) and checked part by part in `requests.py`, whose messages say exactly which
part is wrong (`messages[0].content[1]: malformed data URL ...`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT64 = 2**63


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ChatMessage(_Body):
    """One message: `content` is a string or a list of `text` / `image_url` parts (checked in requests.py)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class ChatCompletionRequest(_Body):
    """The fields of POST /v1/chat/completions that llava-kit reads."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    tools: list | None = None
    functions: list | None = None


# ---------------------------------------------------------------------------------------------- errors

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: raise it anywhere in a route; the app turns it into the response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(err: ValidationError) -> ApiError:
    """A 400 for the first problem pydantic found, naming the parameter (`messages[0].role`, `temperature`)."""
    first = err.errors(include_url=False, include_input=False, include_context=False)[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = _param(first["loc"])
    if not param:
        return ApiError(400, "the request body must be a JSON object with `messages` (and `model`)")
    return ApiError(400, f"{param}: {first['msg']}", param=param)


def _param(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"; a union member's label ("stop", "list[str]", 0) is left out."""
    if not loc:
        return ""
    if loc[0] != "messages":
        return str(loc[0])  # top-level scalars: the parameter's name is what a client can act on
    param = "messages"
    for part in loc[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in ChatMessage.model_fields:
            param += f".{part}"
    return param


_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def public_message(text: str) -> str:
    """`text` without Python object reprs (`<_io.BytesIO object at 0x...>`), which mean nothing to a client."""
    return _REPR.sub("the data", text)
