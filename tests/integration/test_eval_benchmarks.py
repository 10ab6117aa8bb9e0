"""`llava-kit eval --benchmark`: one model scored through a run directory, its merge, its export and the server gives
the same answers and numbers; errors are reported per item; the custom JSONL keeps its output."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest

from llava_kit.cli import main
from llava_kit.eval import run_benchmark

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
IMAGES = SHAPES / "images" / "eval"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A POPE file (LLaVA's layout) and an MMBench TSV (base64 images) on the shapes images."""
    root = tmp_path_factory.mktemp("bench")
    pope = root / "coco_pope_random.json"
    questions = (("circle", "yes"), ("star", "no"), ("square", "no"), ("triangle", "yes"))
    pope.write_text("".join(json.dumps({"question_id": n, "image": f"{n:06d}.png", "label": label,
                                        "text": f"Is there a {shape} in the image?"}) + "\n"
                            for n, (shape, label) in enumerate(questions)))
    tsv = root / "mmbench_dev.tsv"
    with tsv.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        for n, answer in enumerate(("A", "C")):
            image = base64.b64encode((IMAGES / f"{n:06d}.png").read_bytes()).decode()
            writer.writerow([n, "What shape is in the image?", "nan", "circle", "square", "star", "", answer,
                             "shape", image])
    return {"pope": pope, "mmbench": tsv}


def eval_cli(capsys, *args) -> list[str]:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("benchmark", ["pope", "mmbench"])
def test_run_dir_merged_export_and_server_give_the_same_numbers(eval_models, files, benchmark, capsys, tmp_path):
    from llava_kit.inference import GenerationService
    from llava_kit.loader import open_model_dir
    from llava_kit.serve.server import ServerSettings, start_server

    common = ["--benchmark", benchmark, "--data", str(files[benchmark]), "--image-root", str(IMAGES),
              "--max-new-tokens", "6"]
    summaries, predictions = {}, {}
    for route, directory in eval_models.items():
        out = tmp_path / f"{route}.jsonl"
        summaries[route] = eval_cli(capsys, "--model", str(directory), *common, "--predictions", str(out))
        predictions[route] = [json.loads(line) for line in out.read_text().splitlines()]
    server = start_server(GenerationService.from_loaded(open_model_dir(eval_models["merged"])),
                          ServerSettings(model_name="tiny"), port=0)
    try:
        out = tmp_path / "server.jsonl"
        summaries["server"] = eval_cli(capsys, "--base-url", server.url, "--api-key", "sk-placeholder", *common,
                                       "--predictions", str(out), "--concurrency", "3")
        predictions["server"] = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        server.shutdown()
        server.worker.stop()

    n = 4 if benchmark == "pope" else 6  # MMBench: two questions of three options, each asked three times
    assert all(len(rows) == n for rows in predictions.values())
    answers = {route: [row["prediction"] for row in rows] for route, rows in predictions.items()}
    assert answers["run"] == answers["merged"] == answers["export"] == answers["server"], answers
    assert len(set(answers["run"])) > 1, answers  # the model's answers depend on what it is asked and shown
    assert summaries["run"] == summaries["merged"] == summaries["export"] == summaries["server"]
    headline = "f1" if benchmark == "pope" else "circular_accuracy"
    assert summaries["run"][-1].startswith(f"{headline}: ")
    assert all("error" not in row for rows in predictions.values() for row in rows)


def test_an_endpoint_that_fails_gives_an_error_per_item_never_a_dropped_one(files):
    result = run_benchmark("pope", files["pope"], IMAGES, base_url="http://127.0.0.1:9/v1", model_name="none",
                           api_key="sk-placeholder", progress=False)
    assert result.errors == 4 and len(result.rows) == 4
    assert all(row["error"].startswith("APIConnectionError") and row["prediction"] == "" for row in result.rows)
    # unanswered items count as answered "" (read as yes): scored, not dropped
    assert result.scores.metrics["yes_ratio"] == 1.0 and result.scores.metrics["accuracy"] == 0.5


def test_custom_jsonl_keeps_its_output_through_any_model_directory(eval_models, capsys, tmp_path):
    out = tmp_path / "predictions.jsonl"
    lines = eval_cli(capsys, "--model", str(eval_models["run"]), "--data", str(SHAPES / "eval.jsonl"), "--image-root",
                     str(SHAPES / "images"), "--limit", "6", "--max-new-tokens", "4", "--predictions", str(out))
    assert lines[-1].startswith("accuracy: ") and len(lines[-1]) == len("accuracy: 0.00")
    assert {line.split(":")[0].strip() for line in lines[:-1]} <= {"shape", "color", "describe"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {"question", "prediction", "correct", "kind"} <= set(rows[0])


def test_eval_needs_a_model_or_an_endpoint(files, capsys):
    assert main(["eval", "--benchmark", "pope", "--data", str(files["pope"])]) == 2
    assert "give the model to score: --model DIR" in capsys.readouterr().err
    assert main(["eval", "--model", str(files["pope"].parent), "--benchmark", "pope", "--data", str(files["pope"]),
                 "--scorer", "exact"]) == 2
    assert "--scorer applies to the custom JSONL" in capsys.readouterr().err
