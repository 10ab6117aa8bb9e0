"""LoRA variants and training tricks: names agree with transformers, each refused up front with its reason."""

from __future__ import annotations

import pytest

from llava_kit.config import OPTIMIZERS
from llava_kit.errors import ConfigError
from tests.support import unchecked_config


def _cfg(stage="sft", **keys):
    return unchecked_config(stage, **keys)


def test_optimizer_names_are_transformers_own():
    from transformers.training_args import OptimizerNames

    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}


def test_valid_settings_pass():
    cfg = _cfg(model__lora__loraplus_lr_ratio=16, model__lora__init="pissa", train__optim="adafactor",
               train__neftune_noise_alpha=5.0)
    assert cfg.model.lora.init == "pissa" and cfg.train.optim == "adafactor"
    assert _cfg(model__trainable__llm="freeze", model__freeze__train_layers=-1).model.freeze.train_layers == -1


@pytest.mark.parametrize("keys, message", [
    ({"train__optim": "paged_adamw_8bit", "train__use_cpu": True}, "needs a CUDA GPU (bitsandbytes)"),
    ({"train__optim": "galore_adamw", "train__optim_target_modules": ["attn"]}, "set `model.trainable.llm` to full"),
    ({"train__optim": "galore_adamw", "model__trainable__llm": "full"}, "needs `train.optim_target_modules`"),
    ({"train__optim_target_modules": ["attn"]}, "is for the GaLore optimizers"),
    ({"train__optim": "adamw_9bit"}, "adamw_torch"),
    ({"model__lora__loraplus_lr_ratio": 16, "model__trainable__llm": "full"}, "set it to lora"),
    ({"model__lora__loraplus_lr_ratio": 0}, "must be > 0"),
    ({"model__lora__init": "pissa", "model__trainable__llm": "full"}, "initialises a LoRA adapter"),
    ({"model__lora__init": "loftq", "model__trainable__llm": "qlora"}, "quantises the base itself"),
    ({"model__trainable__llm": "freeze", "model__freeze__train_layers": 0}, "freeze trains nothing"),
    ({"train__neftune_noise_alpha": 0}, "must be > 0"),
])
def test_tricks_are_refused_with_the_reason(keys, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**keys)
    assert message in str(err.value)


@pytest.mark.parametrize("keys, message", [
    ({"model__lora__init": "pissa"}, "changes the base weights"),
    ({"train__neftune_noise_alpha": 5.0}, "would noise the reference pass"),
])
def test_what_breaks_the_dpo_reference_is_refused_there(keys, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("dpo", **keys)


def test_an_optimizer_this_machine_cannot_run_is_refused_before_loading(monkeypatch):
    import torch

    from llava_kit.train.engine import check_optimizer_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_optimizer_available("adafactor")
    with pytest.raises(ConfigError, match="paged_adamw_8bit needs a CUDA GPU"):
        check_optimizer_available("paged_adamw_8bit")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "galore_torch" else find_spec(name))
    with pytest.raises(ConfigError, match="a CUDA GPU .* and the galore_torch package"):
        check_optimizer_available("galore_adamw")
