"""Decide whether an answer may enter the dataset.

Each check raises `AnswerError(reason, detail)`; the pipeline retries the request a few times and then
writes the reason to the errors file. Reasons: `refusal`, `content_filter`, `truncated`, `empty`,
`malformed_json`, `source_leak`, `image_token`.
"""

from __future__ import annotations

import re

from data_gen.prompts import IMAGE_TOKEN, AnswerError, Task, parse_answer

# First-person refusals and "I cannot see the image" answers. They leaked into public datasets
# (LLaVA-NeXT M4-Instruct) because nobody looked; the patterns are specific enough that a genuine
# description does not match.
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i (?:can ?not|can't|won't|am unable to|'m unable to|am not able to|"
    r"'m not able to) (?:help|assist|provide|describe|identify|comply|analy[sz]e|view|see|process|fulfil)|"
    r"as an ai\b|(?:can't|cannot|unable to) (?:see|view|access|open|analy[sz]e) (?:the|this|any|an) (?:image|picture|"
    r"photo)|no image (?:was|is|has been) (?:provided|attached|uploaded|shared))",
    re.IGNORECASE,
)

# Answers that reveal they were written from a text source or talk about the task itself: LLaVA-Instruct's
# rule "never mention the captions" — the trained model would learn to cite captions it never gets.
_LEAK = re.compile(
    r"\b(?:(?:the|this|that|given|provided|above|original|accompanying|image's)\s+(?:captions?|descriptions?)\b|"
    r"(?:according to|based on|as (?:stated|mentioned|described|noted|given) in)\s+(?:the\s+)?"
    r"(?:captions?|descriptions?|text|prompt|context|metadata)\b|bounding box(?:es)?\b|"
    r"here(?: is|'s| are) (?:a|an|the|my)\b[^.\n]{0,40}\b(?:captions?|descriptions?|conversation|question|answer|json)\b)",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^\s*(?:sure|certainly|of course|absolutely)\b[!,.]", re.IGNORECASE)


def check_finish(finish_reason: str | None, refusal: str | None, content: str | None) -> str:
    """The answer text of a completion that finished normally; raises AnswerError otherwise."""
    if refusal:
        raise AnswerError("refusal", refusal.strip()[:200])
    if finish_reason == "length":
        raise AnswerError("truncated", "the answer hit the token limit (finish_reason=length); raise --max-tokens")
    if finish_reason == "content_filter":
        raise AnswerError("content_filter", "the provider's content filter stopped the answer")
    if content is None or not content.strip():
        raise AnswerError("empty", "the answer has no text")
    return content


def check_turns(turns: list[tuple[str, str]]) -> None:
    """Reject empty fields, refusals, source leaks and stray image tokens in parsed turns."""
    for question, answer in turns:
        if not answer:
            raise AnswerError("empty", "an answer field is empty")
        for text in (question, answer):
            if IMAGE_TOKEN in text:
                # an extra <image> would break the image-token count at training time
                raise AnswerError("image_token", f"the text contains {IMAGE_TOKEN}")
            leak = _LEAK.search(text)
            if leak:
                raise AnswerError("source_leak", f"mentions its source: {leak.group(0)!r}")
        refusal = _REFUSAL.search(answer)
        if refusal:
            raise AnswerError("refusal", f"{answer.strip()[:200]}")
        if _PREAMBLE.match(answer):
            raise AnswerError("source_leak", f"talks about the task: {answer.strip()[:60]!r}")


def validated_turns(task: Task, finish_reason: str | None, refusal: str | None,
                    content: str | None) -> list[tuple[str, str]]:
    """Parse and check one completion: its (question, answer) turns, or AnswerError with the reason."""
    text = check_finish(finish_reason, refusal, content)
    try:
        turns = parse_answer(task, text)
    except AnswerError:
        if _REFUSAL.search(text):  # an apology instead of JSON is a refusal, not a format problem
            raise AnswerError("refusal", text.strip()[:200]) from None
        raise
    if task.name in ("conversation", "reasoning"):
        for question, _ in turns:
            if not question:
                raise AnswerError("empty", "a question field is empty")
    check_turns(turns)
    return turns
