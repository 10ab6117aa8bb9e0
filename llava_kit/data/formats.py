"""Readers: LLaVA JSON / JSONL -> canonical samples, with every bad record kept and explained.

A canonical `Sample` is a list of image paths (relative to an image root) and a list of
`{role, content}` messages where `<image>` marks each image's place. Records that cannot become
a sample are returned as `BadRecord`s with a reason, never dropped without a word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import DataError, PathNotFoundError, RecordError

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    id: str
    images: list[str]
    messages: list[dict]
    source: str = ""
    """`file:line` or `file[index]`, for reports."""


@dataclass
class BadRecord:
    source: str
    id: str | None
    reason: str


@dataclass
class ReadResult:
    samples: list[Sample] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


def _iter_records(path: Path):
    """Yield (source, record or None, error) for a .json array or a .jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{line_no}", json.loads(line), None
            except json.JSONDecodeError as err:
                yield f"{path.name}:{line_no}", None, f"broken JSON line: {err.msg}"
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); LLaVA JSON is one array of records, "
                         "or use a .jsonl file with one record per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; LLaVA JSON is an array of records")
    for index, record in enumerate(data):
        yield f"{path.name}[{index}]", record, None


def record_to_sample(record, source: str) -> Sample:
    """Convert one LLaVA record; raises ValueError with the reason when it is malformed."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("missing or empty `conversations` list")
    image = record.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise RecordError("`image` must be a path string or a list of path strings")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(f"turn {i + 1} is not an object with a string `value`")
        role = ROLE_NAMES.get(turn.get("from"))
        if role is None:
            raise RecordError(f"turn {i + 1} has unknown role {turn.get('from')!r} (expected human/gpt/system)")
        messages.append({"role": role, "content": turn["value"]})
    chat = [m for m in messages if m["role"] != "system"]
    for i, m in enumerate(chat):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RecordError(f"bad roles: turn {i + 1} is {m['role']!r}, expected {expected!r} (human and gpt alternate)")
        if m["role"] == "assistant" and IMAGE_TOKEN in m["content"]:
            raise RecordError(f"turn {i + 1}: `<image>` appears in an answer; images belong in human turns")
    if not chat or chat[-1]["role"] != "assistant":
        raise RecordError("bad roles: the conversation does not end with an answer (gpt turn)")
    if any(not m["content"].strip() for m in chat if m["role"] == "assistant"):
        raise RecordError("empty answer")
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if tags != len(images):
        raise RecordError(f"{tags} `<image>` tag(s) in the text but {len(images)} image(s) in the record")
    return Sample(str(record.get("id", source)), images, messages, source)


def read_llava(paths: str | list[str]) -> ReadResult:
    """Read LLaVA JSON / JSONL file(s) into samples and bad records (malformed files raise ValueError)."""
    result = ReadResult()
    for p in [paths] if isinstance(paths, str) else paths:
        path = Path(p)
        if not path.is_file():
            raise PathNotFoundError(f"data file {str(path)!r} does not exist")
        for source, record, error in _iter_records(path):
            if error:
                result.bad.append(BadRecord(source, None, error))
                continue
            try:
                result.samples.append(record_to_sample(record, source))
            except ValueError as err:
                rid = record.get("id") if isinstance(record, dict) else None
                result.bad.append(BadRecord(source, None if rid is None else str(rid), str(err)))
    return result
