"""A saved projector records the base it was trained with; loading it against another base refuses, naming why."""

from __future__ import annotations

import pytest

from llava_kit.model.build import build_llava
from llava_kit.store.projector_files import load_projector, projector_spec, save_projector
from llava_kit.testing.tiny import init_tiny_llm, init_tiny_vision


@pytest.fixture
def saved(make_config, tmp_path):
    """A projector saved by an sft run's code path (chatml template, CLIP tower layer -2, patch)."""
    cfg = make_config("source", stage="sft")
    model, _ = build_llava(cfg.model)
    out = tmp_path / "source_run"
    out.mkdir()
    save_projector(model, out, projector_spec(model, cfg))
    return cfg, out


def _target(make_config, **overrides):
    model, _ = build_llava(make_config("target", stage="sft", **overrides).model)
    return model


def test_same_base_loads(saved, make_config):
    cfg, out = saved
    load_projector(_target(make_config), out, template="chatml")
    load_projector(_target(make_config), out)  # no template given (chat, merge): not checked


@pytest.mark.parametrize("override, named", [
    ({"model.vision.feature_layer": -1}, "vision feature layer: trained with -2, this model has -1"),
    ({"model.vision.select_strategy": "full"}, "vision select strategy: trained with patch, this model has full"),
])
def test_another_layer_or_strategy_is_refused(saved, make_config, override, named):
    with pytest.raises(ValueError, match=named):
        load_projector(_target(make_config, **override), saved[1])


def test_another_tower_is_refused(saved, make_config, tmp_path):
    other = init_tiny_vision(tmp_path / "other_vision", seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match=r"vision tower weights: trained with \w+, this model has \w+ \(use the tower"):
        load_projector(_target(make_config, **{"model.vision.name_or_path": str(other)}), saved[1])


def test_another_llm_is_refused(saved, make_config, tmp_path):
    other = init_tiny_llm(tmp_path / "other_llm", seed=1)
    with pytest.raises(ValueError, match=r"LLM \(its embedding weights differ\)"):
        load_projector(_target(make_config, **{"model.llm.name_or_path": str(other)}), saved[1])


def test_another_chat_template_is_refused_but_plain_pretraining_is_not(saved, make_config, tmp_path):
    with pytest.raises(ValueError, match="template: trained with 'chatml', this run uses 'vicuna_v1'"):
        load_projector(_target(make_config), saved[1], template="vicuna_v1")
    cfg = make_config("pretrain", stage="pretrain")  # template plain: LLaVA's pretrain -> sft with a chat template
    model, _ = build_llava(cfg.model)
    out = tmp_path / "pretrain_run"
    out.mkdir()
    save_projector(model, out, projector_spec(model, cfg))
    load_projector(_target(make_config), out, template="vicuna_v1")
