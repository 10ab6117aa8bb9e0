"""Fault tests train tiny runs like the integration tests (the same fixtures), and caption against the stub
server with the data_gen tests' helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from data_gen.testing.stub_server import StubServer
from tests.data_gen.dg_support import API_KEY, Result
from tests.integration.conftest import make_config  # noqa: F401 (a fixture, used by name)


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
