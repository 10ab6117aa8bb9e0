"""What `llava-kit serve` and `llava-kit webui` can be told: the schema of their settings, from which their
command-line options are derived.

    settings = ServerSettings(model_name="shapes", api_key="sk-...", port=8080)

Imports nothing heavy: `llava-kit --help` builds the `serve` options from these fields (help from the docstrings).
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from llava_kit.errors import UsageError
from llava_kit.schema import Schema

# The fields `llava-kit serve` takes as options (`created` is the server's own).
CLI_FIELDS = ("host", "port", "api_key", "model_name", "max_body_mb", "max_images", "max_prompt_tokens",
              "max_new_tokens", "max_batch_size", "max_queue", "request_timeout", "max_connections",
              "allow_remote_images", "webui")
# `llava-kit webui` serves the chat page alone (no API, so no key), on Gradio's usual port.
WEBUI_FIELDS = ("host", "port", "max_images", "max_prompt_tokens", "max_new_tokens", "max_batch_size", "max_queue")
WEBUI_PORT = 7860


class ServerSettings(Schema):
    """Settings of the OpenAI-compatible server and the web chat (llava_kit/serve/, llava_kit/webui/)."""

    host: str = "127.0.0.1"
    """address to listen on (127.0.0.1: this machine only; 0.0.0.0 for every interface)"""
    port: int = Field(8000, ge=1, le=65535)
    """port to listen on"""
    api_key: str | None = None
    """require `Authorization: Bearer KEY` (default: $LLAVA_KIT_API_KEY; unset = no key); the web chat then asks
    for it as its password"""
    model_name: str = ""
    """the model id /v1/models lists and responses carry (default: the model directory's name). With one model,
    requests may name any model; with several (`--model NAME=DIR` each), they choose one by name"""
    max_body_mb: float = Field(20.0, gt=0)
    """largest request body in MB; larger ones are refused (413) without being read"""
    max_images: int = Field(8, ge=1)
    """most images per request"""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """longest prompt in tokens, images included (default: the model's positions); longer ones are refused (400)"""
    max_new_tokens: int = Field(512, ge=1)
    """default and ceiling of max_tokens"""
    max_batch_size: int = Field(8, ge=1)
    """most queued greedy requests generated together"""
    max_queue: int = Field(128, ge=1)
    """most requests waiting for each model; more are refused with 429 and Retry-After"""
    request_timeout: float = Field(30.0, gt=0)
    """seconds a client has to send a request's headers and body; slower connections are closed (idle kept-alive
    connections close after 5 s)"""
    max_connections: int = Field(1024, ge=1)
    """most open connections; more are answered 503"""
    allow_remote_images: bool = False
    """fetch http(s) image URLs (off by default: only data URLs are accepted, so the server fetches nothing on a
    client's behalf)"""
    webui: bool = True
    """serve the web chat at / (needs gradio: the `webui` extra)"""
    created: int = Field(default_factory=lambda: int(time.time()))
    """When the server started (the `created` of /v1/models)."""

    @property
    def max_body_bytes(self) -> int:
        """`max_body_mb` in bytes."""
        return int(self.max_body_mb * 1024 * 1024)


def parse_models(model_args: list[str], model_name: str = "") -> list[tuple[str, str]]:
    """`--model [NAME=]DIR` arguments -> (name, directory) pairs. A name defaults to `model_name` (one model only)
    or the directory's name; names must differ (UsageError saying how to name them)."""
    pairs = []
    for arg in model_args:
        name, sep, path = arg.partition("=")
        if not sep or not name or "/" in name:  # a plain directory (whose path may itself hold "=")
            name, path = "", arg
        pairs.append((name, path))
    if model_name:
        if len(pairs) > 1:
            raise UsageError("--model-name names the only model; with several, name each one as --model NAME=DIR")
        pairs = [(pairs[0][0] or model_name, pairs[0][1])]
    pairs = [(name or Path(path).resolve().name, path) for name, path in pairs]
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"several models would be called {', '.join(map(repr, repeated))}; name each one with "
                         "--model NAME=DIR (e.g. --model linear=runs/linear/merged --model mlp=runs/mlp/merged)")
    return pairs
