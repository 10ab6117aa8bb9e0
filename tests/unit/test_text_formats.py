"""Text-sft formats -> canonical messages, and their label masks asserted token by token for every template."""

import json

import pytest

from llava_kit.data.encode import IGNORE_INDEX, encode_messages
from llava_kit.data.readers import detect_format, read_record, read_records
from llava_kit.data.templates import CHATML_SYSTEM


def record_to_text_sample(record, source, fmt):
    return read_record(record, source, fmt, stage="text-sft")[0]


def read_conversation_records(records):
    result = read_records(records, "auto", stage="text-sft")
    return result.samples, result.bad

SYSTEM = "You are Lumen."
TURNS = [("Who are you?", "I am Lumen."), ("What can you do?", "I answer questions.")]

RECORDS = {
    "sharegpt": {"system": SYSTEM, "conversations": [
        {"from": "human", "value": TURNS[0][0]}, {"from": "gpt", "value": TURNS[0][1]},
        {"from": "human", "value": TURNS[1][0]}, {"from": "gpt", "value": TURNS[1][1]}]},
    "openai": {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TURNS[0][0]}, {"role": "assistant", "content": TURNS[0][1]},
        {"role": "user", "content": TURNS[1][0]}, {"role": "assistant", "content": TURNS[1][1]}]},
    "moss": {"conversation_id": 7, "meta_instruction": SYSTEM, "num_turns": 2, "chat": {
        "turn_2": {"Human": f"<|Human|>: {TURNS[1][0]}<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                   "MOSS": f"<|MOSS|>: {TURNS[1][1]}<eom>\n"},
        "turn_1": {"Human": f"<|Human|>: {TURNS[0][0]}<eoh>\n", "MOSS": f"<|MOSS|>: {TURNS[0][1]}<eom>\n"}}},
    # Alpaca is single-turn: input joins the instruction after a blank line
    "alpaca": {"system": SYSTEM, "instruction": "Who are you?", "input": "Answer briefly.", "output": "I am Lumen."},
}
ALPACA_TURNS = [("Who are you?\n\nAnswer briefly.", "I am Lumen.")]


def expected_messages(fmt):
    turns = ALPACA_TURNS if fmt == "alpaca" else TURNS
    out = [{"role": "system", "content": SYSTEM}]
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_format_reads_into_canonical_messages(fmt):
    assert detect_format(RECORDS[fmt]) == fmt
    for given in (fmt, "auto"):
        sample = record_to_text_sample(RECORDS[fmt], "x:1", given)
        assert sample.messages == expected_messages(fmt) and sample.images == []


def runs(tokenizer, ids, labels):
    """Consecutive tokens grouped by supervised / ignored, each group decoded: the mask, token by token."""
    out = []
    for token, label in zip(ids, labels, strict=True):
        assert label in (token, IGNORE_INDEX)  # a label is the token itself or ignored, never anything else
        supervised = label != IGNORE_INDEX
        if out and out[-1][1] == supervised:
            out[-1][0].append(token)
        else:
            out.append(([token], supervised))
    return [(tokenizer.decode(group), supervised) for group, supervised in out]


def expected_runs(template, messages):
    """The exact text of every ignored and supervised stretch, written out per template."""
    system = messages[0]["content"]
    pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(1, len(messages), 2)]
    out = []
    if template == "vicuna_v1":
        ignored = f"<s>{system} "
        for q, a in pairs:
            out += [(f"{ignored}USER: {q} ASSISTANT:", False), (f" {a}</s>", True)]
            ignored = ""
        return out
    ignored = f"<|im_start|>system\n{system}<|im_end|>\n"  # chatml and the tiny tokenizer's own (chatml) template
    for q, a in pairs:
        out += [(f"{ignored}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False), (f"{a}<|im_end|>", True)]
        ignored = "\n"
    return out


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1", "tokenizer"])
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_label_mask_token_by_token(tiny_tokenizer, fmt, template):
    """System and user tokens ignored; every answer and its end-of-turn token supervised, on every turn."""
    messages = record_to_text_sample(RECORDS[fmt], "x:1", fmt).messages
    enc = encode_messages(messages, tiny_tokenizer, template, -1, 0, max_seq_len=10**6)
    got = runs(tiny_tokenizer, enc.input_ids, enc.labels)
    want = expected_runs(template, messages)
    if template != "vicuna_v1":  # the newline after the last <|im_end|> is ignored
        want.append(("\n", False))
    assert got == want


def test_system_prompt_from_config_applies_when_the_record_has_none(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    enc = encode_messages(messages, tiny_tokenizer, "chatml", -1, 0, max_seq_len=10**6, system_prompt="Be kind.")
    assert runs(tiny_tokenizer, enc.input_ids, enc.labels)[0][0].startswith("<|im_start|>system\nBe kind.<|im_end|>")
    enc = encode_messages(messages, tiny_tokenizer, "chatml", -1, 0, max_seq_len=10**6)
    assert CHATML_SYSTEM in tiny_tokenizer.decode(enc.input_ids)


BAD = [
    ("{broken", "broken JSON line"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "unknown role 'robot'"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}), "empty answer"),
    (json.dumps({"instruction": "q", "output": ""}), "empty answer"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}), "bad roles"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "bad roles"),
    (json.dumps({"prompt": "q", "completion": "a"}), "unknown record format"),
    (json.dumps({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                 "image": "x.png"}), "has images"),
]


def test_bad_records_are_kept_with_their_reasons(tmp_path):
    from llava_kit.data.readers import iter_file_records

    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(RECORDS["openai"])] + [line for line, _ in BAD]) + "\n")
    samples, bad = read_conversation_records(iter_file_records(path))
    assert len(samples) == 1 and len(bad) == len(BAD)
    for record, (_, reason) in zip(bad, BAD, strict=True):
        assert reason in record.reason, (record, reason)
    assert [b.source for b in bad] == [f"mixed.jsonl:{i}" for i in range(2, 2 + len(BAD))]


def test_alpaca_history_and_openai_text_parts_become_turns():
    alpaca = {"instruction": "And now?", "output": "Still Lumen.", "history": [["Who are you?", "I am Lumen."]]}
    assert record_to_text_sample(alpaca, "x", "auto").messages == [
        {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Lumen."},
        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Still Lumen."}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}]},
                          {"role": "assistant", "content": "Hello."}]}
    assert record_to_text_sample(parts, "x", "openai").messages[0] == {"role": "user", "content": "Hi\nyou"}
    parts["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x"}})
    with pytest.raises(ValueError, match="type 'image_url': text stages read text parts only"):
        record_to_text_sample(parts, "x", "openai")
    with pytest.raises(ValueError, match="`history` must be a list"):
        record_to_text_sample({**alpaca, "history": [["only a question"]]}, "x", "alpaca")
