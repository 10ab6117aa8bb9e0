"""What `auto` means on a GPU and on the CPU (precision, attention kernel, gradient checkpointing), and that the
chosen settings reach the model without changing what it learns."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from llava_kit.model.build import build_llava
from llava_kit.train.engine import choose_attn_implementation, choose_gradient_checkpointing, train


def test_auto_uses_flash_attention_only_where_it_can_run(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert choose_attn_implementation("auto", "bf16", gpu=True) == "flash_attention_2"
    assert choose_attn_implementation("auto", "fp16", gpu=True) == "flash_attention_2"
    assert choose_attn_implementation("auto", "fp32", gpu=True) is None  # the kernel takes half precision only
    assert choose_attn_implementation("auto", "bf16", gpu=False) is None
    assert choose_attn_implementation("eager", "fp32", gpu=False) == "eager"  # an explicit choice is kept
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    assert choose_attn_implementation("auto", "bf16", gpu=True) is None  # no flash-attn package: sdpa


def test_auto_checkpoints_gradients_on_a_gpu_only():
    assert choose_gradient_checkpointing("auto", gpu=True) is True
    assert choose_gradient_checkpointing("auto", gpu=False) is False
    assert choose_gradient_checkpointing(True, gpu=False) is True
    assert choose_gradient_checkpointing(False, gpu=True) is False


def test_attention_choice_reaches_the_llm(make_config):
    cfg = make_config()
    model, _ = build_llava(cfg.model, attn_implementation="eager")
    assert model.language_model.config._attn_implementation == "eager"


def test_flash_attention_without_its_package_is_a_clear_error(make_config):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*model.llm.attn_implementation=auto"):
        build_llava(make_config().model, attn_implementation="flash_attention_2")


def test_gradient_checkpointing_and_eager_attention_train_the_same_projector(make_config, caplog):
    """Recomputing activations and another attention kernel change cost, not results: same losses step by step."""

    def losses(name, **overrides):
        run_dir = train(make_config(name, stage="sft", **overrides))
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [h["loss"] for h in history if "loss" in h]

    plain = losses("plain")
    with caplog.at_level(logging.INFO, logger="llava_kit.train.engine"):
        other = losses("checkpointed", **{"train.gradient_checkpointing": True,
                                          "model.llm.attn_implementation": "eager"})
    assert "attention eager, gradient checkpointing on" in caplog.text
    assert len(plain) == 4 and other == pytest.approx(plain, abs=1e-4)
