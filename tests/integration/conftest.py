"""Fixtures for end-to-end runs on tiny models and the small shapes sample in assets/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "assets" / "shapes_small"


def tiny_config(tiny_dirs, output_dir, stage="pretrain", **overrides) -> dict:
    """A config dict for a short run on tiny models; `overrides` are dotted keys."""
    data = {
        "stage": stage, "output_dir": str(output_dir), "seed": 0,
        "model": {"vision": {"name_or_path": str(tiny_dirs["vision"])},
                  "llm": {"name_or_path": str(tiny_dirs["llm"])},
                  "projector": {"name": "mlp2x_gelu"},
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"path": str(SHAPES / ("pretrain.json" if stage == "pretrain" else "sft.json")),
                 "image_root": str(SHAPES / "images"), "template": "plain" if stage == "pretrain" else "chatml",
                 "max_seq_len": 256},
        "train": {"micro_batch_size": 4, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_steps": 100, "report_to": "none", "use_cpu": True, "lr_warmup_ratio": 0.0},
    }
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


@pytest.fixture
def make_config(tiny_dirs, tmp_path):
    from llava_kit.config import config_from_dict

    def make(name="run", stage="pretrain", **overrides):
        return config_from_dict(tiny_config(tiny_dirs, tmp_path / name, stage, **overrides))

    return make


@pytest.fixture(scope="session")
def answering_model(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny models fine-tuned (sft, the whole LLM, 20 steps of 2 samples) until they answer the shapes
    questions in a few words ("A is a.") and end the turn with chatml's <|im_end|>, merged: for tests that need
    answers that end by themselves and stream in several words."""
    from llava_kit.config import config_from_dict
    from llava_kit.export.merge import merge_run
    from llava_kit.train.engine import train

    root = tmp_path_factory.mktemp("answering")
    cfg = config_from_dict(tiny_config(tiny_dirs, root / "sft", "sft", **{
        "model.trainable.llm": "full", "train.max_steps": 20, "train.micro_batch_size": 2,
        "train.learning_rate": 2e-3}))
    return merge_run(train(cfg), root / "merged")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """LLAVA_KIT_DEMO_MODEL, or a freshly trained demo's merged model (~5-15 min on 2 cores; slow tests only)."""
    if os.environ.get("LLAVA_KIT_DEMO_MODEL"):
        return Path(os.environ["LLAVA_KIT_DEMO_MODEL"])
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "llava_kit.cli", "demo", "--workdir", str(workdir)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "merged"
