"""`llava-kit data convert`: data moves both ways between llava-kit and the peers' formats, samples unchanged."""

import json

from llava_kit.cli import main
from llava_kit.data.convert import convert
from llava_kit.data.readers import read_data
from tests.unit.test_tool_calls import GLAIVE

LLAVA = [
    {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ1"},
                                                     {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                                                     {"from": "gpt", "value": "A2"}]},
    {"id": "b", "image": ["x.png", "y.png"], "conversations": [{"from": "human", "value": "<image><image> same?"},
                                                                {"from": "gpt", "value": "no"}]},
    {"id": "c", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"}]},
]


def canonical(samples):
    return [(s.id, s.images, s.messages, s.tools) for s in samples]


def test_llava_to_sharegpt_to_llava_gives_the_same_samples(tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    original = read_data(str(tmp_path / "llava.json"))
    written, bad, _ = convert(str(tmp_path / "llava.json"), tmp_path / "lf" / "data.json", "sharegpt",
                              dataset_info=True)
    assert (written, bad) == (3, [])
    records = json.loads((tmp_path / "lf" / "data.json").read_text())
    assert records[1] == {"id": "b", "conversations": [{"from": "human", "value": "<image><image> same?"},
                                                       {"from": "gpt", "value": "no"}], "images": ["x.png", "y.png"]}
    assert records[2]["system"] == "be nice"
    entry = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())["data"]
    assert entry == {"file_name": "data.json", "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "system": "system", "images": "images"}}
    via_entry = read_data(f"{tmp_path}/lf/dataset_info.json#data")  # what LLaMA-Factory reads, as llava-kit reads it
    convert(f"{tmp_path}/lf/dataset_info.json#data", tmp_path / "back.jsonl", "llava")
    back = read_data(str(tmp_path / "back.jsonl"), "llava")
    assert canonical(via_entry.samples) == canonical(back.samples) == canonical(original.samples)
    assert [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()] == LLAVA


def test_openai_round_trip_keeps_image_parts_tool_calls_and_weights(tmp_path):
    record = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                     {"type": "text", "text": "Weather where this is?"}]},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"},
        {"role": "assistant", "content": "21 degrees.", "weight": 0}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    convert(str(tmp_path / "in.jsonl"), tmp_path / "out.jsonl", "openai")
    assert json.loads((tmp_path / "out.jsonl").read_text()) == record
    # ShareGPT has no per-answer weight, LLaVA no tool calls: such records are left out, with the reason
    written, bad, _ = convert(str(tmp_path / "in.jsonl"), tmp_path / "out.json", "sharegpt")
    assert written == 0 and bad[0].kind == "weight 0 not expressible in ShareGPT"
    written, bad, _ = convert(str(tmp_path / "in.jsonl"), tmp_path / "out.json", "llava")
    assert written == 0 and bad[0].kind == "tool calls not expressible in LLaVA JSON"


def test_sharegpt_tool_calls_round_trip_through_openai(tmp_path):
    (tmp_path / "glaive.json").write_text(json.dumps([GLAIVE]))
    original = read_data(str(tmp_path / "glaive.json"))
    convert(str(tmp_path / "glaive.json"), tmp_path / "openai.jsonl", "openai")
    convert(str(tmp_path / "openai.jsonl"), tmp_path / "sharegpt.json", "sharegpt")
    again = read_data(str(tmp_path / "sharegpt.json"))
    strip = [[{k: v for k, v in m.items() if k not in ("tool_call_id",)} for m in s.messages] for s in again.samples]
    ids_removed = [[{**m, "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]}
                    if "tool_calls" in m else m for m in messages] for messages in strip]
    assert ids_removed == [s.messages for s in original.samples] and again.samples[0].tools == original.samples[0].tools


def test_the_convert_command(tmp_path, capsys):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA + [{"conversations": []}]))
    code = main(["data", "convert", str(tmp_path / "llava.json"), "-o", str(tmp_path / "o.jsonl"), "--to", "openai"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and out[-1] == f"converted: 3 skipped: 1 -> {tmp_path / 'o.jsonl'}"
    assert out[0] == "llava.json[3]\t-\tmissing or empty `conversations` list"
    assert main(["data", "convert", str(tmp_path / "llava.json"), "-o", str(tmp_path / "o.json"), "--to", "openai",
                 "--dataset-info"]) == 2
    assert "use --to sharegpt" in capsys.readouterr().err
