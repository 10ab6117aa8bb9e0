"""llava-kit's named chat templates as Jinja, for exported processors and tokenizers.

`render()` in `data/templates.py` is the reference; each template here renders the same text for the same
messages (tested), so `processor.apply_chat_template(...)` on an exported model builds the prompt llava-kit
trained with. Content may be a string (with `<image>` inline, llava-kit's form) or a list of parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`, transformers' multimodal form): an image part becomes
`<image>\\n`, as `llava-kit chat` writes it.

The first line of every template is a Jinja comment carrying the inference settings as JSON
(`{#- llava-kit: {...} -#}`), so importing the export restores them exactly.
"""

from __future__ import annotations

import json
import re

from llava_kit.data.templates import CHATML_SYSTEM, CHATML_TOOLS, IMAGE_TOKEN, VICUNA_SYSTEM
from llava_kit.errors import ExportError

_MARKER = re.compile(r"^\{#- llava-kit: (\{.*?\}) -#\}")

# Concatenating the content of string or list-of-parts messages.
_CONTENT_MACRO = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- elif m['content'] -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro n_images(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'].count('" + IMAGE_TOKEN + "') }}"
    "{%- else -%}{{ m['content'] | selectattr('type', 'equalto', 'image') | list | length }}{%- endif -%}"
    "{%- endmacro -%}"
)


_TOOLS_PREFIX, _TOOLS_SUFFIX = CHATML_TOOLS.split("{schemas}")
# chatml's tools as templates.py renders them: the schemas in the system turn, each call as <tool_call>, consecutive
# tool results in one user turn of <tool_response> blocks.
_CHATML_TOOLS = (
    "{%- if tools -%}{%- set ns.tools = " + json.dumps(_TOOLS_PREFIX.replace("{{", "{").replace("}}", "}")) + " -%}"
    "{%- for t in tools -%}{%- set ns.tools = ns.tools + '\n' + (t | tojson) -%}{%- endfor -%}"
    "{%- set ns.tools = ns.tools + " + json.dumps(_TOOLS_SUFFIX.replace("{{", "{").replace("}}", "}")) + " -%}"
    "{%- set ns.system = (ns.system + '\n\n' + ns.tools) if ns.system else ns.tools -%}{%- endif -%}")
_CHATML_CALLS = (
    "{%- for c in m['tool_calls'] or [] -%}{%- if m['content'] or not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{%- set args = c['function']['arguments'] -%}"
    "{{ '<tool_call>\n{\"name\": ' + (c['function']['name'] | tojson) + ', \"arguments\": ' "
    "+ (args if args is string else (args | tojson)) + '}\n</tool_call>' }}{%- endfor -%}")
_CHATML_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\n<tool_response>\n' + content(m) + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{ '<|im_end|>\n<|im_start|>assistant\n' }}{%- endif -%}")


def _literal(text: str | None) -> str:
    """A Jinja string literal (JSON's double-quoted form is one)."""
    return json.dumps(text or "", ensure_ascii=False)


def _system_block(default: str | None) -> str:
    """Sets ns.system: the system message's content, else the default."""
    return ("{%- set ns = namespace(system=" + _literal(default) + ", first=true) -%}"
            "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = content(m) -%}"
            "{%- endif -%}{%- endfor -%}")


def jinja_template(template: str, tokenizer, system_prompt: str | None, settings: dict) -> str:
    """The Jinja chat template equivalent to llava-kit's `template`, with `settings` in its marker comment."""
    marker = "{#- llava-kit: " + json.dumps(settings, sort_keys=True) + " -#}"
    bos, eos = _literal(tokenizer.bos_token), _literal(tokenizer.eos_token)
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ExportError("the model uses template `tokenizer` but its tokenizer has no chat_template")
        if system_prompt is None:
            return marker + tokenizer.chat_template
        # llava-kit prepends the configured system prompt when the conversation has none: so does this.
        prepend = ("{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 -%}"
                   "{%- set messages = [{'role': 'system', 'content': " + _literal(system_prompt) + "}] + messages -%}"
                   "{%- endif -%}")
        return marker + prepend + tokenizer.chat_template
    if template == "plain":
        body = ("{{ " + bos + " }}{%- for m in messages -%}"
                "{%- if m['role'] == 'user' -%}{{ '" + IMAGE_TOKEN + "' * (n_images(m) | int) }}"
                "{%- elif m['role'] == 'assistant' -%}{{ content(m) + " + eos + " }}{%- endif -%}{%- endfor -%}")
        return marker + _CONTENT_MACRO + body
    if template == "chatml":
        default = system_prompt if system_prompt is not None else CHATML_SYSTEM
        body = (_system_block(default) + _CHATML_TOOLS +
                "{%- if ns.system -%}{{ '<|im_start|>system\n' + ns.system + '<|im_end|>\n' }}{%- endif -%}"
                "{%- for m in messages -%}"
                "{%- if m['role'] == 'user' -%}"
                "{{ '<|im_start|>user\n' + content(m) + '<|im_end|>\n<|im_start|>assistant\n' }}"
                "{%- elif m['role'] == 'assistant' -%}{{ content(m) }}" + _CHATML_CALLS + "{{ '<|im_end|>\n' }}"
                "{%- elif m['role'] == 'tool' -%}" + _CHATML_RESULT + "{%- endif -%}"
                "{%- endfor -%}")
        return marker + _CONTENT_MACRO + body
    if template == "vicuna_v1":
        default = system_prompt if system_prompt is not None else VICUNA_SYSTEM
        body = (_system_block(default) + "{{ " + bos + " + ns.system }}"
                "{%- for m in messages -%}"
                "{%- if m['role'] == 'user' -%}"
                "{{ (' ' if ns.first else '') + 'USER: ' + content(m) + ' ASSISTANT:' }}{%- set ns.first = false -%}"
                "{%- elif m['role'] == 'assistant' -%}{{ ' ' + content(m) + " + eos + " }}{%- endif -%}"
                "{%- endfor -%}")
        return marker + _CONTENT_MACRO + body
    raise ExportError(f"no Jinja equivalent for template {template!r}")


def settings_from_template(chat_template: str | None) -> dict | None:
    """The inference settings a template written by `jinja_template` carries; None for any other template."""
    match = _MARKER.match(chat_template or "")
    return json.loads(match.group(1)) if match else None
