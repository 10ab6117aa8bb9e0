"""`--batch`: request files within limits, submit, poll, collect by custom_id, resume without paying twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
from dg_support import API_KEY, RED, fast_args, is_red, make_images, read_jsonl

from data_gen.batch import BatchOptions, _submit, state_path
from data_gen.client import ClientOptions
from data_gen.run import Job, RunOptions
from data_gen.testing.stub_server import StubServer


def _batch_args(stub: StubServer, *extra: str) -> list[str]:
    return fast_args(stub, "--batch", "--poll-interval", "0.01", *extra)


def test_batch_splits_collects_out_of_order_and_validates(tmp_path: Path, caption) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, 10)
    make_images(images, 1, start=90, colour=RED)
    with StubServer(batch_polls=2) as stub:
        stub.rule = lambda body: "refusal" if is_red(body) else None
        stub.enqueue("ok", "500")  # the second request of the first batch fails inside the batch
        result = caption(images, "-o", out, *_batch_args(stub, "--batch-max-requests", "4"))
        assert result.code == 1, result.stderr
        assert len(stub.batches) == 3  # 11 requests, at most 4 per file
        for batch in stub.batches.values():
            lines = stub.files[batch["input_file_id"]].decode().splitlines()
            assert 1 <= len(lines) <= 4
            for line in lines:
                request = json.loads(line)
                assert request["method"] == "POST" and request["url"] == "/v1/chat/completions"
                assert request["body"]["response_format"]["type"] == "json_schema"
        records = read_jsonl(out)
        errors = {e["image"]: e["reason"] for e in read_jsonl(tmp_path / "out.errors.jsonl")}
        assert sorted(errors.values()) == ["refusal", "server_error"]
        assert errors["nested/img_090.png"] == "refusal"
        assert len(records) == 9 and not set(errors) & {r["image"] for r in records}
        assert not state_path(out).exists()  # everything collected
        assert "tokens used: 1000 prompt" in result.stderr  # usage of the 10 answers (the 500 has none)

        # A rerun with --batch resubmits exactly the two failures.
        failed_ids = sorted(e["id"] for e in read_jsonl(tmp_path / "out.errors.jsonl"))
        stub.rule = None
        before = set(stub.batches)
        rerun = caption(images, "-o", out, *_batch_args(stub))
        assert rerun.code == 0, rerun.stderr
        new = [stub.batches[b] for b in set(stub.batches) - before]
        assert len(new) == 1
        resubmitted = [json.loads(line)["custom_id"] for line in stub.files[new[0]["input_file_id"]].splitlines()]
        assert sorted(resubmitted) == failed_ids
    assert len(read_jsonl(out)) == 11 and read_jsonl(tmp_path / "out.errors.jsonl") == []


def test_batch_files_respect_the_byte_limit(tmp_path: Path, caption) -> None:
    make_images(tmp_path / "images", 3)
    with StubServer() as stub:
        result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *_batch_args(stub, "--batch-max-bytes",
                                                                                          "3000"))
        assert result.code == 0, result.stderr
        sizes = [len(stub.files[b["input_file_id"]]) for b in stub.batches.values()]
    assert len(sizes) == 3 and max(sizes) <= 3000  # one ~1.9 kB request per file


def test_rerun_after_a_crash_collects_instead_of_resubmitting(tmp_path: Path, caption) -> None:
    images, out = tmp_path / "images", tmp_path / "out.jsonl"
    make_images(images, 5)
    with StubServer() as stub:
        # What a run killed after submitting leaves behind: batches on the server, their ids in the state file.
        job = Job.open(RunOptions(images, out, progress=False), "gpt-4o")

        async def submit_only() -> None:
            client = openai.AsyncOpenAI(api_key=API_KEY, base_url=stub.base_url)
            try:
                await _submit(job, client, ClientOptions(model="gpt-4o"), BatchOptions(max_requests=3), [])
            finally:
                await client.close()

        asyncio.run(submit_only())
        job.close()
        assert len(stub.batches) == 2 and state_path(out).exists()

        warned = caption(images, "-o", out, *fast_args(stub, "--limit", "0"))
        assert "still pending" in warned.stderr and "--batch" in warned.stderr

        result = caption(images, "-o", out, *_batch_args(stub))
        assert result.code == 0, result.stderr
        assert len(stub.batches) == 2  # nothing submitted twice
        assert "not resubmitting" in result.stderr
    assert len(read_jsonl(out)) == 5 and not state_path(out).exists()


@pytest.mark.parametrize("outcome", ["expired", "failed"])
def test_batches_that_end_without_results_are_reported(tmp_path: Path, caption, outcome: str) -> None:
    make_images(tmp_path / "images", 3)
    with StubServer() as stub:
        stub.batch_outcome = outcome
        result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *_batch_args(stub))
    assert result.code == 1
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert len(errors) == 3 and {e["reason"] for e in errors} == {f"batch_{outcome}"}
    if outcome == "failed":
        assert "stub: batch failed" in errors[0]["detail"]


def test_status_check_hiccups_do_not_stop_a_batch(tmp_path: Path, caption) -> None:
    make_images(tmp_path / "images", 2)
    with StubServer() as stub:
        stub.batch_get_faults = 3
        result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *_batch_args(stub))
        assert stub.batch_get_faults == 0
    assert result.code == 0, result.stderr
    assert result.stderr.count("trying again at the next poll") == 3
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2


@pytest.mark.parametrize(("fault", "message"), [("500", "the Batch API failed"), ("insufficient_quota", "no quota")])
def test_batch_creation_is_never_retried_blindly(tmp_path: Path, caption, fault: str, message: str) -> None:
    make_images(tmp_path / "images", 2)
    with StubServer() as stub:
        stub.batch_create_fault = fault
        result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *_batch_args(stub))
        assert stub.batch_create_attempts == 1  # a retried create could start a second, paid batch
        input_file = next(iter(stub.files))
    assert result.code == 3
    assert message in result.stderr and f"input file {input_file}" in result.stderr
    assert "Traceback" not in result.stderr
