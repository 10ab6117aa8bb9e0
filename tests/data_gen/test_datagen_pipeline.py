"""`llava-kit caption` end to end against the stub server, through the real openai client."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from dg_support import API_KEY, RED, fast_args, is_red, make_images, read_jsonl

from data_gen.testing.stub_server import StubServer

N_IMAGES = 24


def _check_records(records: list[dict[str, Any]], image_dir: Path) -> None:
    """Every record is a well-formed LLaVA sample pointing at an existing image."""
    for record in records:
        assert set(record) >= {"id", "image", "conversations", "task", "model", "sha256"}
        assert (image_dir / record["image"]).is_file()
        conv = record["conversations"]
        assert [turn["from"] for turn in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(turn["value"].count("<image>") for turn in conv) == 1
        assert all(turn["value"].strip() for turn in conv)


def _accounting(out: Path) -> tuple[Counter, dict[str, str]]:
    """(how often each image appears across dataset + errors file, reason per image in the errors file)."""
    seen: Counter = Counter()
    for record in read_jsonl(out):
        seen[record["image"]] += 1
    reasons = {}
    for error in read_jsonl(out.with_name("out.errors.jsonl")):
        seen[error["image"]] += 1
        reasons[error["image"]] = error["reason"]
        assert error["reason"] and "detail" in error
    return seen, reasons


def test_every_image_ends_exactly_once_in_dataset_or_errors(tmp_path: Path, stub: StubServer, caption) -> None:
    images = tmp_path / "images"
    make_images(images, N_IMAGES)
    make_images(images / "red", 2, start=100, colour=RED)  # the stub refuses these every time
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "zz_copy.png").write_bytes((images / "img_001.png").read_bytes())
    out = tmp_path / "out.jsonl"
    every_fault = ["429", "500", "503", "hang", "drop", "malformed", "empty_choices", "refusal", "refusal_text",
                   "length", "leak", "empty"]
    stub.enqueue(*every_fault)
    stub.rule = lambda body: "refusal" if is_red(body) else None

    # retry budgets above the number of queued faults: only the red images may fail, whatever the interleaving
    result = caption(images, "-o", out, *fast_args(stub, "--concurrency", "4", "--max-retries", "8",
                                                   "--validation-retries", "6"))

    assert result.code == 1, result.stderr  # some images failed: a rerun is needed
    assert "Traceback" not in result.stderr
    seen, reasons = _accounting(out)
    all_images = {p.relative_to(images).as_posix() for p in images.rglob("*.png")}
    assert set(seen) == all_images and set(seen.values()) == {1}, seen
    assert reasons == {"red/img_100.png": "refusal", "red/img_101.png": "refusal", "broken.png": "unreadable",
                       "zz_copy.png": "duplicate"}
    records = read_jsonl(out)
    assert len(records) == N_IMAGES
    _check_records(records, images)
    assert len({r["id"] for r in records}) == N_IMAGES
    assert all(stub.count(f) >= 1 for f in every_fault)  # every fault was really served
    assert "failed by reason: " in result.stderr and "refusal 2" in result.stderr
    answered = stub.count() - sum(stub.count(f) for f in ("429", "500", "503", "hang", "drop", "malformed"))
    assert f"tokens used: {100 * answered} prompt + {20 * answered} completion" in result.stderr

    # The refusals were temporary: the rerun retries only what failed and leaves the rest alone.
    stub.rule = None
    before = stub.count()
    rerun = caption(images, "-o", out, *fast_args(stub))
    assert rerun.code == 0, rerun.stderr
    assert stub.count() - before == 2
    seen, reasons = _accounting(out)
    assert set(seen) == all_images and set(seen.values()) == {1}
    assert reasons == {"broken.png": "unreadable", "zz_copy.png": "duplicate"}
    assert "skipped (already done): 24" in rerun.stderr


def test_retry_after_pauses_every_worker(tmp_path: Path, caption) -> None:
    make_images(tmp_path / "images", 30)  # without the pause, the others would go on through the window
    with StubServer(latency=0.02, retry_after=0.6) as stub:
        stub.enqueue("429")
        result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl",
                         *fast_args(stub, "--concurrency", "3", "--timeout", "2"))
        assert result.code == 0, result.stderr
        requests = list(stub.requests)
    t429 = requests[0]["time"]
    assert requests[0]["fault"] == "429"
    # The other workers' requests already on the wire may land just after the 429; after the client has
    # seen it (one latency later, plus slack) nobody may start until Retry-After has passed.
    during = [r["time"] - t429 for r in requests[1:] if 0.1 < r["time"] - t429 < 0.6]
    assert during == []
    assert sum(1 for r in requests if r["time"] - t429 >= 0.6) >= 25  # the retry and the images left
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 30


def test_rpm_limit_spaces_requests(tmp_path: Path, stub: StubServer, caption) -> None:
    make_images(tmp_path / "images", 5)
    result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *fast_args(stub, "--concurrency", "5",
                                                                                     "--rpm", "600"))
    assert result.code == 0, result.stderr
    times = sorted(r["time"] for r in stub.requests)
    assert times[-1] - times[0] >= 0.35  # 5 starts, 100 ms apart at 600 rpm


@pytest.mark.parametrize(("fault", "message"), [
    ("insufficient_quota", "no quota left"),
    ("401", "authentication failed"),
    ("404", "not found"),
    ("403", "permission denied"),
])
def test_fatal_errors_stop_at_once(tmp_path: Path, caption, fault: str, message: str) -> None:
    make_images(tmp_path / "images", 30)
    out = tmp_path / "out.jsonl"
    with StubServer(latency=0.02) as stub:
        stub.enqueue(fault)
        start = time.monotonic()
        result = caption(tmp_path / "images", "-o", out, *fast_args(stub, "--concurrency", "2", "--max-retries", "5"))
        elapsed = time.monotonic() - start
        requests = stub.count()
    assert result.code == 3
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "stopped:" in result.stderr
    assert requests <= 3  # the fatal answer plus what was already in flight: no retries, no new requests
    assert elapsed < 5
    done = len(read_jsonl(out))
    assert done <= 2
    assert API_KEY not in result.stderr
    assert f"not attempted (run stopped): {30 - done}" in result.stderr


def test_retries_are_reported_only_when_they_happened(tmp_path: Path, stub: StubServer, caption) -> None:
    make_images(tmp_path / "images", 3)
    stub.enqueue("500")
    result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl",
                     *fast_args(stub, "--max-retries", "0", "--concurrency", "1"))
    assert result.code == 1, result.stderr
    assert "failed by reason: server_error 1" in result.stderr
    assert "retries by reason" not in result.stderr  # --max-retries 0: nothing was retried

    stub.enqueue("500")
    result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl",
                     *fast_args(stub, "--max-retries", "1", "--concurrency", "1"))
    assert result.code == 0, result.stderr
    assert "retries by reason: server_error 1" in result.stderr


def test_unreachable_server_is_fatal(tmp_path: Path, caption) -> None:
    make_images(tmp_path / "images", 3)
    with StubServer() as stub:
        dead_url = stub.base_url  # the port is closed once the server stops
    result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl",
                     *fast_args(stub, "--base-url", dead_url, "--max-retries", "1"))
    assert result.code == 3
    assert "no request to" in result.stderr and "Check --base-url" in result.stderr


def test_api_key_is_never_written(tmp_path: Path, caption) -> None:
    make_images(tmp_path / "images", 6)
    out = tmp_path / "out.jsonl"
    outputs = []
    with StubServer() as stub:
        stub.enqueue("500", "refusal", "refusal", "refusal")
        outputs.append(caption(tmp_path / "images", "-o", out, *fast_args(stub, "--validation-retries", "1",
                                                                             "--concurrency", "1",
                                                                             "--export", "sharegpt",
                                                                             "--export", "llava-json")))
        outputs.append(caption(tmp_path / "images", "-o", out, *fast_args(stub, "--batch", "--poll-interval", "0.01")))
        stub.enqueue("401")  # the stub's 401 echoes the key in its message, like a careless server
        make_images(tmp_path / "images", 2, start=50)
        outputs.append(caption(tmp_path / "images", "-o", out, *fast_args(stub)))
        assert all(r["auth"] == API_KEY for r in stub.requests if not r.get("batch"))  # the key reached the server
    assert [r.code for r in outputs] == [1, 0, 3]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.suffix == ".png"]
    assert {p.name for p in written} >= {"out.jsonl", "out.errors.jsonl", "out.llava.json", "out.sharegpt.json",
                                         "dataset_info.json"}
    for path in written:
        assert API_KEY.encode() not in path.read_bytes(), path
    for result in outputs:
        assert API_KEY not in result.stderr


def test_dry_run_estimates_and_writes_nothing(tmp_path: Path, stub: StubServer, caption) -> None:
    make_images(tmp_path / "images", 4)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "sub" / "out.jsonl"
    result = caption(tmp_path / "images", "-o", out, "--model", "gpt-4o", "--dry-run", "--detail", "low")
    assert result.code == 0
    assert "to caption: 4" in result.stderr and "unreadable: 1" in result.stderr
    # 4 low-detail images: 85 tokens each plus the prompt text
    tokens = int(result.stderr.split("estimated tokens: ")[1].split(" input")[0])
    assert 4 * 85 < tokens < 4 * 85 + 4 * 400
    assert "estimated cost: $" in result.stderr
    assert not (tmp_path / "sub").exists() and stub.count() == 0

    priced = caption(tmp_path / "images", "-o", out, "--model", "my-local-vlm", "--dry-run", "--price", "1000,1000")
    assert "estimated cost: $" in priced.stderr and "$0.00" not in priced.stderr
    unknown = caption(tmp_path / "images", "-o", out, "--model", "my-local-vlm", "--dry-run")
    assert "no price for model 'my-local-vlm'" in unknown.stderr

    caption(tmp_path / "images", "-o", out, *fast_args(stub, "--limit", "3"))
    after = caption(tmp_path / "images", "-o", out, "--model", "gpt-4o", "--dry-run")
    assert "already done: 3; to caption: 1" in after.stderr


def test_progress_bar_shows_rate_and_eta(tmp_path: Path, stub: StubServer, caption) -> None:
    make_images(tmp_path / "images", 4)
    args = [a for a in fast_args(stub) if a != "--no-progress"]
    result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *args)
    assert result.code == 0
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("captioning")][-1]
    assert "4/4" in bar and "img/s" in bar and "<" in bar  # elapsed<remaining, then the rate


@pytest.mark.parametrize("task", ["detail", "conversation", "reasoning"])
def test_other_tasks_and_text_only_servers(tmp_path: Path, caption, task: str) -> None:
    make_images(tmp_path / "images", 3)
    out = tmp_path / "out.jsonl"
    with StubServer(formats=()) as stub:  # no structured output at all: prose answers are parsed
        result = caption(tmp_path / "images", "-o", out, *fast_args(stub, "--task", task))
    assert result.code == 0, result.stderr
    records = read_jsonl(out)
    assert len(records) == 3 and all(r["task"] == task for r in records)
    _check_records(records, tmp_path / "images")
    if task == "conversation":
        assert all(len(r["conversations"]) >= 4 for r in records)


@pytest.mark.parametrize(("args", "message"), [
    (["missing_dir", "-o", "{tmp}/o.jsonl", "--model", "m"], "is not a folder"),
    (["{tmp}", "-o", "{tmp}", "--model", "m"], "is a folder"),
    (["{tmp}", "-o", "{tmp}/o.jsonl"], "--model is required"),
    (["{tmp}", "-o", "{tmp}/o.jsonl", "--model", "m", "--concurrency", "0"], "--concurrency 0: must be at least 1"),
    (["{tmp}", "-o", "{tmp}/o.jsonl", "--model", "m", "--timeout", "-1"], "--timeout -1.0: must be a positive"),
    (["{tmp}", "-o", "{tmp}/o.jsonl", "--model", "m", "--price", "cheap"], "expected INPUT,OUTPUT"),
    (["{tmp}", "-o", "{tmp}/o.jsonl", "--model", "m", "--prompt-file", "{tmp}/nope.txt"], "does not exist"),
    (["{tmp}", "-o", "{tmp}/o.jsonl", "--model", "m"], "OPENAI_API_KEY is not set"),
    (["{tmp}", "-o", "{tmp}/o.jsonl", "--export-only"], "needs at least one --export"),
])
def test_user_errors_are_clear(tmp_path: Path, caption, monkeypatch: pytest.MonkeyPatch, args: list[str],
                               message: str) -> None:
    make_images(tmp_path, 1)
    if "OPENAI_API_KEY" in message:
        monkeypatch.delenv("OPENAI_API_KEY")
    result = caption(*[a.format(tmp=tmp_path) for a in args])
    assert result.code == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_exports_for_llava_and_llama_factory(tmp_path: Path, stub: StubServer, caption) -> None:
    images = tmp_path / "images"
    make_images(images, 5)
    out = tmp_path / "data" / "caps.jsonl"
    assert caption(images, "-o", out, *fast_args(stub)).code == 0
    result = caption(images, "-o", out, "--export-only", "--export", "llava-json", "--export", "sharegpt",
                     "--dataset-name", "my_caps")
    assert result.code == 0, result.stderr
    assert stub.count() == 5  # exporting sends nothing

    records = read_jsonl(out)
    llava = json.loads((tmp_path / "data" / "caps.llava.json").read_text())
    assert llava == [{"id": r["id"], "image": r["image"], "conversations": r["conversations"]} for r in records]

    sharegpt = json.loads((tmp_path / "data" / "caps.sharegpt.json").read_text())
    assert len(sharegpt) == 5
    for row in sharegpt:
        text = "".join(turn["value"] for turn in row["conversations"])
        assert text.count("<image>") == len(row["images"]) == 1
        assert (tmp_path / "data" / row["images"][0]).resolve().is_file()  # relative to the dataset_info folder
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    assert info["my_caps"]["file_name"] == "caps.sharegpt.json"
    assert info["my_caps"]["formatting"] == "sharegpt"
    assert info["my_caps"]["columns"] == {"messages": "conversations", "images": "images"}


def test_every_option_is_documented_and_help_is_fast() -> None:
    import argparse

    from data_gen.cli import add_caption_arguments

    parser = argparse.ArgumentParser()
    add_caption_arguments(parser)
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    import data_gen.cli
    import data_gen.export
    import data_gen.images

    # cli keeps its own copies of these (so that --help imports neither PIL nor export): they must agree
    assert data_gen.cli.DETAILS == data_gen.images.DETAILS
    assert data_gen.cli.EXPORT_FORMATS == data_gen.export.EXPORT_FORMATS
    options = {o for a in parser._actions for o in a.option_strings}
    assert {"--model", "--base-url", "--task", "--concurrency", "--rpm", "--timeout", "--max-retries", "--api-key-env",
            "--detail", "--dry-run", "--batch", "--prompt-file", "--seed", "--export"} <= options


def test_empty_folder_is_reported(tmp_path: Path, stub: StubServer, caption) -> None:
    (tmp_path / "images").mkdir()
    result = caption(tmp_path / "images", "-o", tmp_path / "out.jsonl", *fast_args(stub))
    assert result.code == 0 and "no images" in result.stderr and stub.count() == 0
