"""OpenAI chat messages: the fine-tuning JSONL, content parts, tool calls; LLaMA-Factory's and xtuner's variants.

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                        "function": {"name": "f", "arguments": "{...}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "..."},
                  {"role": "assistant", "content": "A cat.", "weight": 1}],
     "tools": [{"type": "function", "function": {"name": "f", "description": "...", "parameters": {...}}}]}

Also read: string content with `<image>` tags and a top-level `images` list (LLaMA-Factory's mllm_demo),
`{"type": "image"}` placeholder parts filled from `images` (transformers, TRL), `{"type": "text", "value"}` parts
(LLaMA-Factory's v1), `<IMG_CONTEXT>` markers (xtuner), a line that is a bare list of messages (xtuner), the legacy
`functions` / `function_call` / role `function`, `weight` 0 on an answer (not trained on), and consecutive user
messages (OpenAI's vision fine-tuning examples send the question and the image apart), which become one.
"""

from __future__ import annotations

import json
import re

from llava_kit.data.readers.chat import Tags, Turns
from llava_kit.data.readers.sample import Sample, tool_schemas
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import RecordError


def looks_like_openai(record) -> bool:
    if isinstance(record, list):  # xtuner: one list of messages per line
        return bool(record) and all(isinstance(m, dict) and "role" in m for m in record)
    return isinstance(record, dict) and "messages" in record


def read_openai(record, columns: dict, tags: Tags | None, text_only: bool) -> Sample:
    """An OpenAI-style record -> Sample (unchecked; the registry checks every sample the same way)."""
    if isinstance(record, list):
        record = {"messages": record}
    messages_key = columns.get("messages") or "messages"
    turns = record.get(messages_key)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"missing or empty `{messages_key}` list", kind="missing or empty list of turns")
    parser = Turns(tags, text_only)
    messages = merge_user_turns(parser.messages(turns))
    images_key = columns.get("images") or "images"
    images = parser.images(record.get(images_key), images_key)
    tools_key = columns.get("tools") or ("tools" if "tools" in record else "functions")
    return Sample(None, images, messages, tools=tool_schemas(record.get(tools_key), tools_key))


def merge_user_turns(messages: list[dict]) -> list[dict]:
    """Consecutive user messages become one (their texts joined by a newline): OpenAI's vision fine-tuning examples
    send the question and the image as two user messages in a row."""
    merged = []
    for m in messages:
        if merged and m["role"] == "user" and merged[-1]["role"] == "user":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(m)
    return merged


def _parts(content: str, images: list[str]) -> str | list[dict]:
    """Content with `<image>` tags -> OpenAI content parts (the newline that joins a tag to its text is the parts'
    boundary, so reading the parts back gives the same content)."""
    if IMAGE_TOKEN not in content:
        return content
    parts = []
    for piece in re.split(f"({re.escape(IMAGE_TOKEN)})", content):
        if piece == IMAGE_TOKEN:
            parts.append({"type": "image_url", "image_url": {"url": images.pop(0)}})
        elif piece:
            parts.append({"type": "text", "text": piece})
    for i, part in enumerate(parts):  # strip the joining newlines next to image parts
        if part["type"] == "text":
            if i > 0 and parts[i - 1]["type"] == "image_url":
                part["text"] = part["text"].removeprefix("\n")
            if i + 1 < len(parts) and parts[i + 1]["type"] == "image_url":
                part["text"] = part["text"].removesuffix("\n")
    return [p for p in parts if p["type"] != "text" or p["text"]]


def write_openai(sample: Sample) -> dict:
    """OpenAI's chat record: image parts (`image_url` with the path or data: URL), `tool_calls` with JSON-string
    arguments and ids, `tool` messages with `tool_call_id`, `tools`, `weight` 0 where an answer is not trained."""
    images = list(sample.images)
    messages, pending = [], []
    for m in sample.messages:
        out = {"role": m["role"]}
        if m["role"] == "user":
            out["content"] = _parts(m["content"], images)
        elif m["content"] or not m.get("tool_calls"):
            out["content"] = m["content"]
        if m.get("tool_calls"):
            out["tool_calls"] = []
            for call in m["tool_calls"]:
                call_id = call.get("id") or f"call_{len(messages)}_{len(out['tool_calls'])}"
                pending.append(call_id)
                out["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": call["function"]["name"],
                    "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}})
        if m["role"] == "tool":
            out["tool_call_id"] = m.get("tool_call_id") or (pending.pop(0) if pending else "call_0")
            if m.get("name"):
                out["name"] = m["name"]
        if m.get("weight") == 0:
            out["weight"] = 0
        messages.append(out)
    record = {"id": sample.id} if sample.id is not None else {}
    record["messages"] = messages
    if sample.tools:
        record["tools"] = sample.tools
    return record
