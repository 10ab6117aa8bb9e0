"""Task prompts, answer parsing and validation (no server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from data_gen.prompts import (
    BRIEF_INSTRUCTIONS,
    DETAIL_INSTRUCTIONS,
    TASKS,
    AnswerError,
    PromptFileError,
    get_task,
    parse_answer,
    response_format,
    sample_question,
    to_conversations,
)
from data_gen.validate import validated_turns

CAPTION, DETAIL, CONVERSATION, REASONING = (get_task(name) for name in ("caption", "detail", "conversation", "reasoning"))


def _strict(schema: dict[str, Any]) -> None:
    if schema.get("type") == "object":
        assert schema["additionalProperties"] is False
        assert sorted(schema["required"]) == sorted(schema["properties"])
        for sub in schema["properties"].values():
            _strict(sub)
    if schema.get("type") == "array":
        _strict(schema["items"])


@pytest.mark.parametrize("name", list(TASKS))
def test_schemas_are_strict_and_prompts_ask_for_json(name: str) -> None:
    task = get_task(name)
    _strict(task.schema)
    assert "JSON" in task.prompt_text()  # json_object mode refuses prompts without the word
    fmt = response_format(task, "json_schema")
    assert fmt == {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": task.schema}}
    assert response_format(task, "json_object") == {"type": "json_object"}
    assert response_format(task, "text") is None


def test_stored_question_is_seeded_per_image() -> None:
    first = [sample_question(CAPTION, f"{i:064x}", seed=0) for i in range(50)]
    assert first == [sample_question(CAPTION, f"{i:064x}", seed=0) for i in range(50)]
    assert set(first) <= set(BRIEF_INSTRUCTIONS) and len(set(first)) > 5
    assert first != [sample_question(CAPTION, f"{i:064x}", seed=1) for i in range(50)]
    assert sample_question(DETAIL, "ab" * 32, 0) in DETAIL_INSTRUCTIONS
    assert sample_question(CONVERSATION, "ab" * 32, 0) is None
    assert len(BRIEF_INSTRUCTIONS) == 11 and len(DETAIL_INSTRUCTIONS) == 16


def test_prompt_file_replaces_instruction_and_separates_ids(tmp_path: Path) -> None:
    prompt = tmp_path / "p.txt"
    prompt.write_text("Describe only the colours.\n")
    task = get_task("caption", prompt)
    assert task.prompt_text().startswith("Describe only the colours.")
    assert task.label.startswith("caption-") and task.label != CAPTION.label
    prompt.write_text("   ")
    with pytest.raises(PromptFileError, match="empty"):
        get_task("caption", prompt)


@pytest.mark.parametrize(("task", "text", "expected"), [
    (CAPTION, '{"caption": "A dog runs."}', [("", "A dog runs.")]),
    (CAPTION, '```json\n{"caption": "A dog runs."}\n```', [("", "A dog runs.")]),
    (CAPTION, "Caption: A dog runs on sand.", [("", "A dog runs on sand.")]),
    (DETAIL, '{"description": "Two cats sleep."}', [("", "Two cats sleep.")]),
    (REASONING, "Question: Why is it wet?\nAnswer: It rained,\nso the road shines.",
     [("Why is it wet?", "It rained,\nso the road shines.")]),
    (CONVERSATION, '{"turns": [{"question": "How many?", "answer": "Two."}, {"question": "Colour?", '
                   '"answer": "Red."}]}', [("How many?", "Two."), ("Colour?", "Red.")]),
    (CONVERSATION, "Q1: How many?\nA1: Two.\n\nQ2: Colour?\nA2: Red.", [("How many?", "Two."), ("Colour?", "Red.")]),
])
def test_parse_answer_accepts_json_and_prose(task: Any, text: str, expected: list[tuple[str, str]]) -> None:
    assert parse_answer(task, text) == expected


@pytest.mark.parametrize(("task", "text"), [
    (CAPTION, '{"caption": "A dog'),            # cut JSON
    (CAPTION, '{"text": "A dog."}'),            # wrong field
    (CONVERSATION, '{"turns": []}'),
    (CONVERSATION, "Two dogs play in a park."),  # prose without turns
    (REASONING, '{"question": "Why?"}'),
])
def test_malformed_answers_are_rejected(task: Any, text: str) -> None:
    with pytest.raises(AnswerError) as err:
        parse_answer(task, text)
    assert err.value.reason == "malformed_json"


@pytest.mark.parametrize(("finish", "refusal", "content", "reason"), [
    ("stop", "I can't help with that.", None, "refusal"),
    ("stop", None, "I'm sorry, but I can't assist with that.", "refusal"),
    ("stop", None, '{"caption": "I am unable to view the image you sent."}', "refusal"),
    ("length", None, '{"caption": "A dog runs on the be', "truncated"),
    ("content_filter", None, "", "content_filter"),
    ("stop", None, "", "empty"),
    ("stop", None, '{"caption": "   "}', "empty"),
    ("stop", None, '{"caption": "According to the caption, a dog runs."}', "source_leak"),
    ("stop", None, '{"caption": "The provided description mentions a dog."}', "source_leak"),
    ("stop", None, "Here is a short caption for the image: a dog.", "source_leak"),
    ("stop", None, '{"caption": "Sure! A dog runs on a beach."}', "source_leak"),
    ("stop", None, '{"caption": "A dog <image> runs."}', "image_token"),
    ("stop", None, "{\"caption\": \"A dog", "malformed_json"),
])
def test_unusable_answers_are_rejected_with_a_reason(finish: str, refusal: str | None, content: str | None,
                                                     reason: str) -> None:
    with pytest.raises(AnswerError) as err:
        validated_turns(CAPTION, finish, refusal, content)
    assert err.value.reason == reason


@pytest.mark.parametrize("text", [
    "A shop window with a sign that reads 'Sorry, we are closed'.",
    "A man in a red jacket describes the route to a tourist holding a map.",
    "A bounding wall of grey stone surrounds a small garden.",
    "Certainly the brightest object in the scene is a yellow kite.",
])
def test_ordinary_captions_pass(text: str) -> None:
    assert validated_turns(CAPTION, "stop", None, f'{{"caption": "{text}"}}') == [("", text)]


def test_conversations_start_with_one_image_token() -> None:
    turns = [("How many dogs?", "Two."), ("What colour?", "Brown.")]
    conv = to_conversations(CONVERSATION, turns, None)
    assert [c["from"] for c in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"] == "<image>\nHow many dogs?"
    assert sum(c["value"].count("<image>") for c in conv) == 1
    caption = to_conversations(CAPTION, [("", "A dog.")], "Describe the image concisely.")
    assert caption == [{"from": "human", "value": "<image>\nDescribe the image concisely."},
                       {"from": "gpt", "value": "A dog."}]
