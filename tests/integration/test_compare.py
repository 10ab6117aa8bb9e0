"""`llava-kit projectors` and `llava-kit compare-projectors` as a user runs them, on tiny models."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from llava_kit.cli import main

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "assets" / "shapes_small"


def test_projectors_lists_every_design_with_tokens_and_parameters(capsys):
    assert main(["projectors", "--vision-width", "1024", "--grid", "24", "--llm-width", "4096"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert len(rows) == 14 and rows["linear"][:2] == ["576", "4,198,400"]  # C*d + d
    assert rows["mlp2x_gelu"][:2] == ["576", "20,979,712"]  # LLaVA-1.5's ~21M
    assert " ".join(rows["linear"][2:]) == "per tile, 24x24 grid"  # how AnyRes views reach it
    assert rows["pixel_shuffle"][0] == rows["tokenpacker"][0] == "144" and rows["qformer"][0] == "32"
    assert "refused:" in " ".join(rows["identity"])  # 1024 != 4096


def test_projectors_on_siglip_grid_with_cls_refuses_clearly(capsys):
    assert main(["projectors", "--grid", "27x27", "--vision-width", "1152", "--llm-width", "896", "--has-cls"]) == 0
    out = capsys.readouterr().out
    assert "pixel_shuffle" in out and "a CLS token has no place on it" in out
    assert next(line for line in out.splitlines() if line.startswith("resampler")).split()[1] == "256"


def test_projectors_bad_grid_is_a_one_line_error(capsys):
    assert main(["projectors", "--grid", "24y"]) == 2
    assert "--grid must be a side (24) or ROWSxCOLS (27x27), got '24y'" in capsys.readouterr().err


def _compare_config(tiny_dirs, tmp_path) -> Path:
    """Two projectors, a few steps each, on the small shapes sample (no `shapes` preparation: explicit paths)."""
    model = {"vision": {"name_or_path": str(tiny_dirs["vision"])}, "llm": {"name_or_path": str(tiny_dirs["llm"])}}
    train = {"micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100,
             "report_to": "none", "use_cpu": True}
    data = {"image_root": str(SHAPES / "images"), "max_seq_len": 256}
    pretrain = {"model": model, "train": train, "data": {**data, "path": str(SHAPES / "pretrain.json")}}
    sft = {"model": {**model, "trainable": {"llm": "full"}}, "train": train,
           "data": {**data, "path": str(SHAPES / "sft.json"), "template": "chatml"}}
    config = {"output_dir": str(tmp_path / "compare"), "projectors": ["linear", "resampler"],
              "projector_options": {"resampler": {"num_queries": 4}}, "pretrain": pretrain, "sft": sft,
              "eval": {"data": str(SHAPES / "eval.jsonl"), "image_root": str(SHAPES / "images"), "limit": 6,
                       "max_new_tokens": 4}}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_projectors_writes_table_csv_and_plot(tiny_dirs, tmp_path, capsys):
    config = _compare_config(tiny_dirs, tmp_path)
    report = tmp_path / "docs" / "comparison.md"
    assert main(["compare-projectors", str(config), "--projectors", "resampler,avgpool", "--report",
                 str(report)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["projector", "params", "tokens"] and f"report: {report}" in out
    with report.with_suffix(".csv").open() as f:
        rows = {row["projector"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"resampler", "avgpool"}  # --projectors replaces the config's list
    assert rows["resampler"]["visual_tokens"] == "4" and rows["avgpool"]["visual_tokens"] == "16"  # 8x8 -> 4x4
    for row in rows.values():
        assert int(row["parameters"]) > 0 and float(row["step_time_ms"]) > 0 and float(row["memory_mib"]) > 0
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["final_loss"]) > 0
    text = report.read_text()
    assert "| projector | parameters | visual tokens |" in text and "per visual token" in text
    assert report.with_suffix(".png").stat().st_size > 1000
    for name in ("resampler", "avgpool"):  # the same recipe: pretrain, then sft from its projector
        run = tmp_path / "compare" / "runs" / name
        assert (run / "pretrain" / "projector.safetensors").is_file()
        sft = yaml.safe_load((run / "sft" / "config.yaml").read_text())
        assert sft["model"]["init_from"] == str(run / "pretrain") and sft["train"]["max_steps"] == 2


def test_compare_projectors_errors_before_training(tiny_dirs, tmp_path, capsys):
    config = _compare_config(tiny_dirs, tmp_path)
    assert main(["compare-projectors", str(config), "--projectors", "linear,resampller"]) == 2
    assert "unknown projector 'resampller'" in capsys.readouterr().err
    assert not (tmp_path / "compare" / "runs").exists()
    data = yaml.safe_load(config.read_text())
    data["projector_options"] = {"resampler": {"num_queries": 5}}
    config.write_text(yaml.safe_dump(data))
    assert main(["compare-projectors", str(config), "--projectors", "linear,resampler"]) == 2
    err = capsys.readouterr().err
    assert "num_queries=5 must be a square number" in err
    assert not (tmp_path / "compare" / "runs" / "linear" / "sft").exists()  # checked before the first run
    data["shapes"] = {"n_trian": 3}
    config.write_text(yaml.safe_dump(data))
    assert main(["compare-projectors", str(config)]) == 2
    assert "`shapes` has unknown key(s) n_trian" in capsys.readouterr().err


def test_shipped_comparison_config_is_valid(tmp_path):
    """Every projector of configs/tiny/compare_projectors.yaml builds on the demo's tiny tower and LLM widths."""
    from llava_kit.compare import load_compare_config, projector_run_configs
    from llava_kit.demo.pipeline import DemoRecipe
    from llava_kit.model.projectors import build_projector

    compare = load_compare_config(REPO / "configs/tiny/compare_projectors.yaml")
    recipe = DemoRecipe(**compare.shapes)
    side = recipe.vision.image_size // recipe.vision.patch_size
    for name in compare.projectors:
        options = compare.projector_options.get(name, {})
        projector = build_projector(name, recipe.vision.hidden_size, recipe.llm.hidden_size, (side, side), **options)
        assert projector.num_output_tokens <= side * side
        pretrain = {"model": {"vision": {"name_or_path": "v"}, "llm": {"name_or_path": "l"}},
                    "data": {"path": "p.json", "image_root": "images"}}
        projector_run_configs(pretrain, pretrain, name, options, tmp_path, check_paths=False)


def test_compare_projectors_runs_each_projector_per_image_strategy(tiny_dirs, tmp_path):
    from llava_kit.compare import compare_projectors

    config = _compare_config(tiny_dirs, tmp_path)
    data = yaml.safe_load(config.read_text())
    data["strategies"] = {"fixed": {}, "anyres": {"model": {"vision": {"image_strategy": "anyres",
                                                                         "grid_pinpoints": "anyres_max_3"}},
                                                  "data": {"max_seq_len": 512}}}
    config.write_text(yaml.safe_dump(data))
    results, report = compare_projectors(config, ["avgpool"], tmp_path / "anyres.md")
    by_strategy = {r.strategy: r for r in results}
    assert set(by_strategy) == {"fixed", "anyres"}
    assert by_strategy["fixed"].visual_tokens == 16 and by_strategy["anyres"].visual_tokens > 16 + 2 * 5
    text = report.read_text()
    assert "| projector | image strategy | parameters | visual tokens per image |" in text
    assert "| avgpool | anyres |" in text and "| avgpool | fixed |" in text
    sft = yaml.safe_load((tmp_path / "compare" / "runs" / "anyres" / "avgpool" / "sft" / "config.yaml").read_text())
    assert sft["model"]["vision"]["image_strategy"] == "anyres" and sft["data"]["max_seq_len"] == 512


def test_shipped_anyres_comparison_config_is_valid():
    from llava_kit.compare import load_compare_config

    compare = load_compare_config(REPO / "configs/tiny/compare_anyres.yaml")
    assert set(compare.strategies) == {"fixed", "anyres"} and compare.shapes["aspect"] == [2.0, 3.0]
