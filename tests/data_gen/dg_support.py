"""Helpers for data_gen tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
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
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    env.pop("LLAVA_KIT_DEBUG", None)
    return env


def popen(command: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """`subprocess.Popen(command, **kwargs)` with Ctrl-C (SIGINT) at its default in the child, as in a terminal.

    A shell starts a background job (`pytest &` in a script) with SIGINT ignored, and a child inherits
    that: a Ctrl-C test would signal a process that cannot hear it. exec resets a *handled* signal to
    its default, so the child is started while this process handles SIGINT. Main thread only.
    """
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, **kwargs)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def communicate(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """`proc.communicate(timeout=...)`; a child that hangs fails the test with its signal state and stacks."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{proc.pid}/status")
        signals = [line for line in status.read_text().splitlines() if line.startswith(("Sig", "Shd"))] \
            if status.exists() else []
        proc.send_signal(signal.SIGABRT)  # with PYTHONFAULTHANDLER set, the child prints every thread's stack
        _, stderr = proc.communicate()
        raise AssertionError(f"the child did not exit within {timeout:g}s; {signals}\n{stderr[-8000:]}") from None

