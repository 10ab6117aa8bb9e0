"""Turn an OpenAI chat-completions request into llava-kit messages, images and sampling settings, or a clear 400.

Content is a string or a list of parts: `{"type": "text", "text"}` and `{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}`. A user message's images go first, each as `<image>\\n`, then its text
(the layout `llava-kit chat` and LLaVA's data use), so a one-image question is prompted exactly as
`llava-kit chat --image IMG --prompt TEXT` prompts it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass

from PIL import Image

from llava_kit.data.images import ImageLoadError, load_image
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import UsageError
from llava_kit.inference.sampling import SamplingError, SamplingParams
from llava_kit.serve.protocol import ChatCompletionRequest, public_message
from llava_kit.serve.settings import ServerSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.DOTALL)


class RequestError(UsageError):
    """A request the server cannot answer; the message goes back to the client (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Conversation:
    """What a request asks for, in llava-kit's terms."""

    messages: list[dict]
    """Canonical llava-kit messages (`<image>` tags in user content)."""
    images: list[Image.Image]
    """RGB images in the order of the `<image>` tags."""
    params: SamplingParams
    stream: bool
    include_usage: bool
    """Streaming: end with a chunk that carries only `usage` (OpenAI's stream_options.include_usage)."""


def conversation_of(body: ChatCompletionRequest, settings: ServerSettings) -> Conversation:
    """Check what pydantic cannot (turn order, parts, images, unsupported options); decode the images."""
    _refuse_unsupported(body)
    images: list = []
    messages = [_message(m.role, m.content, i, images, settings) for i, m in enumerate(body.messages)]
    check_turns(messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new_tokens = settings.max_new_tokens if requested is None else min(requested, settings.max_new_tokens)
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=_or(body.temperature, 0.0),
                                top_p=_or(body.top_p, 1.0), seed=body.seed, stop=_or(body.stop, ()))
    except SamplingError as err:
        raise RequestError(str(err), err.param) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Conversation(messages, images, params, bool(body.stream), include_usage)


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Options whose answer would silently differ from what the client asked for."""
    if body.n not in (None, 1):
        raise RequestError("only n=1 is supported", "n")
    response_format = body.response_format
    if response_format is not None and response_format.get("type") != "text":
        raise RequestError("response_format other than {\"type\": \"text\"} is not supported by llava-kit serve "
                           "(no json_schema / json_object); ask for plain text", "response_format")
    if body.tools or body.functions:
        raise RequestError("tools and functions are not supported by llava-kit serve", "tools")
    if body.logprobs:
        raise RequestError("logprobs are not supported by llava-kit serve", "logprobs")


def _or(value, default):
    """`value`, or `default` when the client sent null or nothing."""
    return default if value is None else value


def check_turns(messages: list[dict]) -> None:
    """After optional system messages: user, assistant, user, ..., ending with the user's question."""
    turns = [m["role"] for m in messages if m["role"] != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(f"turn {i + 1} is from {role!r} but {expected!r} was expected: after optional system "
                               "messages, turns alternate user, assistant, user, ...", "messages")
    if not turns or turns[-1] != "user":
        raise RequestError("the last message must be the user's (the one to answer)", "messages")


def _message(role: str, content, index: int, images: list, settings: ServerSettings) -> dict:
    """One OpenAI message -> {role, content}; appends its images to `images`."""
    where = f"messages[{index}]"
    role = ROLES[role]
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
            elif kind == "text":
                raise RequestError(f"{part_where}: a text part needs a string `text`", part_where)
            else:
                shown = repr(kind) if isinstance(kind, str) and len(kind) < 40 else "without a known type"
                raise RequestError(f"{part_where}: unsupported part {shown}; use text or image_url parts", part_where)
    else:
        raise RequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
    text = "\n".join(texts)
    if IMAGE_TOKEN in text:
        raise RequestError(f"{where}: the text contains {IMAGE_TOKEN!r}, which is reserved for images; send images "
                           "as image_url parts", where)
    return {"role": role, "content": f"{IMAGE_TOKEN}\n" * n_images + text}


def _image(url, where: str, settings: ServerSettings) -> Image.Image:
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
        if "object at 0x" in str(err):  # PIL names the source by its repr: say what it means instead
            raise RequestError(f"{where}: cannot read image: the data is not an image (PNG, JPEG, WebP, GIF, ...)",
                               where) from None
        raise RequestError(f"{where}: {err}", where) from None
    except Exception:  # noqa: BLE001 (untrusted bytes: a decoder's own bug must not become a 500)
        raise RequestError(f"{where}: cannot read image: the data is not an image PIL can decode", where) from None


def _fetch(url: str, where: str, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (opted in with --allow-remote-images)
            raw = response.read(limit + 1)
    except (OSError, ValueError) as err:
        raise RequestError(f"{where}: cannot fetch {url}: {public_message(str(err))}", where) from None
    if len(raw) > limit:
        raise RequestError(f"{where}: the image at {url} is over {limit} bytes", where)
    return raw
