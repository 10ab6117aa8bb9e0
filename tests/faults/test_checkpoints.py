"""Checkpoint faults: truncated files, a full disk, a kill between files, an occupied run directory."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from llava_kit.cli import main
from llava_kit.errors import LlavaKitError
from llava_kit.train import engine
from llava_kit.train.checkpoints import CheckpointError

SETTINGS = {"train.max_steps": 6, "train.save_steps": 2, "train.save_total_limit": None}


def projector(run_dir):
    return load_file(str(run_dir / "projector.safetensors"))


@pytest.fixture
def finished(make_config):
    """A pretrain run of 6 steps with checkpoints 2, 4 and 6."""
    cfg = make_config("finished", **SETTINGS)
    engine.train(cfg)
    return cfg


def resume(cfg, checkpoint="latest"):
    return engine.train(cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "resume_from_checkpoint": checkpoint})}))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"])
def test_a_truncated_file_is_one_error_naming_it_and_the_checkpoint_to_fall_back_to(finished, name):
    run_dir = engine.Path(finished.output_dir)
    damaged = run_dir / "checkpoint-6" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        resume(finished)
    message = str(err.value)
    assert f"{name} in {run_dir / 'checkpoint-6'} is damaged" in message
    assert f"train.resume_from_checkpoint={run_dir / 'checkpoint-4'}" in message
    assert "\n" not in message


def test_a_full_disk_during_a_save_leaves_nothing_partial_and_the_earlier_checkpoints_intact(make_config,
                                                                                             monkeypatch):
    cfg = make_config("full_disk", **SETTINGS)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"the disk is full: saving checkpoint-4 .* nothing partial was left "
                                              r"and checkpoint-2 and the earlier checkpoints are intact"):
        engine.train(cfg)
    run_dir = engine.Path(cfg.output_dir)
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert {p.name for p in (run_dir / "checkpoint-2").iterdir()} >= {"model.safetensors", "optimizer.pt",
                                                                      "trainer_state.json", "rng_state.pth"}


def test_a_kill_between_checkpoint_files_then_resume_gives_the_uninterrupted_weights(make_config, finished,
                                                                                     monkeypatch, caplog):
    cfg = make_config("killed", **SETTINGS)
    real = Trainer._save_rng_state

    def killed_while_saving(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt  # as a kill: optimizer.pt is written, the RNG state and trainer_state are not
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg)
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    run_dir = engine.Path(cfg.output_dir)
    assert (run_dir / ".checkpoint-4.partial").is_dir() and not (run_dir / "checkpoint-4").exists()
    # a checkpoint written in place by another tool, incomplete: `latest` passes over it and says so
    (run_dir / "checkpoint-5").mkdir()
    (run_dir / "checkpoint-5" / "model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="llava_kit.train.checkpoints"):
        resumed = resume(cfg)
    assert "passed over incomplete checkpoint-5 (lacks trainer_state.json" in caplog.text
    assert not (run_dir / ".checkpoint-4.partial").exists()
    straight = projector(engine.Path(finished.output_dir))
    after = projector(resumed)
    assert straight.keys() == after.keys()
    for key in straight:
        torch.testing.assert_close(after[key], straight[key], rtol=0, atol=1e-6)


def test_an_occupied_run_directory_is_refused_unless_resumed_or_overwritten(finished, capsys, tmp_path):
    with pytest.raises(LlavaKitError, match="already holds a run .* pass --overwrite"):
        engine.train(finished)
    config = tmp_path / "again.yaml"
    config.write_text(json.dumps(finished.model_dump(mode="json")))
    assert main(["train", str(config)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    keep = engine.Path(finished.output_dir) / "notes.txt"
    keep.write_text("mine")
    assert main(["train", str(config), "--overwrite", "train.max_steps=2", "train.save_steps=1"]) == 0
    run_dir = engine.Path(finished.output_dir)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1",
                                                                                         "checkpoint-2"]
    assert keep.read_text() == "mine"  # only what a run writes is replaced


def test_a_run_refused_in_set_up_leaves_the_directory_free_for_the_corrected_one(make_config):
    """A user error found while building the model (here a projector option) stops the run before training; what it
    wrote (config.yaml) holds no trained run, so the corrected run may use the same output_dir without --overwrite."""
    bad = make_config("refused", **{"model.projector.name": "avgpool", "model.projector.options": {"mode": "median"}},
                      **SETTINGS)
    with pytest.raises(LlavaKitError, match="mode must be one of average, max, got 'median'"):
        engine.train(bad)
    run_dir = engine.Path(bad.output_dir)
    assert (run_dir / "config.yaml").is_file()
    good = make_config("refused", **{"model.projector.name": "avgpool"}, **{**SETTINGS, "train.max_steps": 1})
    assert engine.train(good) == run_dir and (run_dir / "projector.safetensors").is_file()
