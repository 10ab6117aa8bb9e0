"""Tool calls: rendered with chatml (the Qwen2.5 / Hermes format) or the tokenizer's own template given `tools`;
loss on the assistant's calls and answers, never on tool results, asserted token by token."""

import copy
import json

import pytest

from llava_kit.config import DataConfig
from llava_kit.data.encode import encode_messages
from llava_kit.data.readers import read_record
from llava_kit.data.templates import CHATML_TOOLS, TemplateError
from llava_kit.data.text import build_text_dataset
from tests.unit.test_readers import runs

TOOLS = [{"name": "weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
GLAIVE = {"conversations": [  # LLaMA-Factory's tool-call ShareGPT (glaive_toolcall_en_demo)
    {"from": "human", "value": "Weather in Paris and Rome?"},
    {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Paris"}},
                                                   {"name": "weather", "arguments": {"city": "Rome"}}])},
    {"from": "observation", "value": "{\"Paris\": 21}"},
    {"from": "observation", "value": "{\"Rome\": 25}"},
    {"from": "gpt", "value": "Paris 21, Rome 25."},
    {"from": "human", "value": "Thanks!"},
    {"from": "gpt", "value": "You are welcome."}],
    "system": "You help.", "tools": json.dumps(TOOLS)}
SCHEMAS = "".join("\n" + json.dumps({"type": "function", "function": t}) for t in TOOLS)
CALL_PARIS = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_ROME = '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def sample():
    return read_record(GLAIVE, "glaive.json[0]", "auto", "text-sft")[0]


def test_chatml_tool_calls_are_supervised_and_tool_results_are_not(tiny_tokenizer):
    s = sample()
    enc = encode_messages(s.messages, tiny_tokenizer, "chatml", -1, 0, None, tools=s.tools)
    system = "You help.\n\n" + CHATML_TOOLS.format(schemas=SCHEMAS)
    assert runs(tiny_tokenizer, enc.input_ids, enc.labels) == [
        (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        (f"{CALL_PARIS}\n{CALL_ROME}<|im_end|>", True),                                     # the calls
        ("\n<|im_start|>user\n<tool_response>\n{\"Paris\": 21}\n</tool_response>\n<tool_response>\n{\"Rome\": 25}"
         "\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),                   # the results: ignored
        ("Paris 21, Rome 25.<|im_end|>", True),
        ("\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n", False),
        ("You are welcome.<|im_end|>", True),
        ("\n", False)]


TOOL_JINJA = (  # a Qwen2.5-style template written for this test: the same text as llava-kit's chatml
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- '<|im_start|>system\n' + m.content -}}"
    "{%- if tools -%}{{- '\n\n' + PREFIX -}}{%- for t in tools -%}{{- '\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- SUFFIX -}}{%- endif -%}{{- '<|im_end|>\n' -}}"
    "{%- elif m.role == 'user' -%}{{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' -}}"
    "{%- elif m.role == 'assistant' -%}{{- '<|im_start|>assistant\n' + m.content -}}"
    "{%- for c in m.tool_calls or [] -%}{%- if m.content or not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{{- '<tool_call>\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + (c.function.arguments | tojson)"
    " + '}\n</tool_call>' -}}{%- endfor -%}{{- '<|im_end|>\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")


def test_the_tokenizers_own_template_gets_the_tools_and_the_same_labels(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    prefix, suffix = (json.dumps(p) for p in CHATML_TOOLS.split("{schemas}"))
    tokenizer.chat_template = ("{%- set PREFIX = " + prefix.replace("{{", "{").replace("}}", "}") + " -%}"
                               "{%- set SUFFIX = " + suffix.replace("{{", "{").replace("}}", "}") + " -%}" + TOOL_JINJA)
    s = sample()
    ours = encode_messages(s.messages, tokenizer, "tokenizer", -1, 0, None, tools=s.tools)
    chatml = encode_messages(s.messages, tokenizer, "chatml", -1, 0, None, tools=s.tools)
    assert tokenizer.decode(ours.input_ids) == tokenizer.decode(chatml.input_ids)
    assert ours.input_ids == chatml.input_ids and ours.labels == chatml.labels


def test_templates_that_would_drop_the_tools_are_refused(tiny_tokenizer):
    s = sample()
    with pytest.raises(TemplateError, match="chat_template ignores `tools`.*set data.template to chatml"):
        encode_messages(s.messages, tiny_tokenizer, "tokenizer", -1, 0, None, tools=s.tools)  # tiny: no tools
    with pytest.raises(TemplateError, match="leaves out the assistant's `tool_calls`"):
        encode_messages(s.messages, tiny_tokenizer, "tokenizer", -1, 0, None)
    with pytest.raises(TemplateError, match="template vicuna_v1 cannot render tools"):
        encode_messages(s.messages, tiny_tokenizer, "vicuna_v1", -1, 0, None, tools=s.tools)


def test_text_sft_keeps_tool_records_and_counts_what_it_cannot_render(tiny_tokenizer, tmp_path):
    no_call = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
               "tools": json.dumps(TOOLS)}  # tools offered, none called: the schemas are still rendered
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps([GLAIVE, no_call]))
    dataset = build_text_dataset(DataConfig(path=str(path), template="chatml", max_seq_len=2048, cache=False,
                                            overlong="skip"), "text-sft", tiny_tokenizer)
    assert len(dataset) == 2 and dataset.report.skipped == []
    assert all("<tools>" in tiny_tokenizer.decode(item["input_ids"]) for item in dataset.items)
    from llava_kit.data.dataset import BadRecordError

    with pytest.raises(BadRecordError, match=r"no usable records: all 2 were skipped \(tool calls the tokenizer's "
                                             r"chat template ignores: 2\)") as err:
        build_text_dataset(DataConfig(path=str(path), template="tokenizer", max_seq_len=2048, cache=False,
                                      overlong="skip"), "text-sft", tiny_tokenizer)
    assert [b.source for b in err.value.report.skipped] == ["glaive.json[0]", "glaive.json[1]"]
