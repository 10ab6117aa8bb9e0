"""Import llava-hf and original LLaVA checkpoints; llava-hf -> import -> export round-trips every weight exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from llava_kit.cli import main
from llava_kit.data.encode import add_image_token
from llava_kit.store.foreign import CheckpointImportError, load_original_llava
from tests.support import open_for_chat

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64}


def make_hf_llava(out, tiny_dirs, family="clip", strategy="default", tie=False):
    """A llava-hf directory written by transformers itself (random weights), as the conversion scripts do."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    image_token_id = add_image_token(tokenizer)
    if family == "clip":
        vision_config, processor = CLIPVisionConfig(**VISION), CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        vision_config, processor = SiglipVisionConfig(**VISION), SiglipImageProcessor(size={"height": 32, "width": 32})
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=tie)
    tokens = 16 if family == "siglip" or strategy == "default" else 17
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                         image_seq_length=tokens, vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=1 if family == "clip" else 0).save_pretrained(out)
    return out


def weights(directory):
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("family, strategy, tie", [("clip", "default", False), ("clip", "full", True),
                                                   ("siglip", "full", False)])
def test_hf_llava_import_then_export_round_trips_every_weight(family, strategy, tie, tiny_dirs, tmp_path, capsys):
    source = make_hf_llava(tmp_path / "hf", tiny_dirs, family, strategy, tie)
    assert main(["import", str(source), "-o", str(tmp_path / "imported")]) == 0
    assert main(["export", str(tmp_path / "imported"), "-o", str(tmp_path / "again")]) == 0
    before, after = weights(source), weights(tmp_path / "again")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == strategy


def test_a_llava_hf_directory_chats_directly_with_the_same_logits(tiny_dirs, tmp_path):
    source = make_hf_llava(tmp_path / "hf", tiny_dirs)
    model, tokenizer, settings = open_for_chat(source)  # what `chat --model DIR` and `serve` call
    assert settings.template == "tokenizer"
    hf = LlavaForConditionalGeneration.from_pretrained(source).eval()
    input_ids = torch.tensor([[5, 6] + [model.image_token_id] * model.tokens_per_image + [7, 8, 9]])
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids, pixel_values=pixel_values).logits
        theirs = hf(input_ids=input_ids, pixel_values=pixel_values).logits
    assert torch.equal(ours, theirs)


def test_export_then_import_restores_the_inference_settings(tiny_dirs, tmp_path):
    from llava_kit.export.hf_llava import to_hf_llava
    from llava_kit.store.specs import InferenceSettings

    source = make_hf_llava(tmp_path / "hf", tiny_dirs)
    model, tokenizer, _ = open_for_chat(source)
    settings = InferenceSettings("chatml", "Answer in one word.", "pad", 300)
    to_hf_llava(model, tokenizer, settings, tmp_path / "export")
    assert open_for_chat(tmp_path / "export")[2] == settings


def make_original_llava(out, tiny_dirs, projector="mlp2x_gelu"):
    """The haotian-liu/LLaVA layout: a Llama checkpoint + model.mm_projector.* keys, mm_* config fields."""
    from llava_kit.model.build import load_llm

    llm = load_llm(str(tiny_dirs["llm"]))
    llm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dirs["llm"]).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.update({"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": projector,
                   "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 128,
                   "image_aspect_ratio": "pad", "tokenizer_model_max_length": 512})
    (out / "config.json").write_text(json.dumps(config))
    state = weights(out)
    torch.manual_seed(4)
    projector_state = {"model.mm_projector.0.weight": torch.randn(256, 128), "model.mm_projector.0.bias": torch.randn(256),
                       "model.mm_projector.2.weight": torch.randn(256, 256), "model.mm_projector.2.bias": torch.randn(256)}
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file({**state, **projector_state}, str(out / "model.safetensors"))
    return out, llm, projector_state


def test_original_llava_imports_and_starts_an_sft_run(tiny_dirs, tmp_path, make_config):
    source, llm, projector_state = make_original_llava(tmp_path / "orig", tiny_dirs)
    model, tokenizer, settings = load_original_llava(source, vision=str(tiny_dirs["vision"]))
    assert settings.template == "vicuna_v1" and settings.image_aspect == "pad" and settings.max_seq_len == 512
    assert torch.equal(model.multi_modal_projector[2].weight, projector_state["model.mm_projector.2.weight"])
    text = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model.language_model(text).logits[..., :llm.config.vocab_size], llm(text).logits)

    out = tmp_path / "imported"
    assert main(["import", str(source), "-o", str(out), "--vision", str(tiny_dirs["vision"])]) == 0
    from llava_kit.train.engine import train

    cfg = make_config("sft_from_import", stage="sft", **{
        "model.vision.name_or_path": str(out), "model.llm.name_or_path": str(out),
        "model.init_from": str(out), "data.template": "vicuna_v1", "train.max_steps": 1})
    run_dir = train(cfg)
    assert (run_dir / "projector.safetensors").is_file()


def test_unsupported_checkpoints_are_refused(tiny_dirs, tmp_path):
    source = make_hf_llava(tmp_path / "hf", tiny_dirs, "siglip", "default")
    with pytest.raises(CheckpointImportError, match="no CLS token"):
        open_for_chat(source)
    with pytest.raises(FileNotFoundError, match="neither"):
        open_for_chat(tmp_path)
