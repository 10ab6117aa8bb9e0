"""The caption tasks: what each asks the model, the JSON shape of its answer, and how that becomes turns.

Every task asks for a JSON object (schema below). Servers with structured output get the schema as
`response_format`; servers with only JSON mode get the shape spelled out in the prompt (which also
contains the word JSON, as that mode requires); for plain-text servers `parse_answer` reads prose.
The question stored in the dataset for `caption` and `detail` is sampled, per image and with a seed,
from the instruction lists of the LLaVA paper, as LLaVA's pretraining data was built.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"

# LLaVA paper, brief image description instructions (pretraining captions).
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)

# LLaVA paper, detailed image description instructions.
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)

# Shared rules: the LLaVA-Instruct prompts' "answer as if you see the image, never mention the source".
RULES = (
    "Answer as someone who is looking at the image right now. Describe only what is visible; do not guess "
    "names of people. Never mention captions, descriptions, prompts, instructions or these rules, and do not "
    "start with phrases like 'Here is' or 'Sure'."
)


def _object_schema(**properties: dict[str, Any]) -> dict[str, Any]:
    # strict structured output: every field required, no extra fields
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_STRING = {"type": "string"}
_QA = _object_schema(question=_STRING, answer=_STRING)


@dataclass(frozen=True)
class Task:
    """One kind of training sample and how to ask a vision model for it."""

    name: str
    instruction: str
    """What the model is asked to write (replaceable with --prompt-file)."""
    schema: dict[str, Any]
    """JSON schema of the answer object."""
    shape: str
    """The answer's JSON shape as shown in the prompt, for servers without structured output."""
    max_tokens: int
    """Default completion budget: generous, so `finish_reason: length` means a runaway answer."""
    expected_output_tokens: int
    """Typical answer length, for the --dry-run cost estimate."""
    questions: tuple[str, ...] = ()
    """Instruction list the stored question is sampled from (caption, detail)."""
    label: str = ""
    """Identity of the task in output ids: the name, plus a hash of a custom prompt when one is used."""
    raw: bool = False
    """Send the instruction alone (--raw-prompt): no rules, no JSON format; the answer is read as plain text."""

    def prompt_text(self) -> str:
        """The full text sent with the image."""
        if self.raw:
            return self.instruction
        return f"{self.instruction}\n\n{RULES}\n\nReply with a JSON object of this form and nothing else:\n{self.shape}"


TASKS: dict[str, Task] = {
    "caption": Task(
        name="caption",
        instruction=(
            "Write a caption for this image: one sentence of at most 30 words naming the main subject, what it is "
            "doing and the setting, in the style of a good alt text."
        ),
        schema=_object_schema(caption=_STRING),
        shape='{"caption": "..."}',
        max_tokens=300,
        expected_output_tokens=40,
        questions=BRIEF_INSTRUCTIONS,
    ),
    "detail": Task(
        name="detail",
        instruction=(
            "Describe this image in detail, in one to three paragraphs: the main subjects and their attributes "
            "(kind, colour, size, count, position relative to each other), what they are doing, the background and "
            "setting, any readable text, and the overall scene. If something is unclear, say so instead of guessing."
        ),
        schema=_object_schema(description=_STRING),
        shape='{"description": "..."}',
        max_tokens=1200,
        expected_output_tokens=250,
        questions=DETAIL_INSTRUCTIONS,
    ),
    "conversation": Task(
        name="conversation",
        instruction=(
            "Write a conversation of 3 to 5 question-answer turns between a person asking about this image and a "
            "helpful assistant who sees it. Vary the questions: object types, counting, actions, locations, "
            "relative positions, colours, readable text. Ask only questions that the image answers definitely; "
            "give answers in complete sentences."
        ),
        schema=_object_schema(turns={"type": "array", "items": _QA}),
        shape='{"turns": [{"question": "...", "answer": "..."}, ...]}',
        max_tokens=1500,
        expected_output_tokens=350,
    ),
    "reasoning": Task(
        name="reasoning",
        instruction=(
            "Write one question about this image that needs reasoning beyond describing it (why something is "
            "happening, what may happen next, what an object is for, what a person here may need or find hard), "
            "and a detailed answer that reasons step by step from what is visible."
        ),
        schema=_object_schema(question=_STRING, answer=_STRING),
        shape='{"question": "...", "answer": "..."}',
        max_tokens=1500,
        expected_output_tokens=300,
    ),
}


# The preference task's judge (data_gen/preference.py fills in the question and the sampled answers).
JUDGE_INSTRUCTION = (
    "Below are a question about this image and {n} answers to it. Judge each answer only by whether what it says "
    "is true of the image: objects, attributes, counts, text or relations that are not in the image "
    "(hallucinations) weigh most, then missing what the question asks about; style and length do not count. "
    "Score each answer from 1 (mostly false) to 10 (entirely accurate), then give the number of the best answer "
    "and of the worst one (numbered as listed, from 1) and one sentence saying why.\n\n"
    "Question: {question}\n\n{answers}\n\n"
    'Reply with a JSON object of this form and nothing else:\n{{"scores": [..], "best": N, "worst": N, '
    '"reason": "..."}}'
)
_INTEGER = {"type": "integer"}

TASKS["preference"] = Task(
    name="preference",
    instruction=JUDGE_INSTRUCTION,
    schema=_object_schema(scores={"type": "array", "items": _INTEGER}, best=_INTEGER, worst=_INTEGER,
                          reason=_STRING),
    shape='{"scores": [..], "best": N, "worst": N, "reason": "..."}',
    max_tokens=400,
    expected_output_tokens=80,
    questions=DETAIL_INSTRUCTIONS,  # asked of the sampled model; --prompt-file replaces them (one per line)
)


class PromptFileError(ValueError):
    """A --prompt-file that cannot be used; the message says why and what to do."""


def get_task(name: str, prompt_file: Path | None = None, raw: bool = False) -> Task:
    """The task `name`, with its instruction replaced by the text of `prompt_file` when given.

    A custom prompt changes the task's label (and so the output ids), so its results never count as
    done for the default prompt or for another prompt file. `raw`: the prompt file's text is sent alone
    (for small local models trained on short questions), labelled apart from the same file sent with rules.
    """
    if raw and prompt_file is None:
        raise PromptFileError("--raw-prompt sends the text of --prompt-file as it is: give --prompt-file too")
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    task = TASKS[name]
    if prompt_file is None:
        return Task(**{**task.__dict__, "label": name})
    try:
        text = prompt_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read --prompt-file {prompt_file}: {exc}") from exc
    if not text:
        raise PromptFileError(f"--prompt-file {prompt_file} is empty; write the instruction for the model in it")
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    if name == "preference":  # the file holds the questions asked of the sampled model, one per line
        questions = tuple(line.strip() for line in text.splitlines() if line.strip())
        return Task(**{**task.__dict__, "questions": questions, "label": f"{name}-{digest}"})
    return Task(**{**task.__dict__, "instruction": text, "label": f"{name}-{'raw-' if raw else ''}{digest}",
                   "raw": raw})


def sample_question(task: Task, sha256: str, seed: int) -> str | None:
    """The stored instruction for one image: stable for the same image and seed, whatever the run order."""
    if not task.questions:
        return None
    return random.Random(f"{seed}:{sha256}").choice(task.questions)


def response_format(task: Task, mode: str) -> dict[str, Any] | None:
    """The `response_format` request field for a structured-output mode (None for plain text)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": task.name, "strict": True, "schema": task.schema}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


class AnswerError(ValueError):
    """An answer that must not enter the dataset; `reason` is a short code for the errors file."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_LABEL = re.compile(r"^\s*\**\s*(caption|description|answer)\s*\**\s*:\s*", re.IGNORECASE)
_QA_LINE = re.compile(
    r"^\s*(?:\d+[.)]\s*)?\**\s*(q|question|user|human|a|answer|assistant|gpt)\s*\d*\s*\**\s*[:：]\s*(.*)$",
    re.IGNORECASE,
)


def _find_json(text: str) -> Any:
    stripped = _FENCE.sub("", text.strip()).strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    start, end = stripped.find("{"), stripped.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(stripped[start : end + 1])
        except ValueError:
            pass
    return None


def _qa_from_prose(text: str) -> list[tuple[str, str]]:
    """Question/answer pairs from 'Q: ... A: ...' style prose (continuation lines are kept)."""
    pairs: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        match = _QA_LINE.match(line)
        if match:
            role = "q" if match.group(1).lower() in ("q", "question", "user", "human") else "a"
            if role == "q":
                pairs.append([match.group(2).strip(), ""])
                current = pairs[-1]
            elif pairs and not pairs[-1][1]:
                pairs[-1][1] = match.group(2).strip()
                current = pairs[-1]
            else:
                current = None
        elif current is not None and line.strip():
            index = 1 if current[1] else 0
            current[index] = f"{current[index]}\n{line.strip()}"
    return [(q, a) for q, a in pairs if q and a]


def _string(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise AnswerError("malformed_json", f"field {key!r} missing or not a string")
    return value.strip()


def parse_answer(task: Task, text: str) -> list[tuple[str, str]]:
    """The answer as (question, answer) turns; raises AnswerError("malformed_json") when it has no usable shape.

    JSON (possibly fenced or wrapped in prose) is read first; otherwise prose: the whole text for caption and
    detail, `Q:`/`A:` lines for conversation and reasoning. Caption and detail turns have question "": their
    stored question is sampled from the instruction list instead.
    """
    obj = _find_json(text)
    if isinstance(obj, dict):
        if task.name == "caption":
            return [("", _string(obj, "caption"))]
        if task.name == "detail":
            return [("", _string(obj, "description"))]
        if task.name == "reasoning":
            return [(_string(obj, "question"), _string(obj, "answer"))]
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise AnswerError("malformed_json", "field 'turns' missing, empty or not a list of objects")
        return [(_string(t, "question"), _string(t, "answer")) for t in turns]
    stripped = text.strip()
    if obj is not None or stripped.startswith(("{", "[", "```")):
        raise AnswerError("malformed_json", f"not the requested JSON object: {stripped[:80]!r}")
    # Plain text: a server without JSON support, or a model that ignored the format.
    if task.name in ("caption", "detail"):
        return [("", _LABEL.sub("", stripped, count=1).strip())]
    pairs = _qa_from_prose(stripped)
    if not pairs:
        raise AnswerError("malformed_json", f"no JSON and no 'Q:/A:' turns in the answer: {stripped[:80]!r}")
    return pairs[:1] if task.name == "reasoning" else pairs


def to_conversations(task: Task, turns: list[tuple[str, str]], question: str | None) -> list[dict[str, str]]:
    """LLaVA turns: the first human turn starts with `<image>\\n`; caption/detail use the sampled question."""
    conversations = []
    for index, (q, a) in enumerate(turns):
        asked = question if (index == 0 and question is not None) else q
        if index == 0:
            asked = f"{IMAGE_TOKEN}\n{asked}"
        conversations.append({"from": "human", "value": asked})
        conversations.append({"from": "gpt", "value": a})
    return conversations
