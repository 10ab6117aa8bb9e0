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


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    """A tiny sft run (LoRA, not merged), its merge and its hf-llava export.

    Tiny models of seed 5 and one step at a tiny learning rate: answers that differ from image to image (seed 0's
    say "a a a" to everything, and a few real steps teach it to stop at once), so equal answers mean equal pixels.
    """
    from llava_kit.config import config_from_dict
    from llava_kit.export.hf_llava import export_model
    from llava_kit.export.merge import merge_run
    from llava_kit.testing.tiny import init_tiny
    from llava_kit.train.engine import train

    root = tmp_path_factory.mktemp("eval_models")
    tiny = init_tiny(root / "tiny", seed=5)
    run = train(config_from_dict(tiny_config(tiny, root / "sft", "sft", **{"train.max_steps": 1,
                                                                          "train.learning_rate": 1e-6})))
    merged = merge_run(run, root / "merged")
    return {"run": Path(run), "merged": Path(merged), "export": Path(export_model(merged, root / "export"))}


# ---------------------------------------------------------------------------------------------- a real browser

def _browser_or_skip() -> str:
    """The system chromium's path; skips with the reason where there is none (fails where browser tests are
    required: LLAVA_KIT_BROWSER_TESTS=required, as CI sets it)."""
    from scripts import screenshots as driver

    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (the dev extra: ./scripts/install.sh)"
    chromium = driver.find_chromium()
    if reason is None and chromium is None:
        reason = "no chromium (./scripts/install_browser.sh installs it with apt; or set LLAVA_KIT_CHROMIUM)"
    if reason is not None:
        if os.environ.get("LLAVA_KIT_BROWSER_TESTS") == "required":
            pytest.fail(f"browser tests are required here but {reason}")
        pytest.skip(reason)
    return chromium


@pytest.fixture(scope="module")
def chromium_path() -> str:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return _browser_or_skip()


@pytest.fixture(scope="module")
def browser(chromium_path):
    """A headless chromium driven by Playwright (scripts/screenshots.py launches it), one per test module."""
    from playwright.sync_api import sync_playwright

    from scripts import screenshots as driver

    with sync_playwright() as playwright:
        browser = driver.launch(playwright, chromium_path)
        yield browser
        browser.close()
