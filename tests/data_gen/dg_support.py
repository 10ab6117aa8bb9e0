"""Helpers for data_gen tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from data_gen.testing.stub_server import StubServer

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-DO-NOT-LEAK-7f3a9c1e5b"  # not sk-shaped: only exact redaction can hide it
RED = (230, 20, 20)
PYTHON = sys.executable


def make_images(folder: Path, count: int, *, start: int = 0, colour: tuple[int, int, int] | None = None) -> list[Path]:
    """`count` distinct small PNGs, some in a subfolder; distinct sizes/colours so none are duplicates."""
    paths = []
    for i in range(start, start + count):
        sub = folder / ("nested" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        fill = colour or (20 + (i * 7) % 200, 120, 255 - (i * 5) % 200)
        path = sub / f"img_{i:03d}.png"
        Image.new("RGB", (32 + i, 24 + i % 5), fill).save(path)
        paths.append(path)
    return paths


def request_image(body: dict[str, Any]) -> Image.Image:
    """The image a chat request carries (decoded from its data URL)."""
    for part in body["messages"][0]["content"]:
        if part.get("type") == "image_url":
            data = part["image_url"]["url"].split(",", 1)[1]
            return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    raise AssertionError("no image in request")


def is_red(body: dict[str, Any]) -> bool:
    """Whether a request's image is (mostly) the RED test colour: lets a stub rule target chosen images."""
    r, g, b = request_image(body).resize((1, 1)).getpixel((0, 0))
    return r > 180 and g < 80 and b < 80


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file, parsed; fails the test on a broken line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path} does not end with a newline"
    return [json.loads(line) for line in text.splitlines()]


@dataclass
class Result:
    """Outcome of one `llava-kit caption` run in this process."""

    code: int
    stderr: str


def fast_args(stub: StubServer, *extra: str) -> list[str]:
    """Options that keep a run against the stub quick: short timeout and backoff, no progress bar."""
    return ["--model", "gpt-4o", "--base-url", stub.base_url, "--timeout", "0.4", "--retry-delay", "0.01",
            "--no-progress", *extra]


def subprocess_env() -> dict[str, str]:
    """Environment for a `python -m llava_kit.cli` child: the repo on the path, the test key set."""
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    env.pop("LLAVA_KIT_DEBUG", None)
    return env

