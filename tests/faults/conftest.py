"""Fixtures for the fault-injection tests: the data_gen tests' helpers, a stub server, caption in this process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_gen"))  # dg_support: shared with tests/data_gen

from dg_support import API_KEY, Result  # noqa: E402

from data_gen.testing.stub_server import StubServer  # noqa: E402


@pytest.fixture
def stub() -> Iterator[StubServer]:
    """A running stub server with a little latency."""
    with StubServer(latency=0.005, retry_after=0.05, hang_seconds=1.0) as server:
        yield server


@pytest.fixture
def caption(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `llava-kit caption ARGS` through llava_kit's real CLI in this process, with the test API key."""
    from llava_kit.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        code = main(["caption", *map(str, args)])
        captured = capsys.readouterr()
        assert captured.out == "", "caption must keep stdout clean"
        return Result(code, captured.err)

    return run
