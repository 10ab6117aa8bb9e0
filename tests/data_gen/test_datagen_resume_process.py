"""Real processes: kill -9 mid-run and rerun, Ctrl-C, and what the caption command imports.

No test here races a process against the clock: the stub answers the first few requests and holds the
rest (`StubServer.hold`), so the signal always lands mid-run, with requests provably in flight.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from dg_support import PYTHON, REPO, communicate, make_images, popen, read_jsonl, subprocess_env

from data_gen.testing.stub_server import StubServer

N_IMAGES = 40
CONCURRENCY = 4


def _start(images: Path, out: Path, stub: StubServer, *extra: str) -> subprocess.Popen[str]:
    command = [PYTHON, "-m", "llava_kit.cli", "caption", str(images), "-o", str(out), "--model", "gpt-4o",
               "--base-url", stub.base_url, "--concurrency", str(CONCURRENCY), "--timeout", "5", "--no-progress",
               *extra]
    return popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(out: Path, count: int, proc: subprocess.Popen[str], limit: float = 120.0) -> None:
    """Poll until OUT has `count` lines; the limit only turns a hang into a failure (the run is held)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} lines in {out} within {limit}s (exit {proc.poll()})")


def test_kill_9_then_rerun_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.05) as stub:
        stub.hold(after=8)  # 8 answers, then every worker waits: the kill lands mid-run however slow the machine
        proc = _start(images, out, stub)
        try:
            _wait_for_lines(out, 8, proc)
            stub.wait_held(CONCURRENCY)  # every worker has a request out: the stub has seen all it will see
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        killed_at = len(read_jsonl(out))  # every line whole: read_jsonl fails on a broken one
        assert 8 <= killed_at < N_IMAGES, "the kill should land mid-run"
        requests_first = stub.count()
        stub.release()  # the held answers go to a dead process

        proc = _start(images, out, stub)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        requests_second = stub.count() - requests_first

    records = read_jsonl(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_IMAGES  # nothing lost, nothing twice
    assert {r["image"] for r in records} == {p.relative_to(images).as_posix() for p in images.rglob("*.png")}
    assert requests_second == N_IMAGES - killed_at  # the rerun asked only for what was missing
    assert requests_first + requests_second <= N_IMAGES + 4  # paid again at most for the requests in flight
    assert f"skipped (already done): {killed_at}" in stderr


def test_ctrl_c_keeps_finished_work_and_says_how_to_resume(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.05) as stub:
        stub.hold(after=4)  # 4 answers, then requests wait unanswered: the run cannot end before the signal
        proc = _start(images, out, stub)
        _wait_for_lines(out, 4, proc)
        stub.wait_held(1)  # a request is in flight
        proc.send_signal(signal.SIGINT)
        _, stderr = communicate(proc, 60)  # no release: Ctrl-C must not wait for answers
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert "rerun the same command to continue" in stderr
    assert 4 <= len(read_jsonl(out)) < N_IMAGES


def test_caption_never_imports_torch_and_help_stays_light() -> None:
    script = """
import sys
from llava_kit.cli import build_parser
try:
    build_parser().parse_args(["caption", "--help"])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "transformers", "openai", "PIL") if m in sys.modules)
assert not heavy, f"--help imported {heavy}"
import data_gen.batch, data_gen.cli, data_gen.client, data_gen.cost, data_gen.export, data_gen.images  # noqa
import data_gen.run, data_gen.scan, data_gen.store, data_gen.validate  # noqa
from data_gen.client import VisionClient, ClientOptions
VisionClient(ClientOptions(model="m"), "key")  # the run path imports openai
import openai, tqdm  # noqa
assert "torch" not in sys.modules and "transformers" not in sys.modules, "data_gen imported torch"
print("ok")
"""
    start = time.monotonic()
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: llava-kit caption")
    assert result.stdout.splitlines()[-1] == "ok"
    assert time.monotonic() - start < 30
