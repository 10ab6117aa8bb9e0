"""The output lock: one writer per caption output, a record of who holds it, and what is left after release."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from dg_support import fast_args, make_images

from data_gen.lock import OutputLock, OutputLockedError, lock_path, owner_path
from data_gen.testing.stub_server import StubServer


def test_the_lock_records_its_holder_until_released(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "caps.jsonl"
    lock = OutputLock(out)
    lock.acquire()
    owner = json.loads(owner_path(out).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert owner["started"] and "command" in owner
    assert owner_path(out).name == "caps.lock.json" and lock_path(out).name == "caps.lock"
    lock.release()
    assert not owner_path(out).exists()  # no record: nobody holds it
    lock.release()  # a second release does nothing
    again = OutputLock(out)
    again.acquire()
    again.release()


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    first = OutputLock(out)
    first.acquire()
    try:
        with pytest.raises(OutputLockedError, match=f"is being written by pid {os.getpid()} on host "):
            OutputLock(out).acquire()
    finally:
        first.release()
    assert not owner_path(out).exists()


def test_a_refused_run_exits_2_and_a_dry_run_needs_no_lock(tmp_path: Path, stub: StubServer, caption) -> None:
    make_images(tmp_path / "images", 2)
    out = tmp_path / "out.jsonl"
    lock = OutputLock(out)
    lock.acquire()
    try:
        refused = caption(tmp_path / "images", "-o", out, *fast_args(stub))
        dry = caption(tmp_path / "images", "-o", out, "--model", "gpt-4o", "--dry-run")
    finally:
        lock.release()
    assert refused.code == 2 and "is being written by" in refused.stderr and "Traceback" not in refused.stderr
    assert stub.count() == 0 and not out.exists()
    assert dry.code == 0, dry.stderr
    assert caption(tmp_path / "images", "-o", out, *fast_args(stub)).code == 0  # released: the next run goes


def test_a_run_that_cannot_open_its_output_releases_the_lock(tmp_path: Path, stub: StubServer, caption) -> None:
    make_images(tmp_path / "images", 2)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nGARBAGE\n{"id": "b"}\n')
    result = caption(tmp_path / "images", "-o", out, *fast_args(stub))
    assert result.code == 2 and "out.jsonl:2" in result.stderr
    assert not owner_path(out).exists()
    lock = OutputLock(out)
    lock.acquire()  # free again
    lock.release()
