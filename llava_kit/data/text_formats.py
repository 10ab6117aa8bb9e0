"""Readers for text-only conversation formats -> the canonical `Sample` (no images, `{role, content}` messages).

    samples, bad = read_conversation_records(iter_file_records(Path("alpaca.json")), "auto")

Formats (`data.format`; `auto` detects each record's format from its keys):

- `alpaca`    {"instruction", "input" (optional), "output", "system", "history" (optional)}; input joins the
              instruction after a blank line.
- `sharegpt`  {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system" (optional)}
              (also LLaVA JSON without images, and `user`/`assistant` role names).
- `openai`    the OpenAI fine-tuning JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content"}]}.
- `moss`      MOSS-003-SFT: {"meta_instruction", "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>",
              "MOSS": "<|MOSS|>: ...<eom>", ...}}}; tool fields (Inner Thoughts, Commands, Tool Responses)
              are not trained on.

Every record either becomes a Sample or a BadRecord with its reason (malformed JSON, unknown role,
roles out of order, empty answer), never dropped without a word.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from llava_kit.config import CONVERSATION_FORMATS
from llava_kit.data.formats import BadRecord, Sample
from llava_kit.errors import DataError, RecordError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MOSS_PREFIX = re.compile(r"^\s*<\|(Human|MOSS)\|>:\s?")
MOSS_SUFFIX = re.compile(r"\s*<(eoh|eom)>\s*$")


def detect_format(record) -> str:
    """The conversation format of one record, from its keys; raises ValueError when none fits."""
    if isinstance(record, dict):
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "openai"
        if "chat" in record and isinstance(record["chat"], dict):
            return "moss"
        keys = ", ".join(sorted(map(str, record))[:8])
    else:
        keys = type(record).__name__
    raise RecordError(f"unknown record format (keys: {keys}); expected alpaca (instruction/output), sharegpt "
                     "(conversations), openai (messages) or moss (chat); set data.format to say which")


def _check_conversation(messages: list[dict]) -> list[dict]:
    """Roles alternate user, assistant after an optional leading system message; answers are not empty."""
    if messages and messages[0]["role"] == "system":
        system, chat = messages[:1], messages[1:]
    else:
        system, chat = [], messages
    if not chat:
        raise RecordError("no user/assistant turns")
    for i, m in enumerate(chat):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RecordError(f"bad roles: turn {i + 1} is {m['role']!r}, expected {expected!r} "
                             "(user and assistant alternate after an optional first system message)")
    if chat[-1]["role"] != "assistant":
        raise RecordError("bad roles: the conversation does not end with an answer")
    if any(not m["content"].strip() for m in chat if m["role"] == "assistant"):
        raise RecordError("empty answer")
    if system and not system[0]["content"].strip():
        system = []
    return system + chat


def _string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def alpaca_messages(record: dict) -> list[dict]:
    """Alpaca instruction/input/output (+ optional system, and `history` [[question, answer], ...] of earlier
    turns, as LLaMA-Factory writes multi-turn Alpaca) -> messages."""
    instruction, extra = _string(record, "instruction"), _string(record, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if not user.strip():
        raise RecordError("empty instruction")
    system = _string(record, "system", required=False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise RecordError("`history` must be a list of [question, answer] string pairs")
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, "output")}]


def _turns(turns, role_key: str, text_key: str, roles: dict[str, str], names: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("missing or empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise RecordError(f"turn {i + 1} is not an object with a string `{text_key}`")
        role = roles.get(turn.get(role_key))
        if role is None:
            raise RecordError(f"turn {i + 1} has unknown role {turn.get(role_key)!r} (expected {names})")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def sharegpt_messages(record: dict) -> list[dict]:
    """ShareGPT `conversations` (from/value) -> messages; a top-level `system` string comes first."""
    if record.get("image") or record.get("images"):
        raise RecordError("the record has images; text stages train on text only (use stage sft for images)")
    messages = _turns(record.get("conversations"), "from", "value", SHAREGPT_ROLES, "human/gpt/system")
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def openai_messages(record: dict) -> list[dict]:
    """OpenAI chat fine-tuning `messages` (role/content; content a string or a list of text parts) -> messages."""
    turns = record.get("messages")
    if isinstance(turns, list):
        turns = [_with_text_content(t) for t in turns]
    return _turns(turns, "role", "content", OPENAI_ROLES, "system/user/assistant")


def _with_text_content(turn):
    """A turn whose `content` is a list of parts [{"type": "text", "text": ...}] gets the texts joined; any other
    part (images, audio) is refused."""
    if not isinstance(turn, dict) or not isinstance(turn.get("content"), list):
        return turn
    texts = []
    for part in turn["content"]:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RecordError(f"a content part of type {kind!r}: text stages read text parts only")
        texts.append(part["text"])
    return {**turn, "content": "\n".join(texts)}


def _moss_text(turn: dict, key: str, turn_name: str) -> str:
    value = turn.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{turn_name} has no `{key}` string")
    return MOSS_SUFFIX.sub("", MOSS_PREFIX.sub("", value))


def moss_messages(record: dict) -> list[dict]:
    """MOSS-003-SFT `meta_instruction` + `chat` {turn_1: {Human, MOSS, ...}, ...} -> messages."""
    chat = record.get("chat")
    if not isinstance(chat, dict) or not chat:
        raise RecordError("missing or empty `chat` object")
    names = sorted(chat, key=lambda k: int(k.rpartition("_")[2]) if k.rpartition("_")[2].isdigit() else -1)
    messages = []
    system = record.get("meta_instruction")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for name in names:
        turn = chat[name]
        if not isinstance(turn, dict):
            raise RecordError(f"`chat.{name}` is not an object with Human and MOSS")
        messages.append({"role": "user", "content": _moss_text(turn, "Human", name)})
        messages.append({"role": "assistant", "content": _moss_text(turn, "MOSS", name)})
    return messages


READERS = {"alpaca": alpaca_messages, "sharegpt": sharegpt_messages, "llava": sharegpt_messages,
           "openai": openai_messages, "moss": moss_messages}


def record_to_text_sample(record, source: str, fmt: str = "auto") -> Sample:
    """One record -> Sample; raises ValueError with the reason when it cannot be trained on."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object")
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise RecordError(f"unknown conversation format {fmt!r}; valid: {', '.join(CONVERSATION_FORMATS)}")
    messages = _check_conversation(READERS[fmt](record))
    return Sample(str(record.get("id", source)), [], messages, source)


def iter_file_records(path: Path) -> Iterator[tuple[str, object, str | None]]:
    """Yield (source, record or None, error) for a .jsonl file (one record per line) or a .json array."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path.name}:{line_no}", json.loads(line), None
                except json.JSONDecodeError as err:
                    yield f"{path.name}:{line_no}", None, f"broken JSON line: {err.msg}"
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); give a JSON array of records, or a .jsonl file "
                         "with one record per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected an array of records")
    for index, record in enumerate(data):
        yield f"{path.name}[{index}]", record, None


def read_conversation_records(records: Iterable[tuple[str, object, str | None]],
                              fmt: str = "auto") -> tuple[list[Sample], list[BadRecord]]:
    """Convert (source, record, error) triples into samples and bad records."""
    samples, bad = [], []
    for source, record, error in records:
        if error:
            bad.append(BadRecord(source, None, error))
            continue
        try:
            samples.append(record_to_text_sample(record, source, fmt))
        except ValueError as err:
            rid = record.get("id") if isinstance(record, dict) else None
            bad.append(BadRecord(source, None if rid is None else str(rid), str(err)))
    return samples, bad
