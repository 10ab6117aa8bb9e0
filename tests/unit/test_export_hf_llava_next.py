"""AnyRes export to transformers' llava-next and import back: the same logits and greedy answers on images of several
sizes and aspect ratios, a processor that counts and tiles as llava-kit does, and refusals with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llava_kit.config import ModelConfig
from llava_kit.data.encode import encode_messages
from llava_kit.export.hf_llava import ExportError, check_exportable, to_hf_llava, to_hf_llava_next
from llava_kit.model.build import build_llava
from llava_kit.store.specs import InferenceSettings

SIZES = [(60, 40), (70, 200), (64, 64), (150, 30), (120, 300)]  # (height, width): tall, 3:1 wide, square, 1:5, 2.5:1


def _build(vision, llm, projector="mlp2x_gelu", select_strategy="patch", feature_layer=-2, **anyres):
    cfg = ModelConfig()
    cfg.vision.name_or_path, cfg.vision.select_strategy = str(vision), select_strategy
    cfg.vision.feature_layer = feature_layer
    cfg.vision.image_strategy = "anyres"
    for key, value in {"grid_pinpoints": "anyres_max_4", **anyres}.items():
        setattr(cfg.vision, key, value)
    cfg.llm.name_or_path, cfg.projector.name = str(llm), projector
    torch.manual_seed(3)
    model, tokenizer = build_llava(cfg)
    with torch.no_grad():  # a newline far from its random init, so a lost one shows in the logits
        model.image_newline.normal_(0, 1)
    return model.eval(), tokenizer


def _image(height, width, seed=0):
    image = Image.new("RGB", (width, height), (30 + 40 * seed, 200 - 30 * seed, 90))
    image.paste((250, 20, 20), (width // 4, height // 4, width // 2, height // 2))
    return image


def _batch(model, tokenizer, images):
    """Two left-padded prompts: the first with all images but the last, the second with the last; the images'
    pixel values (every view) and sizes as llava-kit's chat prepares them."""
    from llava_kit.inference import GenerationService

    service = GenerationService(model, tokenizer, InferenceSettings("chatml", None, "pad", 4096))
    first, second = images[:-1], images[-1:]
    prompts = [service.prepare([{"role": "user", "content": "<image>\n" * len(first) + "What shapes are these?"}],
                               first),
               service.prepare([{"role": "user", "content": "<image>\nDescribe the image."}], second)]
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p.input_ids)) + p.input_ids for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    pixel_values = torch.cat([p.pixel_values for p in prompts])
    image_sizes = torch.tensor([size for p in prompts for size in p.image_sizes])
    return input_ids, attention_mask, pixel_values, image_sizes


CASES = {  # name: (tower, llm, projector, select_strategy, feature_layer, grid_pinpoints)
    "clip-llama-mlp2x": ("clip", "llama", "mlp2x_gelu", "patch", -2, "anyres_max_4"),
    "clip-qwen2-linear": ("clip", "qwen2", "linear", "patch", -1, [[64, 128], [128, 64], [128, 128], [64, 192]]),
    "siglip-llama-mlp1x": ("siglip", "llama", "mlp1x_gelu", "patch", -2, "(1x1),...,(2x3)"),
    "siglip-qwen2-mlp2x": ("siglip", "qwen2", "mlp2x_gelu", "full", 1, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_gives_the_same_logits_and_greedy_answers(case, tiny_dirs, siglip_dir, qwen2_dir, tmp_path):
    tower_name, llm_name, projector, strategy, layer, pinpoints = CASES[case]
    vision = tiny_dirs["vision"] if tower_name == "clip" else siglip_dir
    llm = {"llama": tiny_dirs["llm"], "qwen2": qwen2_dir}[llm_name]
    model, tokenizer = _build(vision, llm, projector, strategy, layer, grid_pinpoints=pinpoints)
    to_hf_llava_next(model, tokenizer, InferenceSettings("chatml", None, "pad", 4096), tmp_path / "hf")

    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.image_grid_pinpoints == [list(p) for p in model.anyres.pinpoints]
    input_ids, attention_mask, pixel_values, image_sizes = _batch(
        model, tokenizer, [_image(h, w, i) for i, (h, w) in enumerate(SIZES)])
    assert len(set(model.image_token_counts(image_sizes.tolist()))) >= 4  # the sizes give different counts
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                     image_sizes=image_sizes).logits
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    image_sizes=image_sizes).logits
    real = attention_mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4

    generate = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    ours = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                          image_sizes=image_sizes, **generate)
    theirs = hf.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         image_sizes=image_sizes, **generate)[:, input_ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


def _photos():
    """Real photos (assets/photos) whole and cropped to other aspects: 1.6:1, 1:1.5, 5:1 wide, 1:6 tall."""
    photos = sorted((Path(__file__).resolve().parents[2] / "assets" / "photos").glob("*.jpg"))
    for path in photos:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        yield from (image, image.crop((0, 0, w, h // 3)), image.crop((0, 0, w // 4, h)))


def test_processor_counts_tiles_and_answers_like_llava_kit(tiny_dirs, tmp_path):
    from llava_kit.inference import GenerationService, SamplingParams

    model, tokenizer = _build(tiny_dirs["vision"], tiny_dirs["llm"])
    settings = InferenceSettings("chatml", None, "pad", 4096)
    to_hf_llava_next(model, tokenizer, settings, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    service = GenerationService(model, tokenizer, settings)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    question = [{"role": "user", "content": "<image>\nWhat shape is this?"}]
    for image in _photos():
        size = (image.height, image.width)
        inputs = processor(images=[image], text=prompt, return_tensors="pt", add_special_tokens=False)
        expected = encode_messages(question, tokenizer, "chatml", model.image_token_id,
                                   model.image_token_counts([size]), 10**9, n_images=1,
                                   add_generation_prompt=True).input_ids
        assert inputs["input_ids"][0].tolist() == expected
        assert inputs["image_sizes"].tolist() == [list(size)]
        ours = model.vision_tower.preprocess(model.anyres.views(image))  # [views, 3, H, W]
        theirs = inputs["pixel_values"][0][: len(ours)]
        assert (theirs - ours).abs().max().item() < 0.05  # torchvision's and PIL's resampling: a level or two
        answer = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert processor.tokenizer.decode(answer, skip_special_tokens=True).strip() == \
            service.answer(question, [image], SamplingParams(max_new_tokens=8)).text


def test_import_reads_llava_next_back_with_the_same_logits(tiny_dirs, tmp_path):
    from llava_kit.export.import_llava import import_checkpoint
    from llava_kit.loader import open_model_dir

    model, tokenizer = _build(tiny_dirs["vision"], tiny_dirs["llm"])
    settings = InferenceSettings("chatml", None, "pad", 4096)
    to_hf_llava_next(model, tokenizer, settings, tmp_path / "hf")
    images = [_image(h, w, i) for i, (h, w) in enumerate(SIZES[:3])]
    input_ids, attention_mask, pixel_values, image_sizes = _batch(model, tokenizer, images)
    with torch.no_grad():
        reference = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          image_sizes=image_sizes).logits
    for directory in (tmp_path / "hf", import_checkpoint(tmp_path / "hf", tmp_path / "imported")):
        loaded = open_model_dir(directory)
        assert loaded.model.anyres.pinpoints == model.anyres.pinpoints and loaded.settings.template == "chatml"
        again = _batch(loaded.model, loaded.tokenizer, images)
        assert torch.equal(again[0], input_ids) and torch.allclose(again[2], pixel_values, atol=1e-6)
        with torch.no_grad():
            logits = loaded.model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                  image_sizes=image_sizes).logits
        assert (logits - reference)[attention_mask.bool()].abs().max().item() <= 1e-5


def test_what_llava_next_cannot_express_is_refused(tiny_dirs):
    capped, _ = _build(tiny_dirs["vision"], tiny_dirs["llm"], max_tokens_per_image=100)
    with pytest.raises(ExportError, match="caps image tokens"):
        check_exportable(capped, "hf-llava-next")
    pooled, _ = _build(tiny_dirs["vision"], tiny_dirs["llm"], projector="avgpool")
    with pytest.raises(ExportError, match="'avgpool' cannot be written"):
        check_exportable(pooled, "hf-llava-next")
    model, tokenizer = _build(tiny_dirs["vision"], tiny_dirs["llm"])
    with pytest.raises(ExportError, match="--format hf-llava-next"):
        to_hf_llava(model, tokenizer, InferenceSettings("chatml", None, "pad", 4096), "unused")
    model.anyres = None  # as if trained at the fixed strategy
    with pytest.raises(ExportError, match="fixed strategy"):
        check_exportable(model, "hf-llava-next")
