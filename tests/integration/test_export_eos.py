"""An hf-llava export ends its answers where the template ends a turn, also for tools that stop generation at
`tokenizer.eos_token_id` (lmms-eval's llava_hf backend calls `generate(eos_token_id=tokenizer.eos_token_id)`)."""

from __future__ import annotations

from pathlib import Path

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
