"""One loader opens every kind of model directory; a merged model is a transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.export.hf_llava import export_model
from llava_kit.export.merge import merge_run
from llava_kit.inference import GenerationService, SamplingParams
from llava_kit.loader import DIRECTORY_KINDS, open_model_dir
from llava_kit.model import LlavaModel
from llava_kit.store.projector_files import read_projector_spec
from llava_kit.train.engine import train

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
QUESTION = [{"role": "user", "content": "<image>\nWhat shape is in the image?"}]


def image():
    from llava_kit.data.images import load_image

    return load_image(SHAPES / "images" / "eval" / "000000.png")


def logits_of(model, tokenizer, service: GenerationService) -> torch.Tensor:
    prompt = service.prepare(QUESTION, [image()])
    with torch.no_grad():
        return model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dirs):
    """An sft run (LoRA), its merge and hf-llava export, a text-sft run and its merge."""
    from llava_kit.config import config_from_dict
    from tests.integration.conftest import tiny_config

    root = tmp_path_factory.mktemp("dirs")
    sft = train(config_from_dict(tiny_config(tiny_dirs, root / "sft", "sft", **{"train.max_steps": 2})))
    text_data = root / "chat.jsonl"
    text_data.write_text(json.dumps({"messages": [{"role": "user", "content": "Who are you?"},
                                                  {"role": "assistant", "content": "I am Lumen."}]}) + "\n")
    text = train(config_from_dict({
        "stage": "text-sft", "output_dir": str(root / "text"),
        "model": {"llm": {"name_or_path": str(tiny_dirs["llm"])}, "lora": {"r": 4, "alpha": 8}},
        "data": {"path": str(text_data), "template": "chatml"},
        "train": {"max_steps": 1, "micro_batch_size": 1, "report_to": "none", "use_cpu": True}}))
    merged = merge_run(sft, root / "merged")
    return {"sft": sft, "merged": merged, "export": export_model(merged, root / "export"), "text": text,
            "merged_text": merge_run(text, root / "merged_text"), "llm": Path(tiny_dirs["llm"])}


def test_every_kind_of_directory_opens_through_the_one_loader(runs):
    expected = {"sft": ("run", "multimodal"), "merged": ("merged", "multimodal"), "export": ("hf-llava", "multimodal"),
                "text": ("run", "text"), "merged_text": ("llm", "text"), "llm": ("llm", "text")}
    answers = {}
    for name, (kind, modality) in expected.items():
        loaded = open_model_dir(runs[name])
        assert (loaded.kind, loaded.modality.name) == (kind, modality), name
        service = GenerationService.from_loaded(loaded)
        messages = QUESTION if modality == "multimodal" else [{"role": "user", "content": "Who are you?"}]
        answers[name] = service.answer(messages, [image()] if modality == "multimodal" else [],
                                       SamplingParams(max_new_tokens=6)).text
    # the run, its merge and the export are the same model: the same greedy answer
    assert answers["sft"] == answers["merged"] == answers["export"]
    assert answers["text"] == answers["merged_text"]


def test_an_unknown_directory_is_refused_with_the_kinds_it_accepts(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as err:
        open_model_dir(tmp_path)
    for kind in DIRECTORY_KINDS:
        assert f"- {kind}:" in str(err.value)
    with pytest.raises(PathNotFoundError, match="does not exist"):
        open_model_dir(tmp_path / "missing")


def test_a_merged_model_loads_with_from_pretrained_with_the_loaders_logits(runs, tmp_path):
    loaded = open_model_dir(runs["merged"])
    service = GenerationService.from_loaded(loaded)
    reference = logits_of(loaded.model, loaded.tokenizer, service)
    from_pretrained = LlavaModel.from_pretrained(runs["merged"]).eval()
    auto = AutoModel.from_pretrained(runs["merged"]).eval()
    assert type(auto) is LlavaModel
    for model in (from_pretrained, auto):
        torch.testing.assert_close(logits_of(model, loaded.tokenizer, service), reference, rtol=0, atol=0)
    # and save_pretrained writes what from_pretrained reads back
    from_pretrained.save_pretrained(tmp_path / "again")
    again = LlavaModel.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(logits_of(again, loaded.tokenizer, service), reference, rtol=0, atol=0)
    # the run directory, rebuilt from its base plus its adapter, gives the same logits (LoRA folded in)
    run = open_model_dir(runs["sft"])
    torch.testing.assert_close(logits_of(run.model, run.tokenizer, service), reference, rtol=1e-4, atol=1e-4)


def test_a_merged_directory_of_format_1_still_opens(runs, tmp_path):
    """The layout before the composite became a transformers model: vision/, llm/, projector.safetensors."""
    merged = open_model_dir(runs["merged"])
    model, tokenizer, settings = merged.model, merged.tokenizer, merged.settings
    old = tmp_path / "old"
    model.vision_tower.save_pretrained(old / "vision")
    model.language_model.save_pretrained(old / "llm")
    tokenizer.save_pretrained(old / "llm")
    save_file({k: v.contiguous() for k, v in model.multi_modal_projector.state_dict().items()},
              str(old / "projector.safetensors"))
    spec = read_projector_spec(runs["sft"]).model_dump()
    (old / "llava_kit.json").write_text(json.dumps({"format": "llava-kit", "version": 1, "image_token": "<image>",
                                                    "projector": spec, "inference": settings.to_dict(),
                                                    "merged_from": "somewhere"}))
    loaded = open_model_dir(old)
    assert loaded.kind == "merged" and loaded.settings == settings
    service = GenerationService.from_loaded(merged)
    torch.testing.assert_close(logits_of(loaded.model, loaded.tokenizer, service),
                               logits_of(model, tokenizer, service), rtol=0, atol=0)


def test_spec_files_of_a_newer_version_or_damaged_are_refused_naming_the_file(runs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs["merged"], copy)
    spec = json.loads((copy / "llava_kit.json").read_text())
    (copy / "llava_kit.json").write_text(json.dumps({**spec, "version": 99}))
    with pytest.raises(ModelLoadError, match=r"llava_kit.json has format version 99; this llava-kit reads .* up to "
                                             r"version 2\. It was written by a newer llava-kit"):
        open_model_dir(copy)
    (copy / "llava_kit.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="llava_kit.json is not valid JSON"):
        open_model_dir(copy)
    (copy / "llava_kit.json").write_text(json.dumps({**spec, "inference": {"template": 3}}))
    with pytest.raises(ModelLoadError, match=r"llava_kit.json does not hold a valid MergedSpec: inference"):
        open_model_dir(copy)


def test_peft_and_gradient_checkpointing_accept_the_composite(runs):
    from peft import LoraConfig, get_peft_model

    model = LlavaModel.from_pretrained(runs["merged"])
    loaded = open_model_dir(runs["merged"])
    prompt = GenerationService.from_loaded(loaded).prepare(QUESTION, [image()])
    input_ids = torch.tensor([prompt.input_ids])
    labels = input_ids.clone()
    labels[:, :-3] = -100
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.q_proj"))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)
    loss = peft_model(input_ids, pixel_values=prompt.pixel_values, labels=labels)["loss"]
    loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)

    plain = LlavaModel.from_pretrained(runs["merged"]).train()
    expected = plain(input_ids, pixel_values=prompt.pixel_values, labels=labels)["loss"]
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert plain.language_model.is_gradient_checkpointing
    torch.testing.assert_close(plain(input_ids, pixel_values=prompt.pixel_values, labels=labels)["loss"], expected)


def test_a_merged_model_starts_a_new_run_with_its_three_parts(runs, make_config):
    cfg = make_config("from_merged", stage="sft", **{
        "model.vision.name_or_path": str(runs["merged"]), "model.llm.name_or_path": str(runs["merged"]),
        "model.init_from": str(runs["merged"]), "train.max_steps": 1})
    run_dir = train(cfg)
    before = open_model_dir(runs["merged"]).model.multi_modal_projector.state_dict()
    spec = read_projector_spec(run_dir)
    assert spec.name == "mlp2x_gelu" and set(before) == set(open_model_dir(run_dir).model.multi_modal_projector
                                                             .state_dict())
