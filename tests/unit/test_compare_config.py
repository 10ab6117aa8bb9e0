"""The comparison config (`llava-kit compare-projectors`): a schema model checked, every problem at once, at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_kit.compare import CompareConfig, EvalSettings, load_compare_config, stage_configs
from llava_kit.errors import ConfigError, PathNotFoundError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs/tiny/compare_projectors.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_comparison_config_loads_typed():
    compare = load_compare_config(SHIPPED)
    assert isinstance(compare, CompareConfig) and compare.eval == EvalSettings(max_new_tokens=24)
    assert compare.shapes == {"n_train": 3000, "n_eval": 60, "seed": 0} and len(compare.projectors) == 14
    assert compare.pretrain == {"train": {"max_steps": 20, "micro_batch_size": 32, "learning_rate": 2e-3,
                                          "logging_steps": 5}}  # a stage section stays a dict until merged


def test_every_problem_is_reported_with_the_nearest_key(tmp_path):
    data = yaml.safe_load(SHIPPED.read_text())
    data.update(output_dir="", outptu="x", projector_options={"resampler": 16})
    data["eval"] = {"lmit": 3, "max_new_tokens": 0}
    data["shapes"]["n_trian"] = 3
    data["pretrain"]["train"]["max_stpes"] = 3
    data["sft"]["train"]["lr_scheduler"] = "cosin"
    with pytest.raises(ConfigError) as err:
        load_compare_config(_write(tmp_path, data))
    text = str(err.value)
    assert "8 problem(s)" in text
    assert "unknown key `outptu`; did you mean `output_dir`?" in text
    assert "unknown key `eval.lmit`; did you mean `eval.limit`?" in text
    assert "`eval.max_new_tokens` must be at least 1, got 0" in text
    assert "`projector_options` must be a mapping of mappings" in text
    assert "`shapes` has unknown key(s) n_trian; did you mean `n_train`?" in text
    assert "unknown key `pretrain.train.max_stpes`; did you mean `pretrain.train.max_steps`?" in text
    assert "`sft.train.lr_scheduler` must be" in text and "did you mean `cosine`?" in text
    assert "`output_dir` is empty" in text


def test_duplicate_keys_and_missing_files(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("output_dir: a\nprojectors: [linear]\noutput_dir: b\n")
    with pytest.raises(ConfigError, match="duplicate key `output_dir` at line 3"):
        load_compare_config(path)
    with pytest.raises(PathNotFoundError, match="does not exist"):
        load_compare_config(tmp_path / "nope.yaml")


def test_eval_settings_are_filled_in_by_the_prepared_task_unless_given(tmp_path):
    prepared = {"configs": {}, "eval": tmp_path / "eval.jsonl", "images": tmp_path / "images"}
    for name in ("pretrain", "sft"):
        prepared["configs"][name] = tmp_path / f"{name}.yaml"
        prepared["configs"][name].write_text(f"stage: {name}\ntrain:\n  max_steps: 5\n  use_cpu: true\n")
    compare = CompareConfig(output_dir="x", sft={"train": {"max_steps": 7}}, eval=EvalSettings(limit=3))
    pretrain, sft, evaluation = stage_configs(compare, prepared)
    assert pretrain["train"] == {"max_steps": 5, "use_cpu": True} and sft["train"]["max_steps"] == 7
    assert evaluation == EvalSettings(data=str(tmp_path / "eval.jsonl"), image_root=str(tmp_path / "images"), limit=3)
    with pytest.raises(ConfigError, match="`eval.data` is empty"):
        stage_configs(CompareConfig(output_dir="x"), None)


def test_eval_benchmark_is_checked_and_any_benchmark_can_score(tmp_path):
    data = {"output_dir": "x", "eval": {"benchmark": "mmbenhc", "data": "MMBench_DEV_EN.tsv"}}
    with pytest.raises(ConfigError, match="`eval.benchmark` must be .*'mmbench'.*got 'mmbenhc'"):
        load_compare_config(_write(tmp_path, data))
    data["eval"]["benchmark"] = "mmbench"
    compare = load_compare_config(_write(tmp_path, data))
    # a benchmark whose file holds its images needs no image root (the custom JSONL does)
    assert stage_configs(compare, None)[2] == EvalSettings(benchmark="mmbench", data="MMBench_DEV_EN.tsv")


def test_the_report_names_the_benchmarks_headline_metric(tmp_path):
    import csv

    from llava_kit.compare import ProjectorResult
    from llava_kit.compare.report import write_report

    results = [ProjectorResult("linear", 10, 16, 5.0, 1.0, 2.0, 0.75, {"adversarial": 0.5}, metric="f1"),
               ProjectorResult("avgpool", 20, 4, 5.0, 1.0, 2.0, 0.25, {"adversarial": 0.0}, metric="f1")]
    report = tmp_path / "comparison.md"
    write_report(results, report, "compare.yaml", False, {"seconds": 60.0}, {"pretrain": "2 steps", "sft": "2 steps",
                                                                             "eval": 3, "benchmark": "pope"})
    text = report.read_text()
    assert "| final loss | held-out f1 | adversarial |" in text and "Highest held-out f1: **linear** (0.75)" in text
    assert "3 held-out questions of benchmark `pope`" in text
    with report.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["accuracy"] == "0.750" and rows[0]["metric"] == "f1" and rows[0]["accuracy_adversarial"] == "0.500"
