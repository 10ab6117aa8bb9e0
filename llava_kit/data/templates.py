"""Chat templates: messages -> one prompt string plus the character spans the loss is computed on.

Every template goes through the same two steps, so training and chat build identical prompts:
`render()` here, then one tokenizer call with offsets in `encode.py`, which turns the character
spans into per-token labels. Named templates:

- `plain`      LLaVA-1.5 pretraining: the user turn keeps only its `<image>` tags, then the caption
               and EOS. No instructions, no roles.
- `vicuna_v1`  LLaVA-1.5 SFT: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (BOS first).
- `chatml`     "<|im_start|>role\n{content}<|im_end|>\n" turns (Qwen, many others); tools as Qwen2.5 and Hermes
               write them: the tool schemas in the system turn inside <tools></tools>, each call of the assistant
               as <tool_call>{"name", "arguments"}</tool_call>, tool results as a user turn of <tool_response> blocks.
- `tokenizer`  the tokenizer's own `chat_template` (Jinja, given `tools`), labelled by rendering prefixes.

Supervised spans cover each assistant answer (its text and its tool calls) and its end-of-turn marker; system,
user and tool-result tokens are ignored, and so is an assistant message with `weight` 0 (OpenAI's fine-tuning
field). The messages are the canonical ones of `llava_kit/data/readers/` (its docstring has their shape).
"""

from __future__ import annotations

import json
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


def check_roles(messages: list[dict]) -> None:
    """The order every template expects: an optional first system message, then a user turn; each user turn is
    answered by the assistant; an assistant message with `tool_calls` is followed by the tools' results (role
    `tool`), then the assistant goes on. System messages are not part of the order (the templates take the first
    one; training data refuses any other, llava_kit/data/readers/sample.py). Raises TemplateError naming the turn."""
    chat = [m for m in messages if m["role"] != "system"]
    previous = None
    for i, m in enumerate(chat):
        role = m["role"]
        if previous is None:
            allowed = ("user",)
        elif previous == "user":
            allowed = ("assistant",)
        elif previous == "tool":
            allowed = ("tool", "assistant")
        elif chat[i - 1].get("tool_calls"):  # an assistant's calls: their results come next
            allowed = ("tool",)
        else:
            allowed = ("user",)
        if role not in allowed:
            if role == "tool":
                why = "a tool result must follow the assistant's tool call (or another result)"
            else:
                why = f"{' or '.join(repr(a) for a in allowed)} was expected"
            raise TemplateError(f"bad roles: turn {i + 1} is {role!r} but {why}; conversations alternate user, "
                                "assistant, user, ... after an optional system message", kind="bad roles")
        previous = role


def trained(message: dict) -> bool:
    """Is this message supervised: an assistant message without `weight` 0."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def _refuse_tools(template: str, messages: list[dict], tools) -> None:
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise TemplateError(f"template {template} cannot render tools or tool calls; set data.template to chatml "
                            "(the Qwen2.5 / Hermes tool format) or tokenizer (the model's own chat template)",
                            kind=f"tool calls with template {template}")


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
    _refuse_tools("plain", messages, None)
    out = _Builder()
    out.add(tokenizer.bos_token or "")
    for m in messages:
        if m["role"] == "user":
            out.add(IMAGE_TOKEN * m["content"].count(IMAGE_TOKEN))
        elif m["role"] == "assistant":
            out.add(m["content"] + tokenizer.eos_token, supervised=trained(m))
    return Rendered(out.text(), out.spans, (tokenizer.eos_token,))


def _render_vicuna(messages, tokenizer, system_prompt, add_generation_prompt) -> Rendered:
    _refuse_tools("vicuna_v1", messages, None)
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
            out.add(f" {m['content']}{eos}", supervised=trained(m))
    return Rendered(out.text(), out.spans, (eos,))


CHATML_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{schemas}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
"""The tool block of the chatml system turn (the wording Qwen2.5 and Hermes models were trained with)."""


def chatml_tool_call(call: dict) -> str:
    """One call as chatml writes it: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>."""
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _chatml_system(system: str | None, tools) -> str | None:
    if not tools:
        return system
    schemas = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    block = CHATML_TOOLS.format(schemas=schemas)
    return f"{system}\n\n{block}" if system else block


def _render_chatml(messages, tokenizer, system_prompt, add_generation_prompt, tools=None) -> Rendered:
    out = _Builder()
    system = _chatml_system(_system_of(messages, system_prompt, CHATML_SYSTEM), tools)
    if system:
        out.add(f"<|im_start|>system\n{system}<|im_end|>\n")
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.add(f"<|im_start|>user\n{m['content']}<|im_end|>\n<|im_start|>assistant\n")
        elif m["role"] == "tool":  # consecutive results share one user turn, a <tool_response> block each
            first = messages[i - 1]["role"] != "tool"
            last = i + 1 == len(messages) or messages[i + 1]["role"] != "tool"
            out.add(("<|im_start|>user\n" if first else "\n") + f"<tool_response>\n{m['content']}\n</tool_response>"
                    + ("<|im_end|>\n<|im_start|>assistant\n" if last else ""))
        elif m["role"] == "assistant":
            calls = [chatml_tool_call(c) for c in m.get("tool_calls") or []]
            answer = "\n".join([m["content"], *calls] if m["content"] else calls)
            out.add(f"{answer}<|im_end|>", supervised=trained(m))
            out.add("\n")
    return Rendered(out.text(), out.spans, ("<|im_end|>",))


def _render_tokenizer(messages, tokenizer, system_prompt, add_generation_prompt, tools=None) -> Rendered:
    """Label the tokenizer's own template by rendering growing prefixes of the conversation.

    The span of assistant turn k is what render(messages[:k+1]) adds to
    render(messages[:k], add_generation_prompt=True). Templates whose renders are not prefixes of
    each other (some drop earlier reasoning) cannot be labelled this way and are refused, and so are templates
    that leave out the tools, the tool calls or their results (their tokens would silently vanish).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template `tokenizer` was chosen but the tokenizer has no chat_template; "
                            "choose a named template (vicuna_v1, chatml) in data.template")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]

    def render(msgs, gen, with_tools=True):
        return tokenizer.apply_chat_template(msgs, tools=(tools or None) if with_tools else None, tokenize=False,
                                             add_generation_prompt=gen)

    full = render(messages, add_generation_prompt)
    _check_tools_rendered(full, messages, tools, lambda: render(messages, add_generation_prompt, with_tools=False))
    spans = []
    for k, m in enumerate(messages):
        if not trained(m):
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


def _check_tools_rendered(full: str, messages: list[dict], tools, without_tools) -> None:
    """A Jinja template silently drops what it does not know (`tools`, `tool_calls`, role `tool`): refuse instead."""
    kind = "tool calls the tokenizer's chat template ignores"
    fix = "; set data.template to chatml (the Qwen2.5 / Hermes tool format), or use a model whose template has tools"
    if tools and full == without_tools():
        raise TemplateError("the tokenizer's chat_template ignores `tools`" + fix, kind=kind)
    for m in messages:
        names = [c["function"]["name"] for c in m.get("tool_calls") or []]
        if any(name not in full for name in names):
            raise TemplateError("the tokenizer's chat_template leaves out the assistant's `tool_calls`" + fix, kind=kind)
        if m["role"] == "tool" and m["content"].strip() and m["content"] not in full:
            raise TemplateError("the tokenizer's chat_template leaves out the tool results (role `tool`)" + fix,
                                kind=kind)


def render(messages: list[dict], tokenizer, template: str, system_prompt: str | None = None,
           add_generation_prompt: bool = False, tools: list[dict] | None = None) -> Rendered:
    """Render canonical messages (`{role, content}`, `<image>` in user content, tool calls) with a template.

    `tools` are the JSON schemas of the tools the conversation may call (OpenAI's `{"type": "function",
    "function": {...}}`). With `add_generation_prompt=True` the last message must be from the user (or a tool) and
    the text ends where the assistant's answer begins (for chat).
    """
    if template not in TEMPLATE_NAMES:
        raise TemplateError(f"unknown template {template!r}; valid: {', '.join(TEMPLATE_NAMES)}")
    check_roles(messages)
    if template == "plain":
        if tools:
            _refuse_tools("plain", messages, tools)
        return _render_plain(messages, tokenizer, add_generation_prompt)
    if template == "vicuna_v1":
        if tools:
            _refuse_tools("vicuna_v1", messages, tools)
        return _render_vicuna(messages, tokenizer, system_prompt, add_generation_prompt)
    if template == "chatml":
        return _render_chatml(messages, tokenizer, system_prompt, add_generation_prompt, tools)
    return _render_tokenizer(messages, tokenizer, system_prompt, add_generation_prompt, tools)
