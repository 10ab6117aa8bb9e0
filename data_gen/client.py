"""One vision request against an OpenAI-compatible API, with every outcome sorted into three kinds.

- a `Reply` (the server answered; validation decides whether the answer is usable),
- `TransientError` (429, 5xx, timeouts, dropped connections, malformed bodies: retry after a backoff),
- `FatalAPIError` (no quota, bad key, unknown model, other 4xx: retrying cannot help, stop the run).

The SDK's own retries are off (`max_retries=0`): the pipeline retries, so that it can count attempts
per image, pause every worker after a 429 and report the last reason. The `openai` import is inside
`VisionClient` so that `llava-kit caption --help` does not pay for it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from data_gen.prompts import Task, response_format

log = logging.getLogger("data_gen")

RESPONSE_FORMATS = ("auto", "json_schema", "json_object", "text")
_FALLBACK = {"json_schema": "json_object", "json_object": "text"}
# Words in a 400/422 that mean "this server does not do that response_format" rather than "bad image".
_FORMAT_ERROR = re.compile(r"response_format|json_schema|json_object|structured|guided|grammar|schema", re.I)
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*.]{6,})")
MAX_RETRY_AFTER = 600.0


@dataclass
class ClientOptions:
    """Where and how to send requests."""

    model: str
    """Model name as the server knows it."""
    base_url: str | None = None
    """OpenAI-compatible endpoint ending in /v1; None means api.openai.com."""
    timeout: float = 120.0
    """Seconds for one request, start to finish."""
    detail: str = "auto"
    """Image detail: low, high or auto (also decides how far images are downscaled)."""
    response_format: str = "auto"
    """auto (json_schema, falling back to json_object then text), or one of those forced."""
    max_tokens: int | None = None
    """Completion budget; None: the task's default; 0: not sent."""
    temperature: float | None = None
    """Sampling temperature; None: the server's default."""


@dataclass
class Reply:
    """The parts of a chat completion that validation and accounting need."""

    content: str | None
    refusal: str | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FatalAPIError(Exception):
    """An error that no retry can fix; the message says what happened and what to do."""


class TransientError(Exception):
    """A failure worth retrying; `reason` goes to the errors file if retries run out."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


def redact(text: str, secret: str | None) -> str:
    """`text` with the API key (and anything shaped like an OpenAI key) masked: error bodies may echo it."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("sk-***", text)


def request_body(task: Task, image_url: str, options: ClientOptions, mode: str) -> dict[str, Any]:
    """The JSON body of one chat completion request (also a line of a --batch request file)."""
    body: dict[str, Any] = {
        "model": options.model,
        "messages": [{
            "role": "user",
            "content": [
                {"type": "text", "text": task.prompt_text()},
                {"type": "image_url", "image_url": {"url": image_url, "detail": options.detail}},
            ],
        }],
    }
    max_tokens = task.max_tokens if options.max_tokens is None else options.max_tokens
    if max_tokens:
        body["max_tokens"] = max_tokens
    if options.temperature is not None:
        body["temperature"] = options.temperature
    fmt = response_format(task, mode)
    if fmt is not None:
        body["response_format"] = fmt
    return body


def reply_from_dict(data: Any) -> Reply:
    """A Reply from a chat.completion as JSON (Batch API output); TransientError when it is not one."""
    if not isinstance(data, dict):
        raise TransientError("malformed_response", "the body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TransientError("empty_choices", "the response has no choices")
    message = choices[0].get("message") or {}
    usage = data.get("usage") or {}
    return Reply(
        content=message.get("content") if isinstance(message.get("content"), str) else None,
        refusal=message.get("refusal") or None,
        finish_reason=choices[0].get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if present."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return min(MAX_RETRY_AFTER, max(0.0, float(headers["retry-after-ms"]) / 1000))
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return min(MAX_RETRY_AFTER, max(0.0, float(value)))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - time.time()))
    except (TypeError, ValueError, OverflowError):
        return None


def backoff_delay(attempt: int, retry_after: float | None, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds before retry number `attempt` (1-based).

    With Retry-After: that, plus up to 25% jitter so that workers told the same time do not all come
    back at once. Without: exponential from `base`, capped, with jitter in its upper half.
    """
    if retry_after is not None:
        return retry_after * random.uniform(1.0, 1.25) + random.uniform(0, 0.05)
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def classify_error(exc: BaseException, options: ClientOptions, api_key: str | None, key_env: str) -> Exception:
    """The TransientError or FatalAPIError for an exception raised by an openai call."""
    import openai

    where = options.base_url or "api.openai.com"
    if isinstance(exc, asyncio.TimeoutError | openai.APITimeoutError):
        return TransientError("timeout", f"no answer within --timeout {options.timeout:g}s")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return TransientError("connection_error", redact(f"{type(cause).__name__}: {cause}", api_key)[:300])
    if isinstance(exc, openai.APIStatusError):
        status, code = exc.status_code, (exc.code or "")
        body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
        text = body.get("message") if isinstance(body, dict) and body.get("message") else exc.message
        message = redact(str(text), api_key)[:500]
        if status == 429 and (code == "insufficient_quota" or getattr(exc, "type", None) == "insufficient_quota"):
            return FatalAPIError(
                f"the API account at {where} has no quota left (429 insufficient_quota): {message}\n"
                "Add credit or raise the spending limit with your provider, then rerun the same command: "
                "finished images are kept and will be skipped."
            )
        if status == 401:
            return FatalAPIError(
                f"authentication failed at {where} (401): {message}\n"
                f"The key read from ${key_env} was rejected. Set a valid key in {key_env}, or name another "
                "environment variable with --api-key-env."
            )
        if status == 403:
            return FatalAPIError(f"permission denied at {where} (403): {message}\n"
                                 f"Check that this key may use model {options.model!r}.")
        if status == 404:
            return FatalAPIError(
                f"not found at {where} (404): {message}\n"
                f"Check --model {options.model!r} and --base-url (it usually ends in /v1)."
            )
        if status in (408, 409, 429):
            retry_after = parse_retry_after(exc.response.headers)
            reason = "rate_limited" if status == 429 else f"http_{status}"
            return TransientError(reason, message, retry_after)
        if status >= 500:
            return TransientError("server_error", f"{status}: {message}", parse_retry_after(exc.response.headers))
        return FatalAPIError(f"the server at {where} rejected the request ({status}): {message}\n"
                             "Check --model, --detail, --max-tokens and --response-format for this server.")
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        return TransientError("malformed_response", f"the response body is not a valid completion ({type(exc).__name__})")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


class RateLimiter:
    """Spaces request starts to stay under --rpm, and holds everyone back after a 429 with Retry-After."""

    def __init__(self, rpm: float | None) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next_start = 0.0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """No request may start for `seconds` from now (a 429 is about the account, not one request)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        """Wait until this request may start: after any pause, and `interval` after the previous start.

        Both are checked again after every sleep, and the start is taken with no await between check and
        claim: a waiter that wakes late (a busy machine) cannot start together with the next one, and a
        pause that begins while a waiter sleeps holds it back too.
        """
        while True:
            now = time.monotonic()
            wait = max(self._paused_until, self._next_start) - now
            if wait <= 0:
                self._next_start = now + self.interval
                return
            await asyncio.sleep(wait)


async def _with_deadline(awaitable: Any, seconds: float) -> Any:
    """`await awaitable`, raising TimeoutError after `seconds`.

    asyncio.timeout where it exists: wait_for before Python 3.12 can swallow a cancellation that
    arrives as the request completes, and a worker that misses its cancel never stops.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class VisionClient:
    """An AsyncOpenAI client that returns Replies and raises TransientError / FatalAPIError."""

    def __init__(self, options: ClientOptions, api_key: str, key_env: str = "OPENAI_API_KEY") -> None:
        import openai  # here, not at module level: keeps `--help` and --dry-run fast

        self.options = options
        self._api_key = api_key
        self._key_env = key_env
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=options.base_url, max_retries=0,
                                          timeout=options.timeout)
        self.mode = "json_schema" if options.response_format == "auto" else options.response_format
        self.successes = 0  # answers received, usable or not: proves the endpoint is reachable
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _fall_back(self, failed_mode: str, message: str) -> bool:
        """Switch to the next response_format after the server rejected `failed_mode`; False if none is left."""
        if self.options.response_format != "auto" or failed_mode not in _FALLBACK:
            return False
        if self.mode == failed_mode:  # concurrent requests see the same 400: switch and log once
            self.mode = _FALLBACK[failed_mode]
            log.warning("the server rejected response_format %s (%s); using %s from now on",
                        failed_mode, message[:120], self.mode)
        return True

    async def complete(self, task: Task, image_url: str) -> Reply:
        """Send one image with the task's prompt; the server's answer as a Reply."""
        import openai

        while True:
            mode = self.mode
            body = request_body(task, image_url, self.options, mode)
            try:
                # `post` with a ready body is the SDK's documented path for raw requests: it skips the typed
                # params transform and the response model, which cost half the client's CPU per request.
                # The SDK's timeout applies per phase (connect, each read); wait_for bounds the whole
                # request, so a server that trickles bytes cannot hold a worker forever.
                response = await _with_deadline(
                    self._client.post("/chat/completions", body=body, cast_to=object), self.options.timeout)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                message = redact(str(exc.message), self._api_key)
                if mode != "text" and _FORMAT_ERROR.search(message) and self._fall_back(mode, message):
                    continue
                raise classify_error(exc, self.options, self._api_key, self._key_env) from None
            except Exception as exc:
                raise classify_error(exc, self.options, self._api_key, self._key_env) from None
            self.successes += 1
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict):  # billed even when the answer turns out unusable
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)
            return reply_from_dict(response)

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()
