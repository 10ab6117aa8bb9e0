"""The lmms-eval hand-off, for real: lmms-eval scores `llava-kit serve` through its OpenAI backend and the hf-llava
export through `llava_hf`, on a tiny local task; it gets llava-kit's own answers and POPE numbers.

Runs only where lmms-eval is installed (nothing is installed at test time): in this interpreter, or in the one
$LMMS_EVAL_PYTHON names (docs/evaluation.md has the install commands, e.g. a separate virtualenv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_kit.eval import run_benchmark

pytestmark = pytest.mark.slow

IMAGES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small" / "images" / "eval"
QUESTIONS = (("circle", "yes"), ("star", "no"), ("square", "no"), ("triangle", "yes"))

TASK_YAML = """\
task: llava_kit_pope_tiny
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: label
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.aggregate_accuracy
    higher_is_better: true
  - metric: pope_f1
    aggregation: !function utils.aggregate_f1
    higher_is_better: true
"""

# The task's functions: LLaVA-1.5's POPE prompt and LLaVA's eval_pope.py reading, as llava-kit's pope benchmark has them.
TASK_UTILS = '''\
import os
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, "images", doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"].strip() + "\\nAnswer the question using a single word or phrase."


def parse(text):
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def process_results(doc, results):
    row = {"pred": parse(results[0].strip()), "label": doc["label"]}
    return {"pope_accuracy": row, "pope_f1": row}


def aggregate_accuracy(rows):
    return sum(r["pred"] == r["label"] for r in rows) / len(rows)


def aggregate_f1(rows):
    tp = sum(r["pred"] == "yes" and r["label"] == "yes" for r in rows)
    fp = sum(r["pred"] == "yes" and r["label"] == "no" for r in rows)
    fn = sum(r["pred"] == "no" and r["label"] == "yes" for r in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
'''


@pytest.fixture(scope="module")
def lmms_eval_python() -> str:
    """An interpreter that imports lmms_eval, or a skip (before any model is built)."""
    python = os.environ.get("LMMS_EVAL_PYTHON", sys.executable)
    found = subprocess.run([python, "-c", "import lmms_eval"], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"lmms-eval is not installed for {python} (set LMMS_EVAL_PYTHON to an interpreter that has it; "
                    "docs/evaluation.md shows the install)")
    return python


def write_task(folder: Path) -> Path:
    """A tiny POPE-style lmms-eval task reading a local JSON Lines file (also a file llava-kit's pope reads)."""
    (folder / "images").mkdir(parents=True)
    for n in range(len(QUESTIONS)):
        shutil.copy(IMAGES / f"{n:06d}.png", folder / "images")
    data = folder / "pope_tiny.jsonl"
    data.write_text("".join(json.dumps({"question_id": n, "image": f"{n:06d}.png", "label": label,
                                        "text": f"Is there a {shape} in the image?"}) + "\n"
                            for n, (shape, label) in enumerate(QUESTIONS)))
    (folder / "llava_kit_pope_tiny.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "utils.py").write_text(TASK_UTILS)
    return data


def run_lmms_eval(python: str, model: str, model_args: str, task: Path, out: Path) -> tuple[list[str], dict]:
    """(the responses lmms-eval logged, in question order, its metrics) of one run; fails on its logged errors."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "sk-placeholder"}
    result = subprocess.run([python, "-m", "lmms_eval", "eval", "--model", model, "--model_args", model_args,
                             "--tasks", "llava_kit_pope_tiny", "--include_path", str(task), "--batch_size", "1",
                             "--log_samples", "--output_path", str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    log = result.stdout + result.stderr
    # lmms-eval exits 0 even when an evaluation fails: its log says so
    assert result.returncode == 0 and "Error during evaluation" not in log, log[-3000:]
    [samples] = out.rglob("*_samples_llava_kit_pope_tiny.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    [results] = [p for p in out.rglob("*_results.json")]
    metrics = json.loads(results.read_text())["results"]["llava_kit_pope_tiny"]
    return [row["filtered_resps"] if isinstance(row["filtered_resps"], str) else row["filtered_resps"][0]
            for row in rows], metrics


def test_lmms_eval_scores_the_server_and_the_export_as_llava_kit_does(lmms_eval_python, eval_models, tmp_path):
    python = lmms_eval_python
    from llava_kit.inference import GenerationService
    from llava_kit.loader import open_model_dir
    from llava_kit.serve.server import ServerSettings, start_server

    data = write_task(tmp_path / "task")
    ours = run_benchmark("pope", data, data.parent / "images",
                         service=GenerationService.from_loaded(open_model_dir(eval_models["export"])),
                         max_new_tokens=6, progress=False)
    server = start_server(GenerationService.from_loaded(open_model_dir(eval_models["merged"])),
                          ServerSettings(model_name="tiny"), port=0)
    try:
        served, served_metrics = run_lmms_eval(
            python, "openai", f"model=tiny,base_url={server.url},api_key=sk-placeholder", data.parent,
            tmp_path / "openai")
    finally:
        server.shutdown()
        server.worker.stop()
    exported, exported_metrics = run_lmms_eval(
        python, "llava_hf", f"pretrained={eval_models['export']},device=cpu,device_map=cpu,dtype=float32",
        data.parent, tmp_path / "llava_hf")

    answers = [row["prediction"] for row in ours.rows]
    assert served == answers and exported == answers, (served, exported, answers)
    for metrics in (served_metrics, exported_metrics):
        assert metrics["pope_f1,none"] == pytest.approx(ours.scores.metrics["f1"])
        assert metrics["pope_accuracy,none"] == pytest.approx(ours.scores.metrics["accuracy"])
