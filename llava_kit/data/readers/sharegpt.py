"""ShareGPT records (LLaMA-Factory's `sharegpt` formatting) and LLaVA JSON, which is ShareGPT with `image`.

    {"conversations": [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A cat."},
                       {"from": "function_call", "value": "{\\"name\\": \\"f\\", \\"arguments\\": {...}}"},
                       {"from": "observation", "value": "..."}],
     "images": ["a.jpg"], "system": "...", "tools": "[{\\"name\\": \\"f\\", ...}]"}

`messages` instead of `conversations`, `role`/`content` instead of `from`/`value`, and LLaMA-Factory's role names
(human, gpt, function_call, observation, system) or OpenAI's all read. LLaVA JSON: `image` (a path or a list),
human/gpt turns. A dataset_info.json entry renames columns and tags (llava_kit/data/readers/dataset_info.py).
"""

from __future__ import annotations

import json

from llava_kit.data.readers.chat import Tags, Turns
from llava_kit.data.readers.sample import Sample, tool_schemas
from llava_kit.errors import RecordError


def looks_like_sharegpt(record) -> bool:
    return isinstance(record, dict) and "conversations" in record


def looks_like_llava(record) -> bool:
    return looks_like_sharegpt(record) and "image" in record


def read_sharegpt(record: dict, columns: dict, tags: Tags | None, text_only: bool) -> Sample:
    """A ShareGPT or LLaVA record -> Sample (unchecked; the registry checks every sample the same way)."""
    messages_key = columns.get("messages") or ("conversations" if "conversations" in record else "messages")
    turns = record.get(messages_key)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"missing or empty `{messages_key}` list", kind="missing or empty list of turns")
    parser = Turns(tags, text_only)
    messages = parser.messages(turns)
    images_key = columns.get("images") or ("images" if "images" in record else "image")
    images = parser.images(record.get(images_key), images_key)
    system_key = columns.get("system") or "system"
    system = record.get(system_key)
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    tools_key = columns.get("tools") or "tools"
    tools = tool_schemas(record.get(tools_key), tools_key)
    return Sample(None, images, messages, tools=tools)


def _sharegpt_turns(sample: Sample, user: str, assistant: str, what: str) -> list[dict]:
    turns = []
    for m in sample.messages:
        if m.get("weight") == 0:
            raise RecordError(f"an answer with weight 0 (not trained on) cannot be written as {what}",
                              kind=f"weight 0 not expressible in {what}")
        if m["role"] == "assistant" and m.get("tool_calls"):
            if m["content"]:
                raise RecordError(f"an answer with both text and tool calls cannot be written as {what} (a "
                                  "function_call turn holds calls only); convert to openai", kind=f"text and tool calls "
                                  f"in one turn not expressible in {what}")
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            turns.append({"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls,
                                                                         ensure_ascii=False)})
            continue
        name = {"user": user, "assistant": assistant, "tool": "observation", "system": "system"}[m["role"]]
        turns.append({"from": name, "value": m["content"]})
    return turns


def write_sharegpt(sample: Sample) -> dict:
    """LLaMA-Factory's ShareGPT record: `conversations` (human, gpt, function_call, observation), then `system`,
    `tools` (a JSON string) and `images` where the sample has them."""
    messages = sample.messages
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    body = Sample(sample.id, sample.images, messages[1:] if system is not None else messages, tools=sample.tools)
    record = {"id": sample.id} if sample.id is not None else {}
    record["conversations"] = _sharegpt_turns(body, "human", "gpt", "ShareGPT")
    if system is not None:
        record["system"] = system
    if sample.tools:
        record["tools"] = json.dumps([t["function"] for t in sample.tools], ensure_ascii=False)
    if sample.images:
        record["images"] = list(sample.images)
    return record


def write_llava(sample: Sample) -> dict:
    """LLaVA's record: `id`, `image` (a path, or a list for several), `conversations` of human/gpt (and system)
    turns. LLaVA JSON has no tools: a sample with tool calls is refused."""
    if sample.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in sample.messages):
        raise RecordError("LLaVA JSON has no tool calls; convert to sharegpt or openai",
                          kind="tool calls not expressible in LLaVA JSON")
    record = {"id": sample.id} if sample.id is not None else {}
    if sample.images:
        record["image"] = sample.images[0] if len(sample.images) == 1 else list(sample.images)
    record["conversations"] = _sharegpt_turns(sample, "human", "gpt", "LLaVA JSON")
    return record
