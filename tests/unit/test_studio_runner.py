"""The studio's queue and record without training: a stand-in program instead of llava-kit, so the lifecycle (queue,
N at once, failure reasons, cancel, several steps, a server restart) is checked in seconds. Jobs end when the test
creates the file they wait for, and every assertion waits on the job's recorded state (with a timeout), never on a
sleep. tests/integration/test_studio_jobs.py runs the same lifecycle on tiny training runs."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

import pytest

from llava_kit.studio import JobRecord, Studio
from llava_kit.studio.runner import StudioBusyError, cancel_job, failure_reason, process_alive, terminate_process
from llava_kit.studio.runner import wait_for_job as wait
from llava_kit.studio.store import SCHEMA_VERSION, Store, StudioStoreError

# The stand-in for `python -m llava_kit.cli`: `wait-for FILE`, `fail`, `crash`, `say TEXT`, `metrics RUN_DIR N`.
FAKE_SCRIPT = r"""
import json, os, sys, time
command, *rest = sys.argv[1:]
if command == "wait-for":
    while not os.path.exists(rest[0]):
        time.sleep(0.02)
elif command == "fail":
    print("llava-kit train: error: 1 problem(s) in cfg.yaml:\n  - unknown key `trian`; did you mean `train`?",
          file=sys.stderr)
    sys.exit(2)
elif command == "crash":
    raise RuntimeError("boom")
elif command == "metrics":
    run_dir, steps = rest[0], int(rest[1])
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "progress.json"), "w") as f:
        json.dump({"step": steps, "max_steps": steps, "trained_tokens": 1234}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"loss": 3.0 / step, "learning_rate": 1e-3, "epoch": step / steps, "step": step}) + "\n")
        f.write(json.dumps({"train_runtime": 1.5, "train_loss": 2.0, "epoch": 1.0, "step": steps}) + "\n")
print("done:", " ".join(sys.argv[1:]))
"""
FAKE = (sys.executable, "-c", FAKE_SCRIPT)


@pytest.fixture
def studio(tmp_path):
    studio = Studio(tmp_path / "studio").start(max_jobs=1, program=FAKE, poll_s=0.05, cancel_grace_s=5)
    yield studio
    studio.close(cancel_running=True)


def job(*steps: list[str], kind: str = "eval", run_dir=None) -> JobRecord:
    return JobRecord(id=Store.new_id("job"), kind=kind, steps=list(steps), run_dir=run_dir and str(run_dir))


def wait_gone(record: JobRecord, timeout: float = 30) -> None:
    """Wait until a job's process has ended (exited or a zombie: the runner reaps its own children)."""
    deadline = time.monotonic() + timeout
    while process_alive(record.pid, record.pid_started):
        assert time.monotonic() < deadline, f"process {record.pid} still runs"
        time.sleep(0.02)


def events(studio: Studio, job_id: str) -> list[str]:
    return [e.message for e in studio.store.events(job_id, limit=100, newest_first=False)]


def test_the_queue_runs_one_job_at_a_time_in_order(studio, tmp_path):
    first = studio.submit(job(["wait-for", str(tmp_path / "first")]))
    second = studio.submit(job(["wait-for", str(tmp_path / "second")]))
    assert wait(studio.store, first.id, ("running",), timeout=30).pid
    assert studio.store.job(second.id).status == "queued"  # one slot, and the first holds it
    (tmp_path / "first").touch()
    assert wait(studio.store, first.id, timeout=30).status == "succeeded"
    assert wait(studio.store, second.id, ("running",), timeout=30).started_at >= studio.store.job(first.id).finished_at
    (tmp_path / "second").touch()
    done = wait(studio.store, second.id, timeout=30)
    assert done.status == "succeeded" and done.error is None
    assert "done: wait-for" in studio.log_tail(second.id)
    assert events(studio, second.id) == ["Job created: eval", "Job started", "The job has successfully completed"]


def test_several_jobs_run_at_once_when_allowed(tmp_path):
    studio = Studio(tmp_path / "studio").start(max_jobs=2, program=FAKE, poll_s=0.05)
    try:
        jobs = [studio.submit(job(["wait-for", str(tmp_path / "go")])) for _ in range(3)]
        for j in jobs[:2]:
            wait(studio.store, j.id, ("running",), timeout=30)
        assert studio.store.job(jobs[2].id).status == "queued"
        (tmp_path / "go").touch()
        assert all(wait(studio.store, j.id, timeout=30).status == "succeeded" for j in jobs)
    finally:
        studio.close(cancel_running=True)


def test_a_failing_step_fails_the_job_with_llava_kits_message(studio):
    failed = wait(studio.store, studio.submit(job(["fail"])).id, timeout=30)
    assert failed.status == "failed"
    assert failed.error.startswith("llava-kit train: error: 1 problem(s) in cfg.yaml:")
    assert "did you mean `train`?" in failed.error
    assert events(studio, failed.id)[-1].startswith("Job failed: llava-kit train: error:")


def test_a_crash_fails_the_job_with_the_exit_status_and_the_traceback(studio):
    failed = wait(studio.store, studio.submit(job(["crash"])).id, timeout=30)
    assert failed.status == "failed"
    assert "exit status 1" in failed.error and "RuntimeError: boom" in failed.error


def test_steps_run_in_turn_and_a_failed_step_stops_the_job(studio, tmp_path):
    done = wait(studio.store, studio.submit(job(["say", "one"], ["say", "two"])).id, timeout=30)
    assert done.status == "succeeded" and done.step == 1
    log = studio.log_tail(done.id)
    assert log.index("done: say one") < log.index("done: say two")
    stopped = wait(studio.store, studio.submit(job(["fail"], ["say", "never"])).id, timeout=30)
    assert stopped.status == "failed" and "done: say never" not in studio.log_tail(stopped.id)


def test_cancel_stops_a_running_job_and_drops_a_queued_one(studio, tmp_path):
    running = studio.submit(job(["wait-for", str(tmp_path / "never")]))
    queued = studio.submit(job(["wait-for", str(tmp_path / "never")]))
    record = wait(studio.store, running.id, ("running",), timeout=30)
    assert studio.cancel(queued.id).status == "cancelled"
    assert studio.cancel(running.id).status == "cancelled"
    wait_gone(record)  # the runner stops it (SIGTERM to its group)
    assert studio.store.job(running.id).status == "cancelled"  # its exit does not turn it into failed
    assert studio.store.job(queued.id).started_at is None
    with pytest.raises(ValueError, match="has already cancelled"):
        studio.cancel(running.id)


def test_a_cancel_from_another_process_is_kept(studio, tmp_path):
    """`llava-kit jobs cancel` (another process, here cancel_job on the same database) stops the process itself; the
    server's runner sees it end and leaves the job cancelled."""
    running = studio.submit(job(["wait-for", str(tmp_path / "never")]))
    wait(studio.store, running.id, ("running",), timeout=30)
    other = Store(studio.store.path)
    assert cancel_job(other, running.id, terminate=True, grace_s=5).status == "cancelled"
    after = studio.submit(job(["say", "next"]))  # the slot is free again
    assert wait(studio.store, after.id, timeout=30).status == "succeeded"
    assert studio.store.job(running.id).status == "cancelled"


def test_metrics_of_the_run_become_events_and_the_result_is_recorded(studio, tmp_path):
    run_dir = tmp_path / "run"
    done = wait(studio.store, studio.submit(job(["metrics", str(run_dir), "3"], kind="train", run_dir=run_dir)).id,
                timeout=30)
    assert done.status == "succeeded"
    messages = events(studio, done.id)
    assert "Step 1/3: training loss=3.0000" in messages and "Step 3/3: training loss=1.0000" in messages
    assert "Training finished: 3 steps in 1.5 s, mean loss 2.0000" in messages
    assert messages.index("Step 3/3: training loss=1.0000") < messages.index("The job has successfully completed")
    metrics = [e for e in studio.store.events(done.id, limit=100) if e.type == "metrics"]
    assert metrics[-1].data["train_loss"] == 3.0 and metrics[-1].data["total_steps"] == 3
    assert done.result["trained_tokens"] == 1234 and done.result["model_dir"] == str(run_dir)
    assert done.metrics_seen == 4


def test_a_restarted_server_reattaches_to_a_running_job(tmp_path):
    root, release = tmp_path / "studio", tmp_path / "release"
    studio = Studio(root).start(program=FAKE, poll_s=0.05)
    running = studio.submit(job(["wait-for", str(release)]))
    pid = wait(studio.store, running.id, ("running",), timeout=30).pid
    studio.close()  # the server goes away; the job's process does not
    assert process_alive(pid, studio.store.job(running.id).pid_started)

    restarted = Studio(root).start(program=FAKE, poll_s=0.05)
    try:
        assert restarted.store.job(running.id).status == "running"
        assert any("Re-attached" in m for m in events(restarted, running.id))
        release.touch()
        done = wait(restarted.store, running.id, timeout=30)
        assert done.status == "succeeded"  # its exit status read from the file its sh wrote
    finally:
        restarted.close(cancel_running=True)


def test_a_restarted_server_marks_a_vanished_job_failed_and_settles_one_that_ended(tmp_path):
    root = tmp_path / "studio"
    studio = Studio(root).start(program=FAKE, poll_s=0.05)
    vanished = studio.submit(job(["wait-for", str(tmp_path / "never")]))
    record = wait(studio.store, vanished.id, ("running",), timeout=30)
    ended = studio.submit(job(["wait-for", str(tmp_path / "release")]))
    studio.close()
    studio = Studio(root).start(max_jobs=2, program=FAKE, poll_s=0.05)
    ended_record = wait(studio.store, ended.id, ("running",), timeout=30)
    studio.close()
    terminate_process(record.pid, record.pid_started, grace_s=5)  # killed while no server watched
    (tmp_path / "release").touch()  # ...and this one finished meanwhile
    wait_gone(ended_record)

    restarted = Studio(root).start(program=FAKE, poll_s=0.05)
    try:
        failed = restarted.store.job(vanished.id)
        assert failed.status == "failed"
        assert failed.error == f"the server restarted and the process is gone (pid {record.pid})"
        assert restarted.store.job(ended.id).status == "succeeded"
    finally:
        restarted.close(cancel_running=True)


def test_one_server_runs_a_studio_at_a_time(studio):
    with pytest.raises(StudioBusyError, match="already run by pid"):
        Studio(studio.root).start(program=FAKE)


def test_a_result_hook_that_fails_fails_the_job(studio, tmp_path):
    run_dir = tmp_path / "run"
    train_job = job(["metrics", str(run_dir), "1"], kind="train", run_dir=run_dir)
    studio.runner.on_success = lambda j: (_ for _ in ()).throw(OSError("disk full"))
    failed = wait(studio.store, studio.submit(train_job).id, timeout=30)
    assert failed.status == "failed" and failed.error == "disk full"
    studio.runner.on_success = lambda j: {}["bug"]
    failed = wait(studio.store, studio.submit(job(["say", "x"])).id, timeout=30)
    assert failed.status == "failed" and failed.error == "internal error: KeyError('bug')"


def test_the_store_refuses_a_newer_schema_and_moves_jobs_only_from_the_states_named(tmp_path):
    store = Store(tmp_path / "studio.db")
    record = store.add_job(job(["say", "x"]))
    assert not store.transition(record.id, ("running",), "succeeded")
    assert store.transition(record.id, ("queued",), "running")
    assert store.transition(record.id, ("running",), "cancelled", event="Job cancelled")
    assert not store.transition(record.id, ("running",), "failed")
    assert store.job(record.id).status == "cancelled" and store.job(record.id).finished_at
    with sqlite3.connect(store.path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StudioStoreError, match="newer than this llava-kit"):
        Store(tmp_path / "studio.db")
    (tmp_path / "junk.db").write_bytes(os.urandom(4096))
    with pytest.raises(StudioStoreError, match="not a usable studio database"):
        Store(tmp_path / "junk.db")


def test_failure_reason_prefers_llava_kits_message(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("INFO loading\nTraceback (most recent call last):\n  ...\nKeyError: 'x'\n")
    assert failure_reason(log, 1).startswith("the process ended with exit status 1; the log ends:")
    assert failure_reason(log, -9).startswith("the process ended with killed by SIGKILL")
    log.write_text("INFO x\nllava-kit merge: error: RUN_DIR 'r' does not exist\n")
    assert failure_reason(log, 2) == "llava-kit merge: error: RUN_DIR 'r' does not exist"
    assert json.loads(json.dumps(failure_reason(tmp_path / "missing", None)))  # no log: still a reason


def test_a_log_tail_shows_each_progress_bar_once_at_its_latest_state(tmp_path):
    from llava_kit.studio.runner import tail

    log = tmp_path / "job.log"
    log.write_text("loading\nsft:  10%|#  | 1/10\rsft:  50%|##### | 5/10\rsft: 100%|##########| 10/10\n"
                   "{'loss': 0.5}\n\neval:  20%|##  | 1/5\reval:  40%|####  | 2/5")
    assert tail(log) == ["loading", "sft: 100%|##########| 10/10", "{'loss': 0.5}", "eval:  40%|####  | 2/5"]
    assert tail(log, 2) == ["{'loss': 0.5}", "eval:  40%|####  | 2/5"] and tail(tmp_path / "none.log") == []


def test_metrics_entries_become_events_worded_for_people():
    from llava_kit.studio.runner import metrics_event

    assert metrics_event({"loss": 5.80114, "step": 1, "learning_rate": 1e-3}, 4)[0] == "Step 1/4: training loss=5.8011"
    assert metrics_event({"train_runtime": 3.25, "train_loss": 5.5, "step": 4}, 4)[0] == \
        "Training finished: 4 steps in 3.2 s, mean loss 5.5000"
    assert metrics_event({"final_weights": "last", "step": 4}, 4)[0] == "Final weights: the last step's (4)"
    assert metrics_event({"final_weights": "best", "checkpoint": "checkpoint-2", "step": 2, "eval_loss": 0.5}, 4)[0] \
        == "Final weights: the best checkpoint, checkpoint-2 at step 2 (eval loss 0.5000)"
