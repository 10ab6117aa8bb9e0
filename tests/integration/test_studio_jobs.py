"""The studio's job lifecycle on tiny training runs (real `llava-kit` subprocesses): queued -> running -> succeeded
(and a server restart in the middle), failed (a config error, bad data), cancelled. Every assertion waits on the
job's recorded state with a timeout, never on a sleep. tests/unit/test_studio_runner.py checks the same machinery
with a stand-in program, in seconds."""

from __future__ import annotations

import json
import time

import pytest

from llava_kit.errors import ConfigError
from llava_kit.studio import JobRecord, Store, Studio
from llava_kit.studio.runner import process_alive, wait_for_job
from tests.integration.conftest import tiny_config


@pytest.fixture
def studio(tmp_path):
    studio = Studio(tmp_path / "studio").start(poll_s=0.1)
    yield studio
    studio.close(cancel_running=True)


def messages(studio: Studio, job_id: str) -> list[str]:
    return [e.message for e in studio.store.events(job_id, limit=200, newest_first=False)]


@pytest.mark.slow
def test_a_tiny_run_succeeds_across_a_server_restart(tiny_dirs, tmp_path):
    root = tmp_path / "studio"
    studio = Studio(root).start(poll_s=0.1)
    job = studio.submit_train(tiny_config(tiny_dirs, "unused", **{"train.max_steps": 4}), label="tiny")
    assert studio.store.job(job.id).status in ("queued", "running")
    running = wait_for_job(studio.store, job.id, ("running",), timeout=60)
    studio.close()  # the server goes away while the run is still starting up
    assert process_alive(running.pid, running.pid_started)

    restarted = Studio(root).start(poll_s=0.1)
    try:
        assert any("Re-attached" in m for m in messages(restarted, job.id))
        done = wait_for_job(restarted.store, job.id, timeout=600)
        assert done.status == "succeeded", done.error
        events = messages(restarted, job.id)
        assert [m for m in events if m.startswith("Step ")] == [f"Step {i}/4: training loss={loss:.4f}" for i, loss in
                                                                enumerate(_losses(done.run_dir), 1)]
        assert events[-2:] == [f"New fine-tuned model created: ft:tiny:{job.id}", "The job has successfully completed"]
        assert done.result["fine_tuned_model"] == f"ft:tiny:{job.id}" and done.result["trained_tokens"] > 0
        assert restarted.fine_tuned_models() == {f"ft:tiny:{job.id}": restarted.run_dir(job.id)}
        assert json.loads((restarted.run_dir(job.id) / "progress.json").read_text())["step"] == 4
    finally:
        restarted.close(cancel_running=True)


def _losses(run_dir: str) -> list[float]:
    from llava_kit.studio.runner import read_metrics

    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def test_a_config_error_is_refused_before_queueing_or_fails_the_job(studio, tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size"):
        studio.submit_train(tiny_config(tiny_dirs, "unused", **{"train.micro_batch_size": 0}))
    assert studio.store.jobs() == []
    # a config that changed on disk after it was checked fails in the run, with llava-kit's own message
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: pretrain\ntrian: {max_steps: 2}\n")
    job = studio.submit(JobRecord(id=Store.new_id("job"), kind="train", steps=[["train", str(bad)]]))
    failed = wait_for_job(studio.store, job.id, timeout=120)
    assert failed.status == "failed"
    assert failed.error.startswith("llava-kit train: error:") and "did you mean `train`?" in failed.error


def test_bad_data_fails_the_job_with_the_reason(studio, tiny_dirs, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]}]))
    job = studio.submit_train(tiny_config(tiny_dirs, "unused", **{"data.path": str(data)}), label="bad-data")
    failed = wait_for_job(studio.store, job.id, timeout=300)
    assert failed.status == "failed"
    assert failed.error.startswith("llava-kit train: error:") and "image not found" in failed.error
    assert messages(studio, job.id)[-1].startswith("Job failed: llava-kit train: error:")


def test_cancelling_a_running_run_stops_its_process(studio, tiny_dirs):
    job = studio.submit_train(tiny_config(tiny_dirs, "unused", **{"train.max_steps": 10_000}), label="long")
    running = wait_for_job(studio.store, job.id, ("running",), timeout=60)
    assert studio.cancel(job.id).status == "cancelled"
    wait_gone(running)  # SIGTERM to its process group (the runner's thread)
    cancelled = studio.store.job(job.id)
    assert cancelled.status == "cancelled" and cancelled.error == "cancelled while running"
    assert "Job cancelled; its process is being stopped" in messages(studio, job.id)


def wait_gone(job: JobRecord, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(job.pid, job.pid_started):
        assert time.monotonic() < deadline, f"process {job.pid} of {job.id} still runs"
        time.sleep(0.05)
