"""Alpaca records (LLaMA-Factory's default `alpaca` formatting), with `history` turns and, for images, `images`.

    {"instruction": "What is this?", "input": "(optional)", "output": "A cat.", "system": "(optional)",
     "history": [["earlier question", "earlier answer"]], "images": ["a.jpg"]}

`input` joins the instruction after a blank line. A dataset_info.json entry renames the columns (prompt, query,
response, history, system, images, tools).
"""

from __future__ import annotations

from llava_kit.data.readers.chat import Tags, Turns
from llava_kit.data.readers.sample import Sample, tool_schemas
from llava_kit.errors import RecordError


def looks_like_alpaca(record) -> bool:
    return isinstance(record, dict) and "instruction" in record and "output" in record


def _string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"`{key}` must be a string, got {type(value).__name__}", kind=f"`{key}` not a string")
    return value


def read_alpaca(record: dict, columns: dict, tags: Tags | None, text_only: bool) -> Sample:
    """Alpaca instruction/input/output (+ system, history, images) -> Sample."""
    instruction = _string(record, columns.get("prompt") or "instruction")
    extra = _string(record, columns.get("query") or "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if not user.strip():
        raise RecordError("empty instruction", kind="empty instruction")
    system = _string(record, columns.get("system") or "system", required=False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    history_key = columns.get("history") or "history"
    history = record.get(history_key) or []
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise RecordError(f"`{history_key}` must be a list of [question, answer] string pairs", kind="bad history")
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": _string(record, columns.get("response") or "output")}]
    parser = Turns(tags, text_only)
    for i, m in enumerate(messages):
        parser.content(m["content"], "content", i + 1, m["role"])  # counts the `<image>` tags, refuses video tags
    images_key = columns.get("images") or ("images" if "images" in record else "image")  # LLaVA's Q&A files: `image`
    images = parser.images(record.get(images_key), images_key)
    tools_key = columns.get("tools") or "tools"
    return Sample(None, images, messages, tools=tool_schemas(record.get(tools_key), tools_key))
