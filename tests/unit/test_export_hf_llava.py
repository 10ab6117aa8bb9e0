"""Export to transformers' llava format: same logits and greedy answers as llava-kit, processor and template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

from llava_kit.config import ModelConfig
from llava_kit.data.encode import encode_messages
from llava_kit.data.images import prepare_image
from llava_kit.data.templates import render
from llava_kit.export.hf_llava import ExportError, check_exportable, to_hf_llava
from llava_kit.model.build import build_llava
from llava_kit.model.projectors import build_projector
from llava_kit.store.specs import InferenceSettings


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_dirs):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=512,
                                  tie_word_embeddings=False)  # tied: transformers' llava cannot hold it (see below)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _build(vision, llm, projector="mlp2x_gelu", select_strategy="patch", feature_layer=-2):
    cfg = ModelConfig()
    cfg.vision.name_or_path, cfg.vision.select_strategy = str(vision), select_strategy
    cfg.vision.feature_layer = feature_layer
    cfg.llm.name_or_path, cfg.projector.name = str(llm), projector
    torch.manual_seed(3)
    model, tokenizer = build_llava(cfg)
    return model.eval(), tokenizer


def _images(n=3):
    images = []
    for i in range(n):
        image = Image.new("RGB", (40 + 20 * i, 60), (30 * i, 200 - 40 * i, 90))
        image.paste((250, 20, 20), (5, 5, 25, 25))
        images.append(image)
    return images


def _batch(model, tokenizer, settings):
    """Two left-padded prompts, the first with two images, the second with one."""
    questions = [f"<image>\nWhat shape is this?<image>\n{'and this?'}", "<image>\nDescribe the image."]
    rows = [encode_messages([{"role": "user", "content": q}], tokenizer, settings.template, model.image_token_id,
                            model.tokens_per_image, 10**9, n_images=q.count("<image>"),
                            add_generation_prompt=True).input_ids for q in questions]
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    tower = model.vision_tower
    pixel_values = tower.preprocess([prepare_image(im, "pad", tower.image_mean) for im in _images()])
    return input_ids, attention_mask, pixel_values


CASES = {  # name: (tower, llm, projector, select_strategy, feature_layer)
    "clip-llama-mlp2x": ("clip", "llama", "mlp2x_gelu", "patch", -2),
    "clip-qwen2-linear-full": ("clip", "qwen2", "linear", "full", -1),
    "siglip-llama-mlp1x": ("siglip", "llama", "mlp1x_gelu", "patch", -2),
    "siglip-qwen2-mlp2x": ("siglip", "qwen2", "mlp2x_gelu", "patch", 1),
    "clip-gpt2-mlp2x": ("clip", "gpt2", "mlp2x_gelu", "patch", -2),  # another base_model_prefix ("transformer")
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_gives_the_same_logits_and_greedy_answers(case, tiny_dirs, siglip_dir, qwen2_dir, gpt2_dir, tmp_path):
    tower_name, llm_name, projector, strategy, layer = CASES[case]
    vision = tiny_dirs["vision"] if tower_name == "clip" else siglip_dir
    llm = {"llama": tiny_dirs["llm"], "qwen2": qwen2_dir, "gpt2": gpt2_dir}[llm_name]
    model, tokenizer = _build(vision, llm, projector, strategy, layer)
    settings = InferenceSettings("chatml", None, "pad", 2048)
    to_hf_llava(model, tokenizer, settings, tmp_path / "hf")

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.image_seq_length == model.tokens_per_image
    input_ids, attention_mask, pixel_values = _batch(model, tokenizer, settings)
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    real = attention_mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4

    generate = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    ours = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **generate)
    theirs = hf.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         **generate)[:, input_ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


def test_processor_reproduces_llava_kit_inputs(tiny_dirs, tmp_path):
    model, tokenizer = _build(tiny_dirs["vision"], tiny_dirs["llm"])
    settings = InferenceSettings("chatml", None, "pad", 2048)
    to_hf_llava(model, tokenizer, settings, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = _images(1)[0]
    inputs = processor(images=[image], text=prompt, return_tensors="pt", add_special_tokens=False)
    expected = encode_messages([{"role": "user", "content": "<image>\nWhat shape is this?"}], tokenizer, "chatml",
                               model.image_token_id, model.tokens_per_image, 10**9, n_images=1,
                               add_generation_prompt=True).input_ids
    assert inputs["input_ids"][0].tolist() == expected
    tower = model.vision_tower
    pixels = tower.preprocess([prepare_image(image, "pad", tower.image_mean)])
    # llava-hf pads with int(mean * 255), llava-kit with round(mean * 255): at most 1/255 apart before normalising
    assert (inputs["pixel_values"] - pixels).abs().max().item() < 0.03


@pytest.mark.parametrize("template", ["plain", "chatml", "vicuna_v1", "tokenizer"])
def test_exported_chat_template_renders_like_llava_kit(template, tiny_dirs, tiny_tokenizer, tmp_path):
    from llava_kit.data.jinja_templates import jinja_template, settings_from_template

    conversation = [{"role": "user", "content": "<image>\nWhat shape?"}, {"role": "assistant", "content": "A star."},
                    {"role": "user", "content": "And the colour?"}]
    for system_prompt in (None, "Be brief."):
        jinja = jinja_template(template, tiny_tokenizer, system_prompt, {"template": template})
        got = tiny_tokenizer.apply_chat_template(conversation, chat_template=jinja, tokenize=False,
                                                 add_generation_prompt=True)
        want = render(conversation, tiny_tokenizer, template, system_prompt, add_generation_prompt=True).text
        assert got == want
        assert settings_from_template(jinja) == {"template": template}


def test_projectors_the_format_cannot_express_are_refused(tiny_dirs):
    model, _ = _build(tiny_dirs["vision"], tiny_dirs["llm"], "mlp3x_gelu")
    with pytest.raises(ExportError, match=r"'mlp3x_gelu' cannot be written in the hf-llava format.*mlp2x_gelu"):
        check_exportable(model)

    class Pooler(torch.nn.Module):  # stands in for any other projector of the registry
        name = "pooler"

    model.multi_modal_projector = Pooler()
    with pytest.raises(ExportError, match="'pooler' cannot be written"):
        check_exportable(model)
    # a subclass of an expressible projector may change the structure: refused too
    projector = build_projector("mlp2x_gelu", 8, 8, (2, 2))
    projector.__class__ = type("Custom", (type(projector),), {})
    model.multi_modal_projector = projector
    with pytest.raises(ExportError):
        check_exportable(model)


def test_open_clip_towers_and_unknown_formats_are_refused(tiny_dirs, tmp_path):
    from llava_kit.export.hf_llava import export_model

    model, _ = _build(tiny_dirs["vision"], tiny_dirs["llm"])
    model.vision_tower.backend = "open_clip"  # the check reads the backend; building a real one is slow
    with pytest.raises(ExportError, match="holds a transformers vision model"):
        check_exportable(model)
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        export_model(tmp_path, tmp_path / "out", "gguf")


def test_an_llm_transformers_llava_cannot_hold_is_refused(tiny_dirs, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2_tied")  # tied embeddings (wte)
    tokenizer.save_pretrained(tmp_path / "gpt2_tied")
    model, tokenizer = _build(tiny_dirs["vision"], tmp_path / "gpt2_tied")
    with pytest.raises(ExportError, match="cannot hold this gpt2 LLM"):
        to_hf_llava(model, tokenizer, InferenceSettings("chatml", None, "pad", 256), tmp_path / "hf")


PHOTOS = sorted((Path(__file__).resolve().parents[2] / "assets" / "photos").glob("*.jpg"))


def test_real_non_square_photos_get_the_same_pixels_and_logits(tiny_dirs, tmp_path):
    """On real photos (assets/photos: landscape and portrait) the export's own processor pads with LLaVA's colour,
    int(mean * 255), in the same place, so pixels and logits equal llava-kit's. llava-kit resizes with PIL (as LLaVA
    did), so the processor is asked for its PIL backend; transformers' default torchvision backend antialiases its
    resize differently (docs/data.md)."""
    from llava_kit.data.images import load_image, pad_colour

    assert len(PHOTOS) == 3 and all(load_image(p).width != load_image(p).height for p in PHOTOS)
    model, tokenizer = _build(tiny_dirs["vision"], tiny_dirs["llm"])
    tower = model.vision_tower
    assert pad_colour(tower.image_mean) == (122, 116, 104)  # CLIP's mean, truncated like LLaVA's expand2square
    to_hf_llava(model, tokenizer, InferenceSettings("chatml", None, "pad", 2048), tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the photo?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    for path in PHOTOS:
        image = load_image(path)
        inputs = processor(images=[image], text=prompt, return_tensors="pt", add_special_tokens=False)
        pixels = tower.preprocess([prepare_image(image, "pad", tower.image_mean)])
        assert (inputs["pixel_values"] - pixels).abs().max().item() <= 1e-4, path.name
        ids = encode_messages([{"role": "user", "content": "<image>\nWhat is in the photo?"}], tokenizer, "chatml",
                              model.image_token_id, model.tokens_per_image, None, n_images=1,
                              add_generation_prompt=True).input_ids
        assert inputs["input_ids"][0].tolist() == ids
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            ours = model(input_ids, pixel_values=pixels).logits
            theirs = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        assert (ours - theirs).abs().max().item() <= 1e-4, path.name
        generate = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        answer = hf.generate(**inputs, **generate)[:, input_ids.shape[1]:]
        assert model.generate(input_ids, pixel_values=pixels, **generate).tolist() == answer.tolist(), path.name


def test_exported_chatml_template_renders_tool_calls_like_llava_kit(tiny_tokenizer):
    """A model trained on tool calls (chatml) gets the same prompt from its exported processor's template."""
    from llava_kit.data.jinja_templates import jinja_template
    from tests.unit.test_tool_calls import sample

    s = sample()
    for system_prompt in (None, "Be brief."):
        jinja = jinja_template("chatml", tiny_tokenizer, system_prompt, {"template": "chatml"})
        for messages, generate in ((s.messages[1:], False), (s.messages[1:4], True)):
            got = tiny_tokenizer.apply_chat_template(messages, tools=s.tools, chat_template=jinja, tokenize=False,
                                                     add_generation_prompt=generate)
            assert got == render(messages, tiny_tokenizer, "chatml", system_prompt, generate, tools=s.tools).text
