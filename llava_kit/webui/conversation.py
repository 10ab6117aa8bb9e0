"""A web chat's conversation: turns of (images, question, answer), as llava-kit messages and as chat bubbles.

Kept apart from the Gradio page (app.py) so the bookkeeping reads, and is tested, without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import UsageError


@dataclass
class Turn:
    """One user message (images first, then text, as `llava-kit chat` prompts) and the model's answer."""

    text: str
    images: list[str] = field(default_factory=list)
    """Paths of the uploaded images (Gradio's upload cache)."""
    answer: str | None = None
    """None while it is being generated (and before)."""


def new_turn(value: dict | None) -> Turn | None:
    """The turn a MultimodalTextbox value asks for ({"text", "files"}), or None when it is empty."""
    value = value or {}
    text = (value.get("text") or "").strip()
    files = [f if isinstance(f, str) else f.get("path") for f in value.get("files") or []]
    if not text and not files:
        return None
    if IMAGE_TOKEN in text:
        raise UsageError(f"the text contains {IMAGE_TOKEN!r}, which stands for an image here; attach images with "
                         "the paperclip instead")
    return Turn(text, [f for f in files if f])


def messages_of(turns: list[Turn]) -> tuple[list[dict], list[str]]:
    """llava-kit messages of the conversation up to its last question (whose answer is left out: it is the one to
    generate) and its image paths in the order of their `<image>` tags."""
    messages, images = [], []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": f"{IMAGE_TOKEN}\n" * len(turn.images) + turn.text})
        images += turn.images
        if i < len(turns) - 1:  # an earlier turn stopped before its first word still had its turn
            messages.append({"role": "assistant", "content": turn.answer or ""})
    return messages, images


def bubbles(turns: list[Turn], pending: str = "") -> list[dict]:
    """The conversation as Gradio chat messages: each image, the question, then the answer (or what has been
    generated of it so far, `pending`, for the last turn)."""
    shown = []
    for i, turn in enumerate(turns):
        shown += [{"role": "user", "content": {"path": path}} for path in turn.images]
        if turn.text:
            shown.append({"role": "user", "content": turn.text})
        if turn.answer is not None:
            shown.append({"role": "assistant", "content": turn.answer or "(an empty answer)"})
        elif pending and i == len(turns) - 1:
            shown.append({"role": "assistant", "content": pending})
    return shown
