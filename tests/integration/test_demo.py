"""`llava-kit demo`: quick mode end to end in the default run; the full demo (learning) is `slow`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llava_kit.demo.shapes import COLORS, QUESTIONS, SHAPES, ShapeSpec, draw_spec, random_spec, score_answer

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "llava_kit.cli", *args], capture_output=True, text=True, cwd=REPO,
                          **kwargs)


def test_quick_demo_runs_every_stage(tmp_path):
    result = run_cli("demo", "--workdir", str(tmp_path), "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("accuracy: ") and {"shape", "color", "describe"} <= {
        line.split(":")[0].strip() for line in lines[:-1]}
    for path in ("configs/pretrain.yaml", "configs/sft.yaml", "runs/pretrain/projector.safetensors",
                 "runs/sft/llm/model.safetensors", "merged/llava_kit.json", "eval_predictions.jsonl",
                 "demo_summary.json"):
        assert (tmp_path / path).exists(), path
    # the demo's configs are ordinary configs: `llava-kit train` accepts them as they are
    from llava_kit.config import load_config
    assert load_config(tmp_path / "configs" / "sft.yaml").model.init_from == str(tmp_path / "runs" / "pretrain")


def fresh_images(folder: Path, n: int, seed: int) -> list[tuple[Path, ShapeSpec]]:
    """New images drawn to the task's spec (sides 96-256 px, so other sizes and aspect ratios than the demo's)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        spec = random_spec(rng, SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)])
        path = folder / f"{i:03d}.png"
        draw_spec(rng, spec).save(path)
        out.append((path, spec))
    return out


@pytest.mark.slow
def test_demo_learns_shapes_and_colours(tmp_path):
    """The full demo: held-out accuracy >= 0.95 colour, >= 0.80 shape, also asked one by one via chat --prompt."""
    result = run_cli("demo", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    accuracy = summary["accuracy"]
    assert accuracy["color"] >= 0.95 and accuracy["shape"] >= 0.80, accuracy
    assert result.stdout.strip().splitlines()[-1] == f"accuracy: {accuracy['all']:.2f}"

    right = {"shape": 0, "color": 0}
    images = fresh_images(tmp_path / "fresh", 40, seed=7)
    for path, spec in images:
        for kind in right:
            answer = run_cli("chat", "--model", str(tmp_path / "merged"), "--image", str(path),
                             "--prompt", QUESTIONS[kind], "--max-new-tokens", "16")
            assert answer.returncode == 0, answer.stderr[-2000:]
            right[kind] += score_answer(kind, answer.stdout.strip(), spec)
    assert right["color"] / len(images) >= 0.95 and right["shape"] / len(images) >= 0.80, right


@pytest.mark.slow
@pytest.mark.parametrize("task", ["wide", "small"])
def test_the_resolution_demos_run_at_anyres(tmp_path, task):
    """`llava-kit demo --task wide|small --quick`: their canvases, AnyRes configs, the tower warmed up on the demo's
    own images (wide: 2:1 to 3:1 canvases; small: small equal-area shapes on 256-320 px canvases, at 4x4 tiles)."""
    result = run_cli("demo", "--workdir", str(tmp_path), "--quick", "--task", task)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("accuracy: ")
    from llava_kit.config import load_config

    sft = load_config(tmp_path / "configs" / "sft.yaml")
    assert sft.model.vision.image_strategy == "anyres" and sft.model.projector.name == "avgpool"
    assert (tmp_path / "warmup_data" / "pretrain.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "data" / "eval.jsonl").read_text().splitlines()]
    sides = [(min(r["width"], r["height"]), max(r["width"], r["height"])) for r in records]
    if task == "wide":
        assert all(long >= 1.98 * short for short, long in sides)
    else:
        assert sft.model.vision.grid_pinpoints == "anyres_max_16"
        assert all(256 <= short and long <= 320 for short, long in sides)
