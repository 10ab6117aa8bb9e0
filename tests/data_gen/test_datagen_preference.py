"""`llava-kit caption --task preference`: answers drawn from one endpoint, judged by another, written as pairs.

Two stub servers stand in for the sampled model (`llava-kit serve`) and the vision API judge; every image ends once
in the output or once in the errors file, whatever the faults, and a rerun finishes the rest.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from dg_support import fast_args, make_images, read_jsonl

from data_gen.preference import distinct_answers, parse_verdict
from data_gen.prompts import AnswerError, get_task
from data_gen.testing.stub_server import StubServer


def _args(judge: StubServer, sampler: StubServer, *extra: str) -> list[str]:
    # validation retries: the stub draws each answer from four sentences, so an attempt whose samples all agree
    # (1 in 64 with 4 samples) is asked again rather than failed
    return [*fast_args(judge, "--task", "preference", "--sampler-base-url", sampler.base_url, "--sampler-model",
                       "tiny", "--validation-retries", "12"), *extra]


def _accounted(out: Path) -> Counter:
    seen = Counter(r["image"] for r in read_jsonl(out))
    seen.update(e["image"] for e in read_jsonl(out.with_name(out.stem + ".errors.jsonl")))
    return seen


@pytest.fixture
def sampler():
    with StubServer(latency=0.002, retry_after=0.05, hang_seconds=1.0, seed=1) as server:
        yield server


# -- the judge's verdict ----------------------------------------------------------------------------


def test_a_verdict_names_distinct_best_and_worst_answers():
    verdict = parse_verdict('```json\n{"scores": [3, 9, 6], "best": 2, "worst": 1, "reason": "1 invents a cat"}```', 3)
    assert (verdict.best, verdict.worst, verdict.scores, verdict.reason) == (1, 0, [3, 9, 6], "1 invents a cat")


@pytest.mark.parametrize("text, reason", [
    ('{"scores": [5, 5], "best": 1, "worst": 1, "reason": ""}', "no_preference"),  # the same answer twice
    ('{"scores": [5, 5], "best": 1, "worst": 2, "reason": ""}', "no_preference"),  # a tie in the scores
    ('{"scores": [5, 2], "best": 1, "worst": 3, "reason": ""}', "malformed_json"),  # no answer 3
    ('{"scores": [5], "best": 1, "worst": 2, "reason": ""}', "malformed_json"),  # a score missing
    ('{"scores": [5, 2], "best": "1", "worst": 2}', "malformed_json"),
    ("Answer 1 is better.", "malformed_json"),
])
def test_an_unusable_verdict_is_refused_with_its_reason(text, reason):
    with pytest.raises(AnswerError) as info:
        parse_verdict(text, 2)
    assert info.value.reason == reason


def test_drawn_answers_are_judged_once_each_and_refusals_are_dropped():
    answers = ["A red circle.", "I'm sorry, I cannot see the image.", "A red circle.", "A blue square.", ""]
    assert distinct_answers(answers) == ["A red circle.", "A blue square."]


def test_a_prompt_file_holds_the_questions_asked_of_the_sampled_model(tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("What shape is it?\n\nWhat colour is it?\n")
    task = get_task("preference", questions)
    assert task.questions == ("What shape is it?", "What colour is it?") and task.label.startswith("preference-")
    assert get_task("preference").label == "preference"  # results of the default questions are kept apart


# -- runs -------------------------------------------------------------------------------------------


def test_each_image_gives_one_pair_from_its_own_samples(tmp_path, stub, sampler, caption):
    images, out = tmp_path / "images", tmp_path / "pairs.jsonl"
    make_images(images, 6)
    result = caption(images, "-o", out, *_args(stub, sampler, "--samples", "3"))
    assert result.code == 0, result.stderr
    records = read_jsonl(out)
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    for record in records:
        assert record["chosen"] != record["rejected"]
        assert record["chosen"] in record["samples"] and record["rejected"] in record["samples"]
        assert record["question"] and record["task"] == "preference" and record["sampler"] == "tiny"
        assert max(record["scores"]) == record["scores"][record["samples"].index(record["chosen"])]
    asked = [r["body"] for r in sampler.requests]
    assert all("response_format" not in body and body["temperature"] == 1.0 for body in asked)  # plain answers
    assert all(body["messages"][0]["content"][0]["text"] in {r["question"] for r in records} for body in asked)
    judged = [r["body"] for r in stub.requests]
    assert len(judged) >= 6 and all('"best": N' in body["messages"][0]["content"][0]["text"] for body in judged)
    assert "sampled model's tokens:" in result.stderr
    from llava_kit.data.readers.preference import read_pairs  # the dpo stage reads the file as it is

    pairs = read_pairs([str(out)], "auto", "dpo")
    assert pairs.bad == [] and pairs.formats == {"pairs.jsonl": {"rlaif-v": 6}}
    assert {p.chosen["content"] for p in pairs.pairs} == {r["chosen"] for r in records}

    again = caption(images, "-o", out, *_args(stub, sampler))
    assert again.code == 0 and "skipped (already done): 6" in again.stderr and len(read_jsonl(out)) == 6


def test_faults_on_either_side_leave_every_image_accounted_for_once(tmp_path, stub, sampler, caption):
    images, out = tmp_path / "images", tmp_path / "pairs.jsonl"
    make_images(images, 12)
    sampler.enqueue("500", "drop", "ok", "refusal_text", "503", "empty", "malformed")
    stub.enqueue("429", "malformed", "ok", "refusal", "500", "hang")
    result = caption(images, "-o", out, *_args(stub, sampler, "--max-retries", "8", "--concurrency", "3"))
    assert result.code == 0, result.stderr
    assert set(_accounted(out).values()) == {1} and len(_accounted(out)) == 12, result.stderr
    retries = next(line for line in result.stderr.splitlines() if "retries by reason:" in line)
    # which sampler fault an attempt reports depends on which of its requests met one: any of them, named as such
    assert "rate_limited" in retries and re.search(r"sampler_(server_error|connection_error|malformed)", retries)


def test_a_sampler_that_fails_for_good_fails_its_images_with_the_reason_and_a_rerun_finishes(tmp_path, stub, sampler,
                                                                                           caption):
    images, out = tmp_path / "images", tmp_path / "pairs.jsonl"
    make_images(images, 5)
    sampler.rule = lambda body: "500"
    first = caption(images, "-o", out, *_args(stub, sampler, "--max-retries", "1"))
    assert first.code == 1
    errors = read_jsonl(out.with_name("pairs.errors.jsonl"))
    assert len(errors) == 5 and {e["reason"] for e in errors} == {"sampler_server_error"}
    assert stub.count() == 0  # nothing was judged
    sampler.rule = None
    second = caption(images, "-o", out, *_args(stub, sampler))
    assert second.code == 0 and len(read_jsonl(out)) == 5 and read_jsonl(out.with_name("pairs.errors.jsonl")) == []


def test_a_sampler_never_reached_stops_the_run_naming_it(tmp_path, stub, caption):
    images, out = tmp_path / "images", tmp_path / "pairs.jsonl"
    make_images(images, 3)
    with StubServer() as gone:
        url = gone.base_url
    result = caption(images, "-o", out, *fast_args(stub, "--task", "preference", "--sampler-base-url", url,
                                                   "--sampler-model", "tiny", "--max-retries", "1"))
    assert result.code == 3
    assert f"no request to the sampler at {url} has succeeded" in result.stderr
    assert set(_accounted(out).values()) == {1} and len(_accounted(out)) == 3


@pytest.mark.parametrize("extra, message", [
    ((), "give --sampler-base-url URL"),
    (("--sampler-base-url", "http://x/v1", "--sampler-model", "m", "--batch"), "drop --batch"),
    (("--sampler-base-url", "http://x/v1", "--sampler-model", "m", "--samples", "1"), "--samples"),
])
def test_preference_options_are_checked_up_front(tmp_path, stub, caption, extra, message):
    images = tmp_path / "images"
    make_images(images, 1)
    result = caption(images, "-o", tmp_path / "p.jsonl", *fast_args(stub, "--task", "preference", *extra))
    assert result.code == 2 and message in result.stderr and stub.count() == 0


def test_sampler_options_without_the_preference_task_are_refused(tmp_path, stub, caption):
    images = tmp_path / "images"
    make_images(images, 1)
    result = caption(images, "-o", tmp_path / "c.jsonl", *fast_args(stub, "--sampler-base-url", "http://x/v1"))
    assert result.code == 2 and "--sampler-base-url only apply to --task preference" in result.stderr
