"""Config loading: every shipped config validates; problems are reported together with suggestions."""

from pathlib import Path

import pytest

from llava_kit.config import ConfigError, load_config, load_saved_config, save_config

REPO = Path(__file__).resolve().parents[2]
# Run configs; comparison configs (compare_*.yaml, another format) are checked in tests/unit/test_compare.py.
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("compare_"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs use repo-relative paths
    tiny = "tiny" in path.parts
    cfg = load_config(path, check_paths=tiny)  # real recipes point at datasets a user downloads first
    assert cfg.stage in ("pretrain", "sft", "text-pt", "text-sft") and cfg.output_dir
    if cfg.stage in ("pretrain", "sft"):
        assert cfg.model.trainable.llm == ("frozen" if cfg.stage == "pretrain" else "lora")
    else:
        assert cfg.model.trainable.llm in ("lora", "qlora", "full")


def test_unknown_keys_and_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny/pretrain.yaml",
                    ["trian.max_steps=3", "train.learning_rate=abc", "model.projector.nmae=x", "data.templte=chatml"],
                    check_paths=False)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "did you mean `train`" in text and "did you mean `model.projector.name`" in text
    assert "did you mean `data.template`" in text and "`train.learning_rate` must be a number" in text


def test_cross_field_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny/pretrain.yaml",
                    ["output_dir=", "data.template=vicuna", "model.trainable.llm=lora", "train.micro_batch_size=0"],
                    check_paths=False)
    text = str(err.value)
    assert "4 problem(s)" in text and "did you mean `vicuna_v1`" in text and "`output_dir` is empty" in text
    assert "trains only the projector" in text and "micro_batch_size" in text


def test_overrides_are_parsed_as_yaml_and_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/tiny/sft.yaml",
                      ["train.max_steps=7", "model.lora.target_modules=[q_proj,v_proj]", "train.learning_rate=1e-4"],
                      check_paths=False)
    assert cfg.train.max_steps == 7 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path) == cfg


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
