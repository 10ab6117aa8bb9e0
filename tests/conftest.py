"""Shared fixtures: tiny models built once per test session in a temporary directory (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep `tiny:` models and caches of the test run out of the user's home."""
    home = tmp_path_factory.mktemp("llava_kit_home")
    os.environ["LLAVA_KIT_HOME"] = str(home)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield home


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from llava_kit.data.encode import add_image_token
    from llava_kit.testing.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(1024)
    add_image_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """`{vision, llm}` directories of tiny random models saved like real checkpoints."""
    from llava_kit.testing.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny"))
