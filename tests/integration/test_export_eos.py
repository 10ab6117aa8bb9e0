"""An hf-llava export ends its answers where the template ends a turn, also for tools that stop generation at
`tokenizer.eos_token_id` (lmms-eval's llava_hf backend calls `generate(eos_token_id=tokenizer.eos_token_id)`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_kit.export.hf_llava import export_model
from llava_kit.inference import GenerationService, SamplingParams
from llava_kit.loader import open_model_dir

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
QUESTION = "What shape is in the image?"
MAX_NEW_TOKENS = 32


def test_generate_with_the_tokenizer_eos_stops_at_the_end_of_the_answer(answering_model, tmp_path):
    images = [Image.open(path).convert("RGB").resize((96, 96))  # square: no padding difference (docs/serving.md)
              for path in sorted((SHAPES / "images" / "eval").glob("*.png"))[:3]]
    service = GenerationService.from_loaded(open_model_dir(answering_model))
    expected = [service.answer([{"role": "user", "content": f"<image>\n{QUESTION}"}], [image],
                               SamplingParams(max_new_tokens=MAX_NEW_TOKENS)) for image in images]
    assert all(answer.finish_reason == "stop" for answer in expected)  # the model ends its turns by itself

    export_model(answering_model, tmp_path / "hf")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    tokenizer = processor.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert sorted(model.generation_config.eos_token_id) == sorted(service.stop_ids)  # still every stop token
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    for image, answer in zip(images, expected, strict=True):
        inputs = processor(images=[image], text=prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():  # as lmms-eval's llava_hf does: the tokenizer's EOS replaces the generation config's
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        assert new[-1] == tokenizer.eos_token_id and len(new) == answer.completion_tokens < MAX_NEW_TOKENS
        assert tokenizer.decode(new, skip_special_tokens=True).strip() == answer.text


@pytest.mark.slow
def test_the_demo_export_scores_like_llava_kit_eval_through_the_tokenizer_eos(demo_model, tmp_path):
    """lmms-eval's llava_hf path on the demo's shapes model: the export, transformers alone, `generate` stopping at
    `tokenizer.eos_token_id`: every answer is `llava-kit eval`'s (before the export's EOS was the end-of-turn
    token, answers ran on into the next turn and shape accuracy fell from 0.90 to 0.725)."""
    from llava_kit.demo.shapes import score_record
    from llava_kit.eval import read_eval_records

    data = demo_model.parent / "data"
    records = read_eval_records(data / "eval.jsonl")[:90]
    images = {r["image"]: Image.open(data / "images" / r["image"]).convert("RGB") for r in records}
    service = GenerationService.from_loaded(open_model_dir(demo_model))
    expected = [service.answer([{"role": "user", "content": f"<image>\n{r['question']}"}], [images[r["image"]]],
                               SamplingParams(max_new_tokens=MAX_NEW_TOKENS)).text for r in records]

    export_model(demo_model, tmp_path / "hf")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    tokenizer = processor.tokenizer
    got = []
    for record in records:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[images[record["image"]]], text=prompt, return_tensors="pt",
                           add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        got.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert got == expected
    shape = [score_record(r, answer) for answer, r in zip(got, records, strict=True) if r["kind"] == "shape"]
    print(f"shape accuracy through transformers with the tokenizer's EOS: {sum(shape) / len(shape):.2f}")
