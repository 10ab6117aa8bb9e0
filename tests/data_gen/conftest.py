"""Fixtures for data_gen tests: the stub server and running `llava-kit caption` in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dg_support import API_KEY, Result

from data_gen.testing.stub_server import StubServer


@pytest.fixture
def stub() -> Iterator[StubServer]:
    """A running stub server with a little latency; hangs last 1 s (tests use --timeout well under that)."""
    server = StubServer(latency=0.005, retry_after=0.05, hang_seconds=1.0)
    with server:
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
