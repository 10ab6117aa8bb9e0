"""Turns of a chat record -> canonical messages and image paths: what ShareGPT, LLaVA and OpenAI records share.

A turn names its speaker in `role` (OpenAI) or `from` (ShareGPT) and holds its text in `content` or `value`
(LLaMA-Factory's `tags` may rename both). Its content is a string, where `<image>` tags mark images listed in the
record's `images` (or LLaVA's `image`), or a list of content parts: text, images (`image_url` with a path or a
`data:` URL; `image` with a source or as a placeholder for the next entry of `images`), LLaMA-Factory's `value`
parts and `tool_call` parts, xtuner's `<IMG_CONTEXT>` markers. Video and audio are refused everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_kit.data.readers.sample import parse_json, tool_call
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import RecordError

ROLES = {"system": "system", "developer": "system", "human": "user", "user": "user", "gpt": "assistant",
         "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
         "model": "assistant", "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
         "function_call": "call"}
"""Every role name of the published formats -> canonical role (`call`: ShareGPT's function_call turn, an assistant
message holding tool calls only)."""
ROLE_NAMES = "system/user/assistant/tool (or human/gpt/function_call/observation)"
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "image", "input_image")
VIDEO_PARTS = ("video", "video_url", "input_video")
AUDIO_PARTS = ("audio", "audio_url", "input_audio")
XTUNER_IMAGE = "<IMG_CONTEXT>"
VIDEO_FIX = "llava-kit trains on images only; drop these records, or turn the videos into frames (images)"


@dataclass(frozen=True)
class Tags:
    """LLaMA-Factory's `tags` of a dataset entry: which keys and role names a turn uses (None: any of the usual)."""

    role_tag: str | None = None
    content_tag: str | None = None
    roles: dict[str, str] | None = None
    """Role name -> canonical role (`call` for function_tag)."""


def refuse_video(record, columns: dict) -> None:
    """Video and audio records are refused with a clear reason until llava-kit supports them."""
    if not isinstance(record, dict):
        return
    for key in (columns.get("videos") or "videos", "video", columns.get("audios") or "audios", "audio"):
        if record.get(key) and "video" in key:
            raise RecordError(f"the record has video (`{key}`); {VIDEO_FIX}", kind="video not supported")
        if record.get(key):
            raise RecordError(f"the record has audio (`{key}`); llava-kit trains on images only",
                              kind="audio not supported")


class Turns:
    """Parses the turns of one record; `slots` collects the record's images in `<image>` order (None: a
    placeholder to be filled from the record's `images` list)."""

    def __init__(self, tags: Tags | None, text_only: bool):
        self.tags = tags or Tags()
        self.text_only = text_only
        self.slots: list[str | None] = []

    def messages(self, turns) -> list[dict]:
        """Canonical messages of a list of turns (ShareGPT's function_call turns become assistant tool calls)."""
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"turn {i + 1} is a {type(turn).__name__}, not an object with a role and a content",
                                  kind="turn not an object")
            messages.append(self.turn(turn, i + 1))
        return messages

    def turn(self, turn: dict, number: int) -> dict:
        role_key = self.tags.role_tag or ("role" if "role" in turn else "from")
        text_key = self.tags.content_tag or ("content" if "content" in turn or "role" in turn else "value")
        name = turn.get(role_key)
        roles = self.tags.roles or ROLES
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            expected = "/".join(self.tags.roles) if self.tags.roles else ROLE_NAMES
            hint = ("; xtuner's pretraining records (role pretrain) are read as LLaVA pretraining data: a user turn "
                    "with the `<image>` tags and an assistant turn with the caption" if name == "pretrain" else "")
            raise RecordError(f"turn {number} has unknown role {name!r} (expected {expected}){hint}",
                              kind=f"unknown role {name!r}")
        if role == "call":  # ShareGPT: the value is the call's JSON ({"name", "arguments"}, or a list of them)
            calls = parse_json(turn.get(text_key), f"turn {number}: the function_call", "tool call not valid JSON")
            calls = calls if isinstance(calls, list) else [calls]
            return {"role": "assistant", "content": "",
                    "tool_calls": [tool_call(c, f"turn {number}") for c in calls]}
        content = self.content(turn.get(text_key), text_key, number, role)
        message = {"role": role, "content": content.pop("text")}
        if role == "assistant":
            calls = [*content.pop("calls"), *self.openai_calls(turn, number)]
            if calls:
                message["tool_calls"] = calls
            weight = turn.get("weight", turn.get("loss_weight", 1))
            if weight not in (0, 1):  # booleans and 0.0 / 1.0 compare equal and pass
                raise RecordError(f"turn {number}: a weight of {weight!r}; only 0 (not trained on) or 1 are read",
                                  kind="weight other than 0 or 1")
            if weight == 0:
                message["weight"] = 0
        if role == "tool":
            message.update({k: turn[k] for k in ("tool_call_id", "name") if isinstance(turn.get(k), str)})
        return message

    def openai_calls(self, turn: dict, number: int) -> list[dict]:
        """OpenAI's `tool_calls` list, or its legacy `function_call` object."""
        calls = turn.get("tool_calls") or []
        if not isinstance(calls, list):
            raise RecordError(f"turn {number}: `tool_calls` must be a list", kind="tool_calls not a list")
        if isinstance(turn.get("function_call"), dict):
            calls = [*calls, turn["function_call"]]
        return [tool_call(c, f"turn {number}") for c in calls]

    def content(self, value, key: str, number: int, role: str) -> dict:
        """{"text": content with `<image>` tags, "calls": tool calls from parts}; images go to `self.slots`."""
        if value is None:
            return {"text": "", "calls": []}
        if isinstance(value, str):
            self.refuse_media_tags(value, number)
            self.slots += [None] * value.count(IMAGE_TOKEN)
            return {"text": value, "calls": []}
        if isinstance(value, list):
            return self.parts(value, number, role)
        raise RecordError(f"turn {number}: `{key}` is a {type(value).__name__}; expected a string or a list of "
                          "content parts", kind="content not a string or parts")

    def refuse_media_tags(self, text: str, number: int) -> None:
        for tag, medium in (("<video>", "video"), ("<VIDEO_CONTEXT>", "video"), ("<audio>", "audio")):
            if tag in text:
                raise RecordError(f"turn {number} has a {tag} tag; "
                                  + (VIDEO_FIX if medium == "video" else "llava-kit trains on images only"),
                                  kind=f"{medium} not supported")

    def parts(self, parts: list, number: int, role: str) -> dict:
        """Content parts -> text (pieces joined by a newline; an image is `<image>`) and tool calls."""
        pieces, calls, images = [], [], []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in TEXT_PARTS:
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    raise RecordError(f"turn {number}: a {kind!r} part without a `text` (or `value`) string",
                                      kind="text part without text")
                self.refuse_media_tags(text, number)
                pieces.append(text)
            elif kind in IMAGE_PARTS:
                if self.text_only:
                    raise RecordError(f"a content part of type {kind!r}: text stages read text parts only; records "
                                      "with images train with stage sft", kind="images in a text stage")
                images.append(image_source(part, number))
                pieces.append(IMAGE_TOKEN)
            elif kind in VIDEO_PARTS or kind in AUDIO_PARTS:
                medium = "video" if kind in VIDEO_PARTS else "audio"
                raise RecordError(f"turn {number} has a {kind!r} part; "
                                  + (VIDEO_FIX if medium == "video" else "llava-kit trains on images only"),
                                  kind=f"{medium} not supported")
            elif kind == "tool_call" and role == "assistant":  # LLaMA-Factory: {"type": "tool_call", "value": JSON}
                calls.append(tool_call(part.get("value", part.get("text")), f"turn {number}"))
            elif kind in ("reasoning", "thinking"):
                raise RecordError(f"turn {number} has a {kind!r} part; llava-kit does not train reasoning traces "
                                  "apart from the answer: write them into the answer's text (e.g. <think>...</think>) "
                                  "or drop them", kind="reasoning parts not supported")
            else:
                raise RecordError(f"turn {number}: a content part of type {kind!r} is not read (text, image_url, "
                                  "image and tool_call parts are)", kind=f"content part of type {kind!r}")
        text = "\n".join(pieces)
        markers = sum(p.count(XTUNER_IMAGE) for p in pieces)
        if markers:  # xtuner: the image parts come first, `<IMG_CONTEXT>` in the text marks where each goes
            if markers != len(images):
                raise RecordError(f"turn {number}: {markers} {XTUNER_IMAGE} marker(s) for {len(images)} image part(s)",
                                  kind="`<image>` tags do not match the images")
            text = "\n".join(p for p in pieces if p != IMAGE_TOKEN).replace(XTUNER_IMAGE, IMAGE_TOKEN)
        self.slots += images
        return {"text": text, "calls": calls}

    def images(self, listed, key: str) -> list[str]:
        """The record's images in `<image>` order: parts' own sources, placeholders filled from `listed`."""
        if listed is None:
            listed = []
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not all(isinstance(i, str) and i for i in listed):
            raise RecordError(f"`{key}` must be a path string or a list of path strings", kind="bad image list")
        if listed and self.text_only:
            raise RecordError("the record has images; text stages train on text only (use stage sft for images)",
                              kind="images in a text stage")
        placeholders = self.slots.count(None)
        if placeholders != len(listed):
            raise RecordError(f"{len(self.slots)} `<image>` tag(s) in the text but "
                              f"{len(listed) + len(self.slots) - placeholders} image(s) in the record",
                              kind="`<image>` tags do not match the images")
        filling = iter(listed)
        return [slot if slot is not None else next(filling) for slot in self.slots]


def image_source(part: dict, number: int) -> str | None:
    """The path or `data:` URL of an image part, None for a placeholder (`{"type": "image"}`)."""
    value = next((part[k] for k in ("image_url", "image", "url", "path", "value") if part.get(k)), None)
    if isinstance(value, dict):
        value = value.get("url") or value.get("path")
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"turn {number}: an image part whose source is a {type(value).__name__}",
                          kind="bad image part")
    if value.startswith(("http://", "https://")):
        raise RecordError(f"turn {number}: a remote image URL ({value[:60]}); llava-kit trains on local files: download "
                          "the images and give their paths (relative to data.image_root) or data: URLs",
                          kind="remote image URL")
    return value.removeprefix("file://")
