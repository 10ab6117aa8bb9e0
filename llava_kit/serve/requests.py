"""Turn an OpenAI chat-completions request body into llava-kit messages and pixel values, or a clear 400.

Content is a string or a list of parts: `{"type": "text", "text"}` and `{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}`. A user message's images go first, each as `<image>\\n`, then its text
(the layout `llava-kit chat` and LLaVA's data use), so a one-image question is prompted exactly as
`llava-kit chat --image IMG --prompt TEXT` prompts it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import urllib.request
from dataclasses import dataclass

import torch

from llava_kit.data.images import ImageLoadError, load_image
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import LlavaKitError, UsageError
from llava_kit.inference.sampling import SamplingError, SamplingParams
from llava_kit.inference.service import image_sizes

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.DOTALL)


class RequestError(UsageError):
    """A request the server cannot answer; the message goes back to the client (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    messages: list[dict]
    """Canonical llava-kit messages (`<image>` tags in user content)."""
    pixel_values: torch.Tensor | None
    """[n_images, 3, H, W], preprocessed for the tower; None without images."""
    n_images: int
    params: SamplingParams
    stream: bool
    image_sizes: list | None = None
    """Each image's (height, width), for AnyRes models."""


def parse_chat_request(body: bytes, service, settings) -> ChatRequest:
    """Validate a request body; decode and preprocess its images. Raises RequestError saying what to fix."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object with `messages`")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects", "messages")
    if data.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    response_format = data.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise RequestError("response_format other than {\"type\": \"text\"} is not supported by llava-kit serve "
                           "(no json_schema / json_object); ask for plain text", "response_format")
    images: list = []
    canonical = [_message(m, i, images, settings) for i, m in enumerate(messages)]
    _check_turns(canonical)
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    max_new_tokens = settings.max_new_tokens if max_tokens is None else max_tokens
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        max_new_tokens = min(max_new_tokens, settings.max_new_tokens)
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=_or(data.get("temperature"), 0.0),
                                top_p=_or(data.get("top_p"), 1.0), seed=data.get("seed"),
                                stop=_or(data.get("stop"), ()))
    except SamplingError as err:
        raise RequestError(str(err), err.param) from None
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("`stream` must be true or false", "stream")
    try:
        pixel_values = service.preprocess(images)
    except LlavaKitError as err:  # images sent to a text-only model
        raise RequestError(str(err), "messages") from None
    return ChatRequest(canonical, pixel_values, len(images), params, stream, image_sizes(images))


def _or(value, default):
    """`value`, or `default` when the client sent null or nothing."""
    return default if value is None else value


def _check_turns(messages: list[dict]) -> None:
    """After optional system messages: user, assistant, user, ..., ending with the user's question."""
    turns = [m["role"] for m in messages if m["role"] != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(f"turn {i + 1} is from {role!r} but {expected!r} was expected: after optional system "
                               "messages, turns alternate user, assistant, user, ...", "messages")
    if not turns or turns[-1] != "user":
        raise RequestError("the last message must be the user's (the one to answer)", "messages")


def _message(message, index: int, images: list, settings) -> dict:
    """One OpenAI message -> {role, content}; appends its images to `images`."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"{where} must be an object with role system, user or assistant", where)
    role = ROLES[message["role"]]
    content = message.get("content")
    texts, n_images = [], 0
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            part_where = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                if len(images) >= settings.max_images:  # refused before decoding any more
                    raise RequestError(f"more than {settings.max_images} images in one request; this server takes "
                                       f"at most {settings.max_images} (--max-images)", "messages")
                if role != "user":
                    raise RequestError(f"{part_where}: images are only accepted in user messages", part_where)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(_image(url, part_where, settings))
                n_images += 1
            else:
                raise RequestError(f"{part_where}: unsupported part {kind!r}; use text or image_url parts", part_where)
    else:
        raise RequestError(f"{where}.content must be a string or a list of parts", where)
    text = "\n".join(texts)
    if IMAGE_TOKEN in text:
        raise RequestError(f"{where}: the text contains {IMAGE_TOKEN!r}, which is reserved for images; send images "
                           "as image_url parts", where)
    return {"role": role, "content": f"{IMAGE_TOKEN}\n" * n_images + text}


def _image(url, where: str, settings):
    """A PIL image from a data URL (or, when allowed, an http(s) URL)."""
    if not isinstance(url, str):
        raise RequestError(f"{where}: image_url.url must be a string", where)
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if not match:
            raise RequestError(f"{where}: malformed data URL; expected data:image/<type>;base64,<data>", where)
        try:
            raw = base64.b64decode(match.group(1), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: malformed data URL: the payload is not valid base64", where) from None
    elif url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise RequestError(f"{where}: remote image URLs are not fetched by this server; send the image as a "
                               "data URL (data:image/png;base64,...) or start it with --allow-remote-images", where)
        raw = _fetch(url, where, settings.max_body_bytes)
    else:
        raise RequestError(f"{where}: unsupported image URL scheme; send a data URL (data:image/png;base64,...)",
                           where)
    try:
        return load_image(io.BytesIO(raw))
    except ImageLoadError as err:
        raise RequestError(f"{where}: {err}", where) from None


def _fetch(url: str, where: str, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (opted in with --allow-remote-images)
            raw = response.read(limit + 1)
    except OSError as err:
        raise RequestError(f"{where}: cannot fetch {url}: {err}", where) from None
    if len(raw) > limit:
        raise RequestError(f"{where}: the image at {url} is over {limit} bytes", where)
    return raw
