"""The canonical sample every reader produces, and the checks every sample passes (see the package docstring)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from llava_kit.data.templates import IMAGE_TOKEN, check_roles
from llava_kit.errors import RecordError


@dataclass
class Sample:
    id: str | None
    """The record's own `id`, if it has one."""
    images: list[str]
    """Image paths relative to the image root (or `data:` URLs), one per `<image>` tag, in tag order."""
    messages: list[dict]
    """Canonical messages: roles system, user, assistant, tool (see the package docstring)."""
    source: str = ""
    """`file:line` or `file[index]`, for reports."""
    tools: list[dict] = field(default_factory=list)
    """JSON schemas of the tools the conversation may call: `{"type": "function", "function": {...}}`."""


@dataclass
class BadRecord:
    source: str
    id: str | None
    reason: str
    """The whole message, with the record's details."""
    kind: str = ""
    """The reason in a few stable words, under which reports count it (empty: the reason itself)."""


@dataclass
class ReadResult:
    samples: list[Sample] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    formats: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per data file: how many of its records each format read (what `auto` detected)."""

    def extend(self, other: ReadResult) -> None:
        self.samples += other.samples
        self.bad += other.bad
        self.formats.update(other.formats)


def bad_record(source: str, record, error: Exception) -> BadRecord:
    """The BadRecord of a record that raised `error` (a DataError's `kind` names the reason)."""
    rid = record.get("id") if isinstance(record, dict) else None
    return BadRecord(source, None if rid is None else str(rid), str(error), getattr(error, "kind", "") or "")


def check_sample(messages: list[dict], images: list[str]) -> list[dict]:
    """Check canonical messages against the rules every stage relies on; returns them (an empty system message
    dropped). Raises RecordError with the reason: roles out of order, no answer at the end, an empty answer,
    `<image>` outside a user turn, `<image>` tags that do not match the images."""
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]
    if not any(m["role"] != "system" for m in messages):
        raise RecordError("no user/assistant turns", kind="no user/assistant turns")
    if any(m["role"] == "system" for m in messages[1:]):
        raise RecordError("bad roles: a system message after the first turn (templates render only a first one)",
                          kind="bad roles")
    check_roles(messages)
    if messages[-1]["role"] != "assistant":
        raise RecordError("bad roles: the conversation does not end with an answer", kind="bad roles")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise RecordError("empty answer", kind="empty answer")
        if m["role"] != "user" and IMAGE_TOKEN in m["content"]:
            raise RecordError(f"turn {i + 1}: `<image>` appears in a {m['role']} message; images belong in user turns",
                              kind="`<image>` outside a user turn")
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if tags != len(images):
        hint = "; write `<image>` in the user text where each image belongs" if not tags else ""
        raise RecordError(f"{tags} `<image>` tag(s) in the text but {len(images)} image(s) in the record{hint}",
                          kind="`<image>` tags do not match the images")
    return messages


def count_formats(formats: dict[str, dict[str, int]]) -> str:
    """`openai 6` for one file, `a.json: openai 6; b.jsonl: sharegpt 3, alpaca 1` for several, `none`."""
    def counts(by_format: dict[str, int]) -> str:
        return ", ".join(f"{fmt} {n}" for fmt, n in Counter(by_format).most_common()) or "none"

    if len(formats) == 1:
        return counts(next(iter(formats.values())))
    return "; ".join(f"{name}: {counts(by_format)}" for name, by_format in formats.items()) or "none"


def parse_json(value, what: str, kind: str):
    """`value` if it is not a string, else the JSON it holds; RecordError naming `what` when it is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RecordError(f"{what} is not valid JSON ({err.msg})", kind=kind) from None


def tool_schemas(value, key: str) -> list[dict]:
    """A record's tool schemas in OpenAI's form `{"type": "function", "function": {name, description, parameters}}`.

    Takes a list or a JSON string of one (LLaMA-Factory writes it as a string), of wrapped or bare function
    objects; empty values give []."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    tools = parse_json(value, f"`{key}`", "tools not valid JSON")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RecordError(f"`{key}` must be a list of tool schemas, got {type(tools).__name__}",
                          kind="tools not a list")
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(f"`{key}`: every tool needs a `name` (got {json.dumps(tool)[:80]})",
                              kind="tool schema without a name")
        out.append({"type": "function", "function": function})
    return out


def tool_call(value, where: str) -> dict:
    """One call in the canonical form `{"type": "function", "function": {"name", "arguments": {...}}}` (+ `id`).

    Takes OpenAI's `{"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}`, its legacy
    `function_call` object, or ShareGPT's `{"name", "arguments"}` (arguments a JSON string or an object)."""
    call = parse_json(value, f"{where}: the tool call", "tool call not valid JSON")
    function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RecordError(f"{where}: a tool call needs a `name` (got {json.dumps(call)[:80]})",
                          kind="tool call without a name")
    arguments = parse_json(function.get("arguments", {}), f"{where}: the arguments of {function['name']!r}",
                           "tool call not valid JSON")
    if not isinstance(arguments, dict):
        raise RecordError(f"{where}: the arguments of {function['name']!r} must be an object",
                          kind="tool call arguments not an object")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out
