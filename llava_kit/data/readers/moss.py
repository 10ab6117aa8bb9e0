"""MOSS-003-SFT records: text-only conversations with their own turn markers.

    {"meta_instruction": "...", "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>", "MOSS": "<|MOSS|>: ...<eom>",
                                                   "Inner Thoughts": ..., "Commands": ..., "Tool Responses": ...}}}

Only Human and MOSS are trained on; MOSS's tool fields (Inner Thoughts, Commands, Tool Responses) are left out
(documented in docs/data.md: MOSS's plugin calls have no schema to render them with).
"""

from __future__ import annotations

import re

from llava_kit.data.readers.chat import Tags
from llava_kit.data.readers.sample import Sample
from llava_kit.errors import RecordError

MOSS_PREFIX = re.compile(r"^\s*<\|(Human|MOSS)\|>:\s?")
MOSS_SUFFIX = re.compile(r"\s*<(eoh|eom)>\s*$")


def looks_like_moss(record) -> bool:
    return isinstance(record, dict) and isinstance(record.get("chat"), dict)


def _moss_text(turn: dict, key: str, turn_name: str) -> str:
    value = turn.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{turn_name} has no `{key}` string", kind=f"MOSS turn without {key}")
    return MOSS_SUFFIX.sub("", MOSS_PREFIX.sub("", value))


def read_moss(record: dict, columns: dict, tags: Tags | None, text_only: bool) -> Sample:
    """MOSS-003-SFT `meta_instruction` + `chat` {turn_1: {Human, MOSS, ...}, ...} -> Sample."""
    chat = record.get("chat")
    if not isinstance(chat, dict) or not chat:
        raise RecordError("missing or empty `chat` object", kind="missing or empty list of turns")
    names = sorted(chat, key=lambda k: int(k.rpartition("_")[2]) if k.rpartition("_")[2].isdigit() else -1)
    messages = []
    system = record.get("meta_instruction")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for name in names:
        turn = chat[name]
        if not isinstance(turn, dict):
            raise RecordError(f"`chat.{name}` is not an object with Human and MOSS", kind="MOSS turn not an object")
        messages.append({"role": "user", "content": _moss_text(turn, "Human", name)})
        messages.append({"role": "assistant", "content": _moss_text(turn, "MOSS", name)})
    return Sample(None, [], messages)
