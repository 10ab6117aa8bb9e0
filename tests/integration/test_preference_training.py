"""Preference tuning through the engine on tiny models: the reference, one vision encoding per pair, a run that
learns, text-dpo."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainingArguments

from llava_kit.data.preference import PreferenceCollator
from llava_kit.demo.preference import write_shape_pairs
from llava_kit.modality import modality_for_stage
from llava_kit.train.preference import PreferenceTrainer
from tests.integration.conftest import SHAPES


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_shape_pairs(SHAPES / "sft.json", tmp_path_factory.mktemp("pairs") / "pairs.json")


def dpo_config(make_config, pairs_file, name="dpo", **overrides):
    return make_config(name, stage="dpo", **{"data.path": str(pairs_file), "data.feature_cache": "off",
                                             "train.micro_batch_size": 2, **overrides})


def model_and_batch(cfg, n_pairs=2):
    modality = modality_for_stage(cfg.stage)
    model, tokenizer = modality.build_for_training(cfg, "fp32", None, False)
    dataset = modality.build_dataset(cfg, model, tokenizer, torch.device("cpu"))
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(n_pairs)])
    return model, tokenizer, batch


def trainer_for(model, cfg, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    return PreferenceTrainer(model=model, args=args, settings=cfg.train.preference)


@pytest.mark.parametrize("llm, projector", [("lora", "frozen"), ("lora", "full"), ("full", "frozen")])
def test_reference_logps_equal_the_untouched_base_models(make_config, pairs_file, tmp_path, llm, projector):
    """Adapter disabled (LoRA) or the frozen copy (full): the reference scores as a fresh model without LoRA."""
    from llava_kit.model.build import build_llava

    cfg = dpo_config(make_config, pairs_file, **{"model.trainable.llm": llm, "model.trainable.projector": projector})
    model, _, batch = model_and_batch(cfg)
    base, _ = build_llava(cfg.model)  # the same pretrained parts, no adapter; the projector is fresh: copy it
    base.multi_modal_projector.load_state_dict(model.multi_modal_projector.state_dict())
    trainer = trainer_for(model, cfg, tmp_path)
    with torch.no_grad():  # the policy moves away from its start: every trained weight changes
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    policy = trainer.pair_logps(model, batch)["logps"]
    reference = trainer.pair_logps(model, batch, reference=True)["logps"]
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    expected = base.eval()(**rows, paired_rows=True, return_logps=True)["logps"]
    assert torch.allclose(reference, expected, atol=1e-4), (reference, expected)
    assert not torch.allclose(policy, expected, atol=1e-2)  # the policy is another model now


def test_the_vision_tower_runs_once_per_pair(make_config, pairs_file, tmp_path):
    """Three pairs: one tower call on three images, for both rows of each pair and for the reference pass."""
    cfg = dpo_config(make_config, pairs_file)
    model, _, batch = model_and_batch(cfg, n_pairs=3)
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 3
    calls = []
    encode = model.vision_tower.encode
    model.vision_tower.encode = lambda pixels: calls.append(pixels.shape[0]) or encode(pixels)
    loss = trainer_for(model, cfg, tmp_path).compute_loss(model, batch)
    assert calls == [3]
    assert loss.item() == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: -log sigmoid(0)


def test_a_tiny_dpo_run_learns_to_prefer_the_chosen_answers(make_config, pairs_file):
    from llava_kit.export.merge import merge_run
    from llava_kit.train.engine import train

    run_dir = train(dpo_config(make_config, pairs_file, "run", **{
        "train.max_steps": 4, "train.learning_rate": 2e-3, "data.feature_cache": "auto"}))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and steps[-1]["loss"] < steps[0]["loss"] - 0.05
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in steps[-1]
    assert steps[-1]["rewards/margins"] > 0
    assert (run_dir / "adapter").is_dir() and (run_dir / "projector.safetensors").is_file()
    assert (merge_run(run_dir, run_dir.parent / "merged") / "model.safetensors").is_file()


def test_text_dpo_trains_the_llm_alone_on_text_pairs(make_config, tmp_path):
    from llava_kit.train.engine import train

    pairs = [{"instruction": f"Name shape {i}.", "chosen": "A square.", "rejected": "A square and a circle."}
             for i in range(8)]
    (tmp_path / "text_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = make_config("text", stage="text-dpo", **{"data.path": str(tmp_path / "text_pairs.jsonl"),
                                                   "train.max_steps": 3, "train.micro_batch_size": 4,
                                                   "train.preference.loss_type": "ipo", "data.image_root": ""})
    run_dir = train(cfg)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/accuracies" in steps[0] and (run_dir / "adapter").is_dir()
    assert json.loads((run_dir / "data_report.json").read_text())["kept"] == 8


@pytest.mark.slow
def test_the_preference_recipe_runs_through_the_cli_and_measures_through_chat(tmp_path):
    """`llava-kit demo --preference --quick`: every stage of the recipe and both measurements (about a minute)."""
    import subprocess
    import sys

    from tests.integration.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "llava_kit.cli", "demo", "--preference", "--quick", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("before (sft): names an absent shape") and lines[1].startswith("after (dpo):")
    summary = json.loads((tmp_path / "preference_summary.json").read_text())
    assert set(summary["figures"]) == {"before (sft)", "after (dpo)"}
    assert (tmp_path / "merged_dpo" / "model.safetensors").is_file()


def test_data_check_reads_pairs_with_a_dpo_config_or_a_preference_format(tmp_path, capsys, monkeypatch, pairs_file):
    from llava_kit.cli import main
    from tests.integration.conftest import REPO

    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "train/000000.png", "question": "What?", "chosen": "A.", "rejected": "A."})
                   + "\n" + json.dumps({"image": "train/000000.png", "question": "What?", "chosen": "A square.",
                                        "rejected": "Two squares."}) + "\n")
    assert main(["data", "check", str(bad), "--config", "configs/tiny/dpo.yaml"]) == 1
    out = capsys.readouterr().out
    assert "the same text: nothing to prefer" in out and out.strip().splitlines()[-1] == "valid: 1 invalid: 1"
    assert main(["data", "check", str(pairs_file), "--format", "pairwise", "--image-root",
                 str(SHAPES / "images")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "valid: 48 invalid: 0"
