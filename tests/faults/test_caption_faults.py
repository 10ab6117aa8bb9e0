"""Faults a caption run meets in the wild, injected on purpose: two runs on one output, a wrapper killed while
its child lives on, a lock left by a killed run, kill -9 mid-run, a quota stop, Ctrl-C, a batch run that stops.

Races are decided by the stub, not by the clock: it holds requests unanswered (`StubServer.hold`) until the
test has seen what it waits for, so every outcome is the same on an idle machine and on a busy one. Polling
loops have a limit only to turn a broken run into a failure instead of a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from data_gen.testing.stub_server import StubServer
from tests.data_gen.dg_support import (
    PYTHON,
    REPO,
    communicate,
    fast_args,
    make_images,
    popen,
    read_jsonl,
    subprocess_env,
)

N_IMAGES = 40
CONCURRENCY = 4
LIMIT = 120.0  # seconds before a wait counts as a failure; nothing waits for it on a working run


def _command(images: Path, out: Path, stub: StubServer) -> list[str]:
    return [PYTHON, "-m", "llava_kit.cli", "caption", str(images), "-o", str(out), "--model", "gpt-4o",
            "--base-url", stub.base_url, "--concurrency", str(CONCURRENCY), "--timeout", "30", "--no-progress"]


def _start(images: Path, out: Path, stub: StubServer) -> subprocess.Popen[str]:
    return popen(_command(images, out, stub), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {LIMIT:g}s: {what}")
        time.sleep(0.02)


def _owner_path(out: Path) -> Path:
    """Who holds OUT's lock (docs/data_gen.md): `out.jsonl` -> `out.lock.json`."""
    return out.with_name(out.stem + ".lock.json")


def _lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def _accounting(out: Path) -> tuple[Counter, dict[str, str]]:
    """(how often each image appears across OUT and OUT.errors.jsonl, reason per image in the errors file)."""
    seen: Counter = Counter(record["image"] for record in read_jsonl(out))
    reasons = {}
    for error in read_jsonl(out.with_name(out.stem + ".errors.jsonl")):
        seen[error["image"]] += 1
        reasons[error["image"]] = error["reason"]
    return seen, reasons


def _all_images(images: Path) -> set[str]:
    return {p.relative_to(images).as_posix() for p in images.rglob("*.png")}


def _assert_complete(out: Path, images: Path) -> None:
    """Every image exactly once in OUT: 0 lost, 0 duplicated."""
    records = read_jsonl(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate rows: {len(ids)} rows for {N_IMAGES}"
    assert {r["image"] for r in records} == _all_images(images)


# -- one writer per output --------------------------------------------------------------------------


def test_a_second_run_on_the_same_output_refuses_and_names_the_first(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.01) as stub:
        stub.hold()  # the first run cannot get ahead, however fast the machine
        first = _start(images, out, stub)
        stub.wait_held(CONCURRENCY)  # it holds the output and has every worker's request out
        second = _start(images, out, stub)
        _wait_until(lambda: second.poll() is not None or stub.held > CONCURRENCY, "the second run exits or sends")
        stub.release()
        _, second_err = communicate(second, LIMIT)
        _, first_err = communicate(first, LIMIT)
        requests = stub.count()
    assert second.returncode == 2, second_err
    assert f"is being written by pid {first.pid} on host {socket.gethostname()} since " in second_err
    assert "wait for that run to finish or stop it" in second_err and "Traceback" not in second_err
    assert first.returncode == 0, first_err
    _assert_complete(out, images)
    assert requests == N_IMAGES  # the refused run sent nothing
    assert not _owner_path(out).exists()  # the finished run took its record away


def test_two_runs_started_together_write_each_image_once(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.01) as stub:
        stub.hold()
        runs = [_start(images, out, stub) for _ in range(2)]
        # one of them gets the lock and is held; the other must give up (without a lock, both would send)
        _wait_until(lambda: any(p.poll() is not None for p in runs) or stub.held > CONCURRENCY,
                    "one run exits or both send")
        stub.release()
        errs = [communicate(p, LIMIT)[1] for p in runs]
    _assert_complete(out, images)
    codes = [p.returncode for p in runs]
    assert sorted(codes) == [0, 2], errs
    refused = errs[codes.index(2)]
    assert "is being written by" in refused and "Traceback" not in refused


def test_a_run_whose_wrapper_was_killed_still_holds_the_output(tmp_path: Path) -> None:
    """A wrapper script killed while its caption child lives on: the child keeps the output to itself."""
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.01) as stub:
        stub.hold()
        with (tmp_path / "child.log").open("w") as log:
            wrapper = popen(["sh", "-c", '"$@" & wait', "wrapper", *_command(images, out, stub)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log)
        stub.wait_held(CONCURRENCY)
        child = json.loads(_owner_path(out).read_text())["pid"]
        assert child != wrapper.pid
        wrapper.kill()
        wrapper.wait()
        try:
            second = _start(images, out, stub)
            _, second_err = communicate(second, LIMIT)
            assert second.returncode == 2, second_err
            assert f"is being written by pid {child} on host" in second_err
            stub.release()
            _wait_until(lambda: not _owner_path(out).exists(), "the orphaned run finishes")  # it releases last
        finally:
            stub.release()
            if _owner_path(out).exists():
                os.kill(child, signal.SIGKILL)  # only when the test failed: do not leave it running
    _assert_complete(out, images)
    assert stub.count() == N_IMAGES


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path: Path, stub: StubServer,
                                                                   caption) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, 6)
    script = ("import sys, time; from pathlib import Path; from data_gen.lock import OutputLock; "
              "lock = OutputLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); time.sleep(600)")
    holder = popen([PYTHON, "-c", script, str(out)], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                   text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = caption(images, "-o", out, *fast_args(stub))
        assert refused.code == 2, refused.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}" in refused.stderr
        assert stub.count() == 0 and not out.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert json.loads(_owner_path(out).read_text())["pid"] == holder.pid  # the dead holder's record is still there

    result = caption(images, "-o", out, *fast_args(stub))
    assert result.code == 0, result.stderr
    assert f"the run that held it, pid {holder.pid} on host" in result.stderr and "taking it over" in result.stderr
    assert len(read_jsonl(out)) == 6
    assert not _owner_path(out).exists()


def test_kill_9_twice_then_rerun_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    killed = []
    with StubServer(latency=0.01) as stub:
        for stop_at in (8, 20):
            stub.hold(after=stop_at - _lines(out))
            proc = _start(images, out, stub)
            _wait_until(lambda stop_at=stop_at: _lines(out) >= stop_at, f"{stop_at} lines")
            stub.wait_held(CONCURRENCY)
            assert json.loads(_owner_path(out).read_text())["pid"] == proc.pid  # the lock names its holder
            proc.kill()
            proc.communicate()
            killed.append(proc.pid)
            stub.release()
        assert len(read_jsonl(out)) == 20
        rerun = _start(images, out, stub)
        _, stderr = communicate(rerun, LIMIT)
    assert rerun.returncode == 0, stderr
    assert f"pid {killed[-1]} on host" in stderr and "taking it over" in stderr
    assert "skipped (already done): 20" in stderr
    _assert_complete(out, images)


# -- every image accounted for after a stop ------------------------------------------------------------


def test_a_quota_stop_accounts_for_every_image(tmp_path: Path, stub: StubServer, caption) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, 30)
    stub.enqueue("ok", "ok", "ok", "ok", "ok", "insufficient_quota")
    result = caption(images, "-o", out, *fast_args(stub, "--concurrency", "2"))
    assert result.code == 3, result.stderr
    done = len(read_jsonl(out))
    seen, reasons = _accounting(out)
    assert set(seen) == _all_images(images) and set(seen.values()) == {1}, "an image in neither file, or in both"
    counts = Counter(reasons.values())
    assert set(counts) == {"stopped", "not_attempted"}  # the image that met the quota, and those never sent
    assert counts["not_attempted"] >= 30 - done - 2  # at most 2 were in flight
    assert f"not attempted (run stopped): {30 - done}, listed in the errors file as not_attempted" in result.stderr

    before = stub.count()
    rerun = caption(images, "-o", out, *fast_args(stub))
    assert rerun.code == 0, rerun.stderr
    assert f"retrying the {30 - done} images that failed or were not finished" in rerun.stderr
    assert stub.count() - before == 30 - done  # each one sent once
    assert len(read_jsonl(out)) == 30 and len({r["id"] for r in read_jsonl(out)}) == 30
    assert read_jsonl(out.with_name("out.errors.jsonl")) == []


def test_ctrl_c_accounts_for_every_image(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.01) as stub:
        stub.hold(after=4)
        proc = _start(images, out, stub)
        _wait_until(lambda: _lines(out) >= 4, "4 lines")
        stub.wait_held(CONCURRENCY)
        proc.send_signal(signal.SIGINT)
        _, stderr = communicate(proc, LIMIT)
        stub.release()
        assert proc.returncode == 130, stderr
        seen, reasons = _accounting(out)
        assert set(seen) == _all_images(images) and set(seen.values()) == {1}
        assert Counter(reasons.values()) == {"stopped": CONCURRENCY, "not_attempted": N_IMAGES - 4 - CONCURRENCY}
        rerun = _start(images, out, stub)
        _, stderr = communicate(rerun, LIMIT)
    assert rerun.returncode == 0, stderr
    _assert_complete(out, images)


def test_a_batch_run_that_stops_lists_its_pending_images(tmp_path: Path, stub: StubServer, caption) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, 10)
    stub.batch_get_faults = 1000  # every status check fails: the run gives up with the batches submitted
    batch_args = fast_args(stub, "--batch", "--poll-interval", "0.001", "--batch-max-requests", "5")
    result = caption(images, "-o", out, *batch_args)
    assert result.code == 3, result.stderr
    seen, reasons = _accounting(out)
    assert set(seen) == _all_images(images) and set(seen.values()) == {1}
    assert set(reasons.values()) == {"batch_pending"}
    assert "not attempted (run stopped): 10, listed in the errors file as batch_pending 10" in result.stderr

    stub.batch_get_faults = 0
    rerun = caption(images, "-o", out, *batch_args)
    assert rerun.code == 0, rerun.stderr
    assert stub.batch_create_attempts == 2  # collected, not paid for again
    assert len(read_jsonl(out)) == 10 and read_jsonl(out.with_name("out.errors.jsonl")) == []


def test_kill_9_of_a_preference_run_then_rerun_gives_each_image_one_pair(tmp_path: Path) -> None:
    """`--task preference`: killed while judge requests are held in flight, then rerun: every image one pair."""
    images, out = tmp_path / "images", tmp_path / "pairs.jsonl"
    make_images(images, N_IMAGES)
    with StubServer(latency=0.01) as judge, StubServer(latency=0.002, seed=1) as sampler:
        command = [*_command(images, out, judge), "--task", "preference", "--sampler-base-url", sampler.base_url,
                   "--sampler-model", "tiny", "--validation-retries", "12"]
        judge.hold(after=10)
        proc = popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
        _wait_until(lambda: _lines(out) >= 10, "10 pairs")
        judge.wait_held(CONCURRENCY)  # every worker is waiting on a verdict: killed mid-request
        proc.kill()
        proc.communicate()
        judge.release()
        assert len(read_jsonl(out)) == 10
        rerun = popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
        _, stderr = communicate(rerun, LIMIT)
    assert rerun.returncode == 0, stderr
    assert "skipped (already done): 10" in stderr
    records = read_jsonl(out)
    assert len(records) == N_IMAGES and len({r["id"] for r in records}) == N_IMAGES
    assert {r["image"] for r in records} == _all_images(images)
    assert all(r["chosen"] != r["rejected"] for r in records)
