"""Every reader on records written from the peers' published formats: counts, roles, image placement, tool calls,
and each refusal with the format it names and the setting to use."""

import base64
import io
import json
import logging

import pytest
from PIL import Image

from llava_kit.data.encode import IGNORE_INDEX, encode_messages
from llava_kit.data.readers import READERS, read_data, read_record
from llava_kit.data.templates import IMAGE_TOKEN


def write(path, records, jsonl=None):
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return str(path)


def read(record, fmt="auto", stage="sft"):
    return read_record(record, "x:1", fmt, stage)


def png_data_url(colour=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------------------------------------------- OpenAI


def test_openai_image_url_parts_place_each_image_where_its_part_is():
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg", "detail": "low"}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                     {"type": "image_url", "image_url": {"url": "b/c.png"}}]},
        {"role": "assistant", "content": "A dog."}]}
    sample, fmt = read(record)
    assert fmt == "openai" and sample.images == ["a.jpg", "b/c.png"]
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.messages[1]["content"] == "<image>\nWhat is this?"
    assert sample.messages[3]["content"] == "And here?\n<image>"
    assert sample.messages[2]["content"] == "A cat."


def test_openai_image_placeholders_take_the_images_list_and_data_urls_stay_urls():
    url = png_data_url()
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Same?"},
                                                        {"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "image"}]},
                           {"role": "assistant", "content": "No."}],
              "images": ["first.jpg", "third.jpg"]}
    sample, _ = read(record)
    assert sample.images == ["first.jpg", url, "third.jpg"]  # parts in order, placeholders filled from `images`
    assert sample.messages[0]["content"] == "<image>\nSame?\n<image>\n<image>"
    record["images"] = ["only-one.jpg"]
    with pytest.raises(ValueError, match=r"3 `<image>` tag\(s\) in the text but 2 image\(s\)"):
        read(record)


def test_llama_factory_value_parts_and_xtuner_markers_and_bare_lists():
    v1 = {"messages": [{"role": "user", "content": [{"type": "image_url", "value": "d/1.jpg"},
                                                    {"type": "text", "value": "Who are they?"}], "loss_weight": 0.0},
                       {"role": "assistant", "content": [{"type": "text", "value": "Players."}], "loss_weight": 1.0}]}
    sample, _ = read(v1)
    assert sample.images == ["d/1.jpg"] and sample.messages[0]["content"] == "<image>\nWho are they?"
    assert "weight" not in sample.messages[1]  # loss_weight 1: trained as usual
    xtuner = {"id": 7, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "dog.jpg", "image_wh": [375, 500]}},
                                     {"type": "image_url", "image_url": {"url": "cats.jpg"}},
                                     {"type": "text", "text": "<IMG_CONTEXT>\n<IMG_CONTEXT>\nSame animals?"}]},
        {"role": "assistant", "content": "No."}]}
    sample, _ = read(xtuner)
    assert sample.id == "7" and sample.images == ["dog.jpg", "cats.jpg"]
    assert sample.messages[0]["content"] == "<image>\n<image>\nSame animals?"  # the markers say where, once each
    bare = [{"role": "user", "content": "Give three tips."}, {"role": "assistant", "content": "Sleep, eat, move."}]
    sample, fmt = read(bare, stage="text-sft")  # xtuner's OpenAI JSONL: one list of messages per line
    assert fmt == "openai" and [m["role"] for m in sample.messages] == ["user", "assistant"]


def test_openai_tool_calls_tool_results_and_tools():
    record = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome.", "weight": 0}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    sample, _ = read(record, stage="text-sft")
    assert sample.tools == record["tools"]
    assert sample.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    assert sample.messages[2] == {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "c1"}
    assert sample.messages[5]["weight"] == 0
    legacy = {"messages": [{"role": "user", "content": "Add 2 and 3"},
                           {"role": "assistant", "function_call": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}},
                           {"role": "function", "name": "add", "content": "5"},
                           {"role": "assistant", "content": "5."}],
              "functions": [{"name": "add", "parameters": {"type": "object"}}]}
    sample, _ = read(legacy, stage="text-sft")
    assert sample.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert sample.messages[2] == {"role": "tool", "content": "5", "name": "add"}
    assert sample.tools == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "a"}]}, "a tool result must follow the assistant's tool call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     r"only 0 \(not trained on\) or 1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.jpg"}},
                                                {"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "a"}]}, "remote image URL"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "reasoning", "value": "hm"},
                                                     {"type": "text", "value": "a"}]}]}, "reasoning"),
])
def test_openai_records_that_cannot_be_trained_say_why(record, reason):
    with pytest.raises(ValueError, match=reason):
        read(record)


# ------------------------------------------------------------------------------------------- LLaMA-Factory ShareGPT


def test_llama_factory_multimodal_sharegpt_keeps_tags_where_they_are():
    """LLaMA-Factory's mllm_demo: `messages` with role/content, `<image>` tags in the text, an `images` list."""
    record = {"messages": [{"content": "<image>Who are they?", "role": "user"},
                           {"content": "Two players.", "role": "assistant"},
                           {"content": "What are they doing?<image>", "role": "user"},
                           {"content": "Celebrating.", "role": "assistant"}],
              "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]}
    for fmt in ("auto", "sharegpt", "openai"):
        sample, _ = read(record, fmt)
        assert sample.images == ["mllm_demo_data/1.jpg"] * 2
        assert [m["content"] for m in sample.messages] == [
            "<image>Who are they?", "Two players.", "What are they doing?<image>", "Celebrating."]


def test_sharegpt_function_call_and_observation_turns_with_a_tools_string():
    """glaive_toolcall_en_demo: function_call / observation turns, `tools` a JSON string of bare functions."""
    tools = [{"name": "search_recipes", "description": "Find recipes", "parameters": {"type": "object"}}]
    record = {"conversations": [
        {"from": "human", "value": "I have rice."},
        {"from": "function_call", "value": json.dumps({"name": "search_recipes", "arguments": {"items": ["rice"]}})},
        {"from": "observation", "value": "{\"recipes\": [\"fried rice\"]}"},
        {"from": "gpt", "value": "Try fried rice."}],
        "system": "You cook.", "tools": json.dumps(tools)}
    sample, fmt = read(record, stage="text-sft")
    assert fmt == "sharegpt"
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert sample.messages[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "search_recipes", "arguments": {"items": ["rice"]}}}]
    assert sample.tools == [{"type": "function", "function": tools[0]}]
    parallel = {**record, "conversations": [record["conversations"][0], {"from": "function_call", "value": json.dumps(
        [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])}, *record["conversations"][2:]]}
    names = [c["function"]["name"] for c in read(parallel, stage="text-sft")[0].messages[2]["tool_calls"]]
    assert names == ["a", "b"]


def test_alpaca_with_images_and_llava_with_an_image_list():
    sample, fmt = read({"instruction": "<image>What is it?", "input": "", "output": "A cat.", "images": ["c.jpg"]})
    assert fmt == "alpaca" and sample.images == ["c.jpg"] and sample.messages[0]["content"] == "<image>What is it?"
    llava = {"id": "000001", "image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes."}]}
    sample, fmt = read(llava)
    assert fmt == "llava" and sample.id == "000001" and sample.images == ["a.jpg", "b.jpg"]


# ---------------------------------------------------------------------------------------- refusals and detection


@pytest.mark.parametrize("stage", ["sft", "text-sft"])
@pytest.mark.parametrize("record, kind", [
    ({"messages": [{"role": "user", "content": "<video>Why funny?"}, {"role": "assistant", "content": "Baby."}],
      "videos": ["1.mp4"]}, "video not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "t.mp4"}},
                                                {"type": "text", "text": "<VIDEO_CONTEXT>\nWhat?"}]},
                   {"role": "assistant", "content": "Tennis."}]}, "video not supported"),
    ({"messages": [{"role": "user", "content": "<audio>Sound?"}, {"role": "assistant", "content": "Glass."}],
      "audios": ["1.mp3"]}, "audio not supported"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "preference data (chosen/rejected)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False},
     "KTO data (desirable/undesirable tag)"),
])
def test_video_audio_preference_and_kto_records_are_refused_everywhere(stage, record, kind):
    with pytest.raises(ValueError) as err:
        read(record, stage=stage)
    assert err.value.kind == kind


def test_text_stages_refuse_images_never_training_on_a_literal_image_tag(tmp_path):
    mllm = {"messages": [{"content": "<image>Who are they?", "role": "user"}, {"content": "Players.", "role": "assistant"}],
            "images": ["1.jpg"]}
    tag_only = {"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Me."}]}
    llava_qa = {"question_id": 0, "image": "COCO_val2014_000000441147.jpg", "text": "What color?", "category": "conv"}
    result = read_data(write(tmp_path / "d.jsonl", [mllm, tag_only, llava_qa]), "auto", "text-sft")
    assert not result.samples
    assert [b.kind for b in result.bad] == ["images in a text stage", "`<image>` tags do not match the images",
                                            "unknown record format"]
    assert "text stages train on text only (use stage sft for images)" in result.bad[0].reason


def test_a_record_that_does_not_fit_the_format_names_the_one_it_looks_like(tmp_path):
    alpaca = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(3)]
    result = read_data(write(tmp_path / "alpaca.json", alpaca), "openai", "text-sft")
    assert len(result.bad) == 3 and not result.samples
    assert result.bad[0].reason == ("the record does not fit format openai (a `messages` list); it looks like alpaca: "
                                    "set data.format: alpaca (or auto)")
    assert result.bad[0].kind == "does not fit format openai (looks like alpaca)"
    moss = {"meta_instruction": "", "chat": {"turn_1": {"Human": "<|Human|>: hi<eoh>", "MOSS": "<|MOSS|>: hello<eom>"}}}
    with pytest.raises(ValueError, match="looks like moss, which stage sft does not read"):
        read(moss, stage="sft")
    with pytest.raises(ValueError, match="raw text .*train it with stage text-pt"):
        read({"text": "a document"}, stage="text-sft")


def test_auto_detects_per_file_and_logs_what_it_read(tmp_path, caplog):
    a = write(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}] * 2)
    b = write(tmp_path / "b.json", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                                    {"instruction": "q", "output": "a"}])
    with caplog.at_level(logging.INFO, logger="llava_kit.data.readers"):
        result = read_data([a, b], "auto", "text-sft")
    assert result.formats == {"a.jsonl": {"openai": 2}, "b.json": {"sharegpt": 1, "alpaca": 1}}
    assert f"data {a}: 2 records read as openai 2 (format detected)" in caplog.text
    assert "sharegpt 1, alpaca 1" in caplog.text


def test_every_conversation_format_has_a_reader():
    from llava_kit.config import CONVERSATION_FORMATS, IMAGE_FORMATS, WRITABLE_FORMATS

    assert set(READERS) == set(CONVERSATION_FORMATS) and set(IMAGE_FORMATS) <= set(READERS)
    assert {name for name, reader in READERS.items() if reader.write} == set(WRITABLE_FORMATS)


# ------------------------------------------------------------------------------------ LLaMA-Factory dataset_info


def test_a_dataset_info_entry_maps_columns_and_tags(tmp_path):
    (tmp_path / "chats.json").write_text(json.dumps([{"dialog": [
        {"speaker": "client", "text": "<image>What is it?"}, {"speaker": "bot", "text": "A cat."}],
        "pictures": ["c.jpg"], "sys": "Be brief."}]))
    (tmp_path / "qa.json").write_text(json.dumps([{"q": "2+2?", "a": "4"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "mine": {"file_name": "chats.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "images": "pictures", "system": "sys"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client", "assistant_tag": "bot"}},
        "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a"}},
        "dpo": {"file_name": "qa.json", "ranking": True},
        "kto": {"file_name": "qa.json", "columns": {"kto_tag": "label"}},
        "hub": {"hf_hub_url": "someone/data"}}))
    result = read_data(f"{tmp_path}/dataset_info.json#mine", "auto", "sft")
    (sample,) = result.samples
    assert sample.images == ["c.jpg"] and result.formats == {"dataset_info.json#mine": {"sharegpt": 1}}
    assert sample.messages == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "<image>What is it?"},
                               {"role": "assistant", "content": "A cat."}]
    (qa,) = read_data(f"{tmp_path}#qa", "auto", "text-sft").samples  # the folder names the entry too
    assert qa.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    for name, reason in (("dpo", "preference data"), ("kto", "KTO data"), ("hub", "loads from hf_hub_url"),
                         ("nope", "has no entry 'nope'; name an entry")):
        with pytest.raises(ValueError, match=reason):
            read_data(f"{tmp_path}/dataset_info.json#{name}", "auto", "sft")
    with pytest.raises(ValueError, match=r"a LLaMA-Factory dataset folder; name an entry: .*#NAME \(entries with local "
                                         r"files: mine, qa, dpo, kto\)"):
        read_data(str(tmp_path), "auto", "sft")


# ------------------------------------------------------------------------------------------- label masks


def runs(tokenizer, ids, labels):
    """Consecutive tokens grouped by supervised / ignored, each group decoded: the mask, token by token."""
    out = []
    for token, label in zip(ids, labels, strict=True):
        assert label in (token, IGNORE_INDEX)
        supervised = label != IGNORE_INDEX
        if out and out[-1][1] == supervised:
            out[-1][0].append(token)
        else:
            out.append(([token], supervised))
    return [(tokenizer.decode(group), supervised) for group, supervised in out]


def test_a_multimodal_openai_record_masks_token_by_token(tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                                        {"type": "text", "text": "Shape?"}]},
                           {"role": "assistant", "content": "A star."},
                           {"role": "user", "content": "Colour?"},
                           {"role": "assistant", "content": "Red.", "weight": 0}]}
    sample, _ = read(record)
    image_id = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_messages(sample.messages, tiny_tokenizer, "chatml", image_id, 2, None, n_images=1,
                          system_prompt="")
    assert runs(tiny_tokenizer, enc.input_ids, enc.labels) == [
        ("<|im_start|>user\n<image><image>\nShape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A star.<|im_end|>", True),
        ("\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n", False)]  # weight 0


def test_openai_vision_examples_with_the_question_and_image_in_two_user_messages():
    """OpenAI's vision fine-tuning guide sends the question and the image as consecutive user messages."""
    record = {"messages": [{"role": "system", "content": "You identify cheeses."},
                           {"role": "user", "content": "What is this cheese?"},
                           {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "danbo.jpg"}}]},
                           {"role": "assistant", "content": "Danbo"}]}
    sample, _ = read(record)
    assert sample.images == ["danbo.jpg"]
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant"]
    assert sample.messages[1]["content"] == "What is this cheese?\n<image>"


def test_a_config_pointing_at_a_llama_factory_folder_names_the_fix(tmp_path):
    from llava_kit.config import config_from_dict

    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    (tmp_path / "mine.json").write_text("[]")
    data = {"stage": "text-sft", "output_dir": str(tmp_path / "run"), "model": {"llm": {"name_or_path": "tiny:llm"}},
            "data": {"path": str(tmp_path), "template": "chatml"}}
    with pytest.raises(ValueError, match=r"is a LLaMA-Factory dataset folder; name an entry: .*dataset_info.json#NAME"):
        config_from_dict(data)
    data["data"]["path"] = f"{tmp_path}/dataset_info.json#mine"
    assert config_from_dict(data).data.path.endswith("#mine")
