"""What `llava-kit serve` can be told: the schema of its settings, from which its command-line options are derived.

    settings = ServerSettings(model_name="shapes", api_key="sk-...", port=8080)

Imports nothing heavy: `llava-kit --help` builds the `serve` options from these fields (help from the docstrings).
"""

from __future__ import annotations

import time

from pydantic import Field

from llava_kit.schema import Schema

# The fields `llava-kit serve` takes as options (`created` is the server's own).
CLI_FIELDS = ("host", "port", "api_key", "model_name", "max_body_mb", "max_images", "max_new_tokens",
              "max_batch_size", "allow_remote_images")


class ServerSettings(Schema):
    """Settings of the OpenAI-compatible server (llava_kit/serve/server.py)."""

    host: str = "127.0.0.1"
    """address to listen on (127.0.0.1: this machine only; 0.0.0.0 for every interface)"""
    port: int = Field(8000, ge=1, le=65535)
    """port to listen on"""
    api_key: str | None = None
    """require `Authorization: Bearer KEY` (default: $LLAVA_KIT_API_KEY; unset = no key)"""
    model_name: str = ""
    """the model id /v1/models lists and responses carry (default: the model directory's name; requests may name
    any model: there is only one)"""
    max_body_mb: float = Field(20.0, gt=0)
    """largest request body in MB; larger ones are refused (413) without being read"""
    max_images: int = Field(8, ge=1)
    """most images per request"""
    max_new_tokens: int = Field(512, ge=1)
    """default and ceiling of max_tokens"""
    max_batch_size: int = Field(8, ge=1)
    """most queued greedy requests generated together"""
    allow_remote_images: bool = False
    """fetch http(s) image URLs (off by default: only data URLs are accepted, so the server fetches nothing on a
    client's behalf)"""
    created: int = Field(default_factory=lambda: int(time.time()))
    """When the server started (the `created` of /v1/models)."""

    @property
    def max_body_bytes(self) -> int:
        """`max_body_mb` in bytes."""
        return int(self.max_body_mb * 1024 * 1024)

