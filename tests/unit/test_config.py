"""Config loading: every shipped config validates; problems are reported together with suggestions."""

from pathlib import Path

import pytest

from llava_kit.config import ConfigError, load_config, load_saved_config, save_config

REPO = Path(__file__).resolve().parents[2]
# Run configs; comparison configs (compare_*.yaml, another format) are checked in tests/unit/test_compare_config.py.
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("compare_"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs use repo-relative paths
    tiny = "tiny" in path.parts
    cfg = load_config(path, check_paths=tiny)  # real recipes point at datasets a user downloads first
    assert cfg.stage in ("pretrain", "sft", "text-pt", "text-sft", "dpo", "text-dpo") and cfg.output_dir
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


def test_a_duplicated_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((REPO / "configs/tiny/pretrain.yaml").read_text() + "\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key `seed`"):
        load_config(path, check_paths=False)


def test_feature_cache_off_stays_a_string_in_yaml_and_overrides(tmp_path):
    path = tmp_path / "off.yaml"
    text = (REPO / "configs/tiny/pretrain.yaml").read_text()
    path.write_text(text.replace("data:\n", "data:\n  feature_cache: off\n"))
    assert load_config(path, check_paths=False).data.feature_cache == "off"
    cfg = load_config(REPO / "configs/tiny/pretrain.yaml", ["data.feature_cache=off"], check_paths=False)
    assert cfg.data.feature_cache == "off"
    save_config(cfg, tmp_path / "config.yaml")  # and back, through a saved run config
    assert load_saved_config(tmp_path).data.feature_cache == "off"


def test_booleans_take_yaml_words_but_numbers_stay_strict():
    cfg = load_config(REPO / "configs/tiny/pretrain.yaml", ["train.use_cpu=yes", "data.cache=off",
                                                            "train.gradient_checkpointing=on"], check_paths=False)
    assert cfg.train.use_cpu is True and cfg.data.cache is False and cfg.train.gradient_checkpointing is True
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny/pretrain.yaml", ["train.max_steps=abc", "train.save_steps=2.5"],
                    check_paths=False)
    assert "`train.max_steps` must be an integer, got 'abc'" in str(err.value)
    assert "`train.save_steps` must be an integer, got 2.5" in str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr_scheduler=cosin", "did you mean `cosine`?"),
    ("train.report_to=tensorbord", "did you mean `tensorboard`?"),
    ("train.report_to=[wandb, tensorbord]", "did you mean `tensorboard`?"),
    ("model.llm.attn_implementation=flash_attn2", "did you mean `flash_attention_2`?"),
    ("data.format=xml", "`data.format` must be 'auto' | 'text' | 'alpaca'"),
    ("data.template=vicuna", "did you mean `vicuna_v1`?"),
    ("model.trainable.llm=loar", "did you mean `lora`?"),
    ("train.precision=bf15", "did you mean `bf16`?"),
])
def test_every_enum_like_key_is_checked_with_a_hint(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny/pretrain.yaml", [override], check_paths=False)
    assert message in str(err.value)


def test_report_to_and_attention_take_every_form_transformers_takes():
    cfg = load_config(REPO / "configs/tiny/pretrain.yaml", [
        "train.report_to=[wandb, mlflow]", "model.llm.attn_implementation=kernels-community/flash-attn"],
        check_paths=False)
    assert cfg.train.report_to == ["wandb", "mlflow"]
    assert cfg.model.llm.attn_implementation == "kernels-community/flash-attn"
    for value in ("none", "all", "tensorboard"):
        assert load_config(REPO / "configs/tiny/pretrain.yaml", [f"train.report_to={value}"],
                           check_paths=False).train.report_to == value


def test_scheduler_names_match_transformers():
    from transformers import SchedulerType

    from llava_kit.config import LR_SCHEDULERS

    assert list(LR_SCHEDULERS) == [s.value for s in SchedulerType]


def test_report_integrations_match_transformers():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from llava_kit.config import REPORT_INTEGRATIONS

    assert sorted(REPORT_INTEGRATIONS) == sorted(INTEGRATION_TO_CALLBACK)


def test_attention_names_are_known_to_transformers():
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from llava_kit.config import ATTN_IMPLEMENTATIONS, HUB_KERNEL

    assert set(ATTN_IMPLEMENTATIONS) - {"auto", "eager"} <= set(ALL_ATTENTION_FUNCTIONS.valid_keys())
    for name in ("kernels-community/flash-attn", "org/name@v1:fn", "flash_attention_2", "a/b/c"):
        assert bool(HUB_KERNEL.search(name)) == is_kernel(name)


def test_stage_modality_is_one_table():
    from llava_kit.config import MULTIMODAL_STAGES, STAGE_MODALITY, STAGES, TEXT_STAGES, config_from_dict

    assert STAGES == tuple(STAGE_MODALITY) and set(MULTIMODAL_STAGES) | set(TEXT_STAGES) == set(STAGES)
    text = config_from_dict({"stage": "text-pt", "output_dir": "x", "model": {"llm": {"name_or_path": "tiny:llm"}},
                             "data": {"path": "a.txt"}}, check_paths=False)
    assert text.modality == "text" and text.model.trainable.vision == "frozen"
    assert load_config(REPO / "configs/tiny/sft.yaml", check_paths=False).modality == "multimodal"


def test_data_formats_are_written_once():
    from llava_kit.cli import build_parser
    from llava_kit.config import CONVERSATION_FORMATS, DATA_FORMATS, STAGE_FORMATS, DataConfig
    from llava_kit.data.readers import READERS

    assert set(READERS) == set(CONVERSATION_FORMATS) and set(CONVERSATION_FORMATS) < set(DATA_FORMATS)
    assert all(set(formats) <= set(DATA_FORMATS) for formats in STAGE_FORMATS.values())
    assert DataConfig.model_fields["format"].annotation.__args__ == DATA_FORMATS
    check = build_parser()._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices["check"]
    assert next(a for a in check._actions if a.dest == "format").choices == DATA_FORMATS
