"""A run killed after a checkpoint and resumed ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llava_kit.train import engine


class Crash(RuntimeError):
    pass


class CrashAfterStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"simulated crash after step {self.step}")


def trained_weights(run_dir):
    weights = load_file(str(run_dir / "projector.safetensors"))
    weights.update({f"adapter.{k}": v for k, v in load_file(str(run_dir / "adapter/adapter_model.safetensors")).items()})
    return weights


def test_resume_matches_uninterrupted_run(make_config, monkeypatch):
    settings = {"train.max_steps": 6, "train.save_steps": 3, "train.projector_learning_rate": 2e-3}
    straight = engine.train(make_config("straight", stage="sft", **settings))

    crashed_cfg = make_config("crashed", stage="sft", **settings)
    real_trainer = engine.LlavaTrainer

    def crashing_trainer(*args, **kwargs):
        trainer = real_trainer(*args, **kwargs)
        trainer.add_callback(CrashAfterStep(4))  # checkpoint-3 exists, step 4 is lost
        return trainer

    monkeypatch.setattr(engine, "LlavaTrainer", crashing_trainer)
    with pytest.raises(Crash):
        engine.train(crashed_cfg)
    monkeypatch.setattr(engine, "LlavaTrainer", real_trainer)
    assert (crashed_cfg.output_dir and (engine.Path(crashed_cfg.output_dir) / "checkpoint-3").is_dir())

    crashed_cfg.train.resume_from_checkpoint = "latest"
    resumed = engine.train(crashed_cfg)

    a, b = trained_weights(straight), trained_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), f"{k} differs after resume"
