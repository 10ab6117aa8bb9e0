"""Chat templates: messages -> one prompt string plus the character spans the loss is computed on.

Every template goes through the same two steps, so training and chat build identical prompts:
`render()` here, then one tokenizer call with offsets in `encode.py`, which turns the character
spans into per-token labels. Named templates:

- `plain`      LLaVA-1.5 pretraining: the user turn keeps only its `<image>` tags, then the caption
               and EOS. No instructions, no roles.
- `vicuna_v1`  LLaVA-1.5 SFT: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (BOS first).
- `chatml`     "<|im_start|>role\n{content}<|im_end|>\n" turns (Qwen, many others).
- `tokenizer`  the tokenizer's own `chat_template` (Jinja), labelled by rendering prefixes.

Supervised spans cover each assistant answer and its end-of-turn marker; everything else is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_kit.config import TEMPLATE_NAMES
from llava_kit.errors import DataError

IMAGE_TOKEN = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."


class TemplateError(DataError):
    """The messages cannot be rendered with the chosen template."""


@dataclass
class Rendered:
    text: str
    """The full prompt string (special tokens as text; tokenize with add_special_tokens=False)."""
    label_spans: list[tuple[int, int]]
    """Character ranges [start, end) of `text` whose tokens are supervised."""
    stop_strings: tuple[str, ...]
    """End-of-turn markers that should end generation."""


def _check_roles(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages if m["role"] != "system"]
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(f"turn {i + 1} is from {role!r} but {expected!r} was expected; "
                                "conversations alternate user, assistant, user, ... after an optional system message")


def _system_of(messages: list[dict], system_prompt: str | None, default: str | None) -> str | None:
    for m in messages:
        if m["role"] == "system":
            return m["content"]
    return system_prompt if system_prompt is not None else default


class _Builder:
    """Appends text pieces and records which ones are supervised."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised and text:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def text(self) -> str:
        return "".join(self.parts)


def _render_plain(messages, tokenizer, add_generation_prompt) -> Rendered:
    out = _Builder()
    out.add(tokenizer.bos_token or "")
    for m in messages:
        if m["role"] == "user":
            out.add(IMAGE_TOKEN * m["content"].count(IMAGE_TOKEN))
        elif m["role"] == "assistant":
            out.add(m["content"] + tokenizer.eos_token, supervised=True)
    return Rendered(out.text(), out.spans, (tokenizer.eos_token,))


def _render_vicuna(messages, tokenizer, system_prompt, add_generation_prompt) -> Rendered:
    eos = tokenizer.eos_token
    out = _Builder()
    out.add((tokenizer.bos_token or "") + (_system_of(messages, system_prompt, VICUNA_SYSTEM) or ""))
    first_turn = True
    for m in messages:
        if m["role"] == "user":
            # LLaVA's conv_vicuna_v1: a space after the system prompt, none after "</s>".
            out.add(f"{' ' if first_turn else ''}USER: {m['content']} ASSISTANT:")
            first_turn = False
        elif m["role"] == "assistant":
            # The space before the answer is part of the answer's first BPE token, so it is supervised.
            out.add(f" {m['content']}{eos}", supervised=True)
    return Rendered(out.text(), out.spans, (eos,))


def _render_chatml(messages, tokenizer, system_prompt, add_generation_prompt) -> Rendered:
    out = _Builder()
    system = _system_of(messages, system_prompt, CHATML_SYSTEM)
    if system:
        out.add(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        if m["role"] == "user":
            out.add(f"<|im_start|>user\n{m['content']}<|im_end|>\n<|im_start|>assistant\n")
        elif m["role"] == "assistant":
            out.add(f"{m['content']}<|im_end|>", supervised=True)
            out.add("\n")
    return Rendered(out.text(), out.spans, ("<|im_end|>",))


def _render_tokenizer(messages, tokenizer, system_prompt, add_generation_prompt) -> Rendered:
    """Label the tokenizer's own template by rendering growing prefixes of the conversation.

    The span of assistant turn k is what render(messages[:k+1]) adds to
    render(messages[:k], add_generation_prompt=True). Templates whose renders are not prefixes of
    each other (some drop earlier reasoning) cannot be labelled this way and are refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template `tokenizer` was chosen but the tokenizer has no chat_template; "
                            "choose a named template (vicuna_v1, chatml) in data.template")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, add_generation_prompt)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:k], True)
        upto = render(messages[: k + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError("the tokenizer's chat_template renders turns differently depending on what follows, "
                                "so answers cannot be located; choose a named template (chatml, vicuna_v1)")
        end = len(upto.rstrip("\n"))  # the newline after an end-of-turn marker is not an answer
        spans.append((len(before), end))
    stops = tuple(t for t in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>") if t and t in full)
    return Rendered(full, spans, stops or (tokenizer.eos_token,))


def render(messages: list[dict], tokenizer, template: str, system_prompt: str | None = None,
           add_generation_prompt: bool = False) -> Rendered:
    """Render canonical messages (`{role, content}`, `<image>` in user content) with a template.

    With `add_generation_prompt=True` the last message must be from the user and the text ends
    where the assistant's answer begins (for chat).
    """
    if template not in TEMPLATE_NAMES:
        raise TemplateError(f"unknown template {template!r}; valid: {', '.join(TEMPLATE_NAMES)}")
    _check_roles(messages)
    if template == "plain":
        return _render_plain(messages, tokenizer, add_generation_prompt)
    if template == "vicuna_v1":
        return _render_vicuna(messages, tokenizer, system_prompt, add_generation_prompt)
    if template == "chatml":
        return _render_chatml(messages, tokenizer, system_prompt, add_generation_prompt)
    return _render_tokenizer(messages, tokenizer, system_prompt, add_generation_prompt)
