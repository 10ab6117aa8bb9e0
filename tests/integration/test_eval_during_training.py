"""Evaluation during training: held-out loss in metrics.jsonl and loss.png, a benchmark score, and keep_best keeping
(and ending with) the checkpoint of the lowest held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llava_kit.errors import ConfigError
from llava_kit.train.engine import train

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"


def held_out_file(tmp_path: Path, n: int = 8) -> Path:
    """n records of the shapes sample kept apart as held-out data (the LLaVA format of training)."""
    records = json.loads((SHAPES / "pretrain.json").read_text())[-n:]
    path = tmp_path / "held_out.json"
    path.write_text(json.dumps(records))
    return path


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_held_out_loss_and_a_benchmark_score_are_logged_during_training(make_config, tmp_path):
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text("".join(json.dumps({"question_id": n, "image": f"{n:06d}.png", "text": "Is there a star?",
                                        "label": label}) + "\n" for n, label in enumerate(("yes", "no", "no"))))
    cfg = make_config("run", "pretrain", **{
        "data.eval_path": str(held_out_file(tmp_path)), "train.eval_steps": 2, "train.max_steps": 3,
        "train.eval_benchmark": {"name": "pope", "data": str(pope), "image_root": str(SHAPES / "images" / "eval"),
                                 "limit": 2, "max_new_tokens": 3}})
    run_dir = train(cfg)
    history = metrics_of(run_dir)
    # every 2 steps and at the end (step 3), through the Trainer's loop: eval_loss next to the training loss
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 3]
    assert all(h["eval_loss"] > 0 for h in history if "eval_loss" in h)
    scores = [h for h in history if "eval_pope_f1" in h]
    assert [h["step"] for h in scores] == [2, 3] and all(0 <= h["eval_pope_yes_ratio"] <= 1 for h in scores)
    assert history[-1] == {"final_weights": "last", "step": 3}
    report = json.loads((run_dir / "eval_data_report.json").read_text())
    assert report["kept"] == 8
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_keep_best_keeps_and_ends_with_the_checkpoint_of_the_lowest_held_out_loss(make_config, tmp_path,
                                                                                     monkeypatch):
    # The held-out losses are scripted (the real ones of a 5-step tiny run fall step after step, so the best would be
    # the last): the lowest is step 2's, and the rotation (limit 2) must keep checkpoint-2 while steps pass it.
    import transformers

    scripted = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0}
    real_loop = transformers.Trainer.evaluation_loop

    def evaluation_loop(self, *args, **kwargs):
        output = real_loop(self, *args, **kwargs)  # the real evaluation runs; its loss is replaced
        output.metrics["eval_loss"] = scripted[self.state.global_step]
        return output

    monkeypatch.setattr(transformers.Trainer, "evaluation_loop", evaluation_loop)
    cfg = make_config("best", "pretrain", **{
        "data.eval_path": str(held_out_file(tmp_path)), "train.max_steps": 5, "train.save_steps": 1,
        "train.save_total_limit": 2, "train.keep_best": True})
    run_dir = train(cfg)
    history = metrics_of(run_dir)
    assert {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h} == scripted
    # the best and the last checkpoint survive the rotation; 1, 3 and 4 are gone
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]
    state = json.loads((run_dir / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(run_dir / "checkpoint-2")  # its final place, not the staging one
    assert history[-1] == {"final_weights": "best", "checkpoint": "checkpoint-2", "step": 2, "eval_loss": 1.0}
    # the run directory holds the best checkpoint's projector, not the last step's
    final = load_file(run_dir / "projector.safetensors")
    for checkpoint, same in ((2, True), (5, False)):
        saved = {k.removeprefix("multi_modal_projector."): v
                 for k, v in load_file(run_dir / f"checkpoint-{checkpoint}" / "model.safetensors").items()}
        assert set(saved) == set(final)
        assert all(saved[k].equal(final[k]) for k in final) is same, checkpoint


def test_held_out_settings_are_checked_before_anything_runs(make_config, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_config("x", "pretrain", **{"train.keep_best": True, "train.eval_steps": 3})
    text = str(err.value)
    assert "`train.keep_best` needs held-out data: set `data.eval_path`" in text
    assert "`train.eval_steps` needs held-out data" in text
    with pytest.raises(ConfigError) as err:
        make_config("x", "pretrain", **{"data.eval_path": str(held_out_file(tmp_path)), "train.keep_best": True,
                                         "train.eval_steps": 3, "train.save_steps": 6})
    assert "set `train.eval_steps` equal to `train.save_steps` (6)" in str(err.value)
    with pytest.raises(ConfigError, match="`data.eval_path` file '/nonexistent.json' does not exist"):
        make_config("x", "pretrain", **{"data.eval_path": "/nonexistent.json"})
    with pytest.raises(ConfigError, match="train.eval_benchmark.name.*pope") as err:
        make_config("x", "pretrain", **{"data.eval_path": str(held_out_file(tmp_path)),
                                         "train.eval_benchmark": {"name": "popee", "data": "x"}})
