"""pretrain -> sft -> merge -> chat on tiny models: what changes, what is saved, what reloads."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from llava_kit.data.multimodal import build_dataset
from llava_kit.export.merge import merge_run
from llava_kit.inference import ChatSession, SamplingParams, answer_once
from llava_kit.model.build import build_llava
from llava_kit.train.engine import train
from tests.support import open_for_chat

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_pretrain_changes_only_the_projector(make_config):
    cfg = make_config("pretrain")
    before, _ = build_llava(cfg.model)
    run_dir = train(cfg)
    after, _, _ = open_for_chat(run_dir)
    for name in ("vision_tower", "language_model"):
        a, b = state(getattr(before, name)), state(getattr(after, name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} changed during pretrain"
    p0, p1 = state(before.multi_modal_projector), state(after.multi_modal_projector)
    assert all(not torch.equal(p0[k], p1[k]) for k in p0), "every projector tensor should have been trained"
    saved = sorted(p.name for p in run_dir.iterdir())
    assert {"config.yaml", "projector.safetensors", "projector.json", "tokenizer", "metrics.jsonl", "loss.png",
            "data_report.json"} <= set(saved)
    assert "adapter" not in saved and "llm" not in saved  # nothing frozen is written


def test_sft_from_pretrain_merge_and_chat(make_config, tmp_path):
    pretrain_dir = train(make_config("pretrain"))
    cfg = make_config("sft", stage="sft", **{"model.init_from": str(pretrain_dir), "train.max_steps": 3,
                                             "train.projector_learning_rate": 2e-3})
    sft_dir = train(cfg)
    assert (sft_dir / "adapter" / "adapter_model.safetensors").is_file()
    adapter = load_file(str(sft_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # only LoRA weights, no embedding copies

    unmerged, tokenizer, settings = open_for_chat(sft_dir)
    merged_dir = merge_run(sft_dir, tmp_path / "merged")
    merged, merged_tokenizer, merged_settings = open_for_chat(merged_dir)
    assert not any(p.name == "adapter" for p in merged_dir.iterdir())
    assert merged_settings == settings and len(merged_tokenizer) == len(tokenizer)

    dataset = build_dataset(cfg, unmerged, tokenizer)
    from llava_kit.data.dataset import Collator
    items = [dataset[i] for i in range(3)]
    inputs = Collator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        logits_unmerged = unmerged(**kwargs).logits
        logits_merged = merged(**kwargs).logits
        loss_unmerged = unmerged(**inputs)["loss"]
        loss_merged = merged(**inputs)["loss"]
    assert torch.allclose(logits_unmerged, logits_merged, atol=1e-4), (logits_unmerged - logits_merged).abs().max()
    assert torch.allclose(loss_unmerged, loss_merged, atol=1e-5)

    image = str(SHAPES / "images" / "eval" / "000000.png")
    generation = SamplingParams(max_new_tokens=8)
    a = answer_once(ChatSession(unmerged, tokenizer, settings, generation), image, "What shape is in the image?")
    b = answer_once(ChatSession(merged, merged_tokenizer, merged_settings, generation), image,
                    "What shape is in the image?")
    assert a == b


def test_init_from_a_run_of_another_projector_is_a_clear_error(make_config):
    import pytest

    from llava_kit.store.projector_files import load_projector

    pretrain_dir = train(make_config("pretrain", **{"train.max_steps": 1}))
    for projector, message in (({"name": "resampler", "options": {"num_queries": 4}}, "name: saved 'mlp2x_gelu', "
                                                                                       "this model 'resampler'"),
                               ({"name": "mlp2x_gelu", "options": {}}, None)):
        model, _ = build_llava(make_config("sft", stage="sft", **{"model.projector": projector}).model)
        if message is None:
            load_projector(model, pretrain_dir)  # the same design loads
            continue
        with pytest.raises(ValueError, match=f"is another design \\({message}; options: saved {{}}, .*\\); set "):
            load_projector(model, pretrain_dir)


def test_a_zoo_projector_survives_merge(make_config, tmp_path):
    """A resampler (learned queries, fixed positions rebuilt from its shapes) gives the same image features from
    the run directory and from the merged model."""
    run_dir = train(make_config("pretrain", **{"train.max_steps": 1,
                                               "model.projector": {"name": "resampler", "options": {"num_queries": 4}}}))
    merged = merge_run(run_dir, tmp_path / "merged")
    pixel_values = torch.randn(2, 3, 64, 64)
    features = []
    for source in (run_dir, merged):
        model, _, _ = open_for_chat(source)
        assert model.tokens_per_image == 4
        with torch.no_grad():
            features.append(model.get_image_features(pixel_values))
    assert torch.equal(features[0], features[1])
