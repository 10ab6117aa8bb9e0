"""`llava-kit caption` against `llava-kit serve`: the demo's shapes model captions fresh images (slow: trains it).

Set LLAVA_KIT_DEMO_MODEL=DIR (a demo's WORKDIR/merged) to reuse a trained model instead of training one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llava_kit.cli import main
from llava_kit.data.shapes import COLORS, SHAPES, draw_spec, random_spec, score_answer

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-caption-test"


def caption_fresh_shapes(model_dir: Path, workdir: Path, n: int = 48, seed: int = 7) -> dict:
    """Serve `model_dir`, caption `n` fresh shapes images through `llava-kit caption`; returns the scores."""
    from llava_kit.export.merge import load_for_inference
    from llava_kit.serve.chat import ChatSession
    from llava_kit.serve.server import ServerSettings, start_server

    rng = random.Random(seed)
    folder = workdir / "fresh"
    folder.mkdir(parents=True)
    specs = {}
    for i in range(n):  # every shape x colour combination, sides 96-256 px (the demo trained on others)
        spec = random_spec(rng, SHAPES[i % len(SHAPES)], list(COLORS)[(i // len(SHAPES)) % len(COLORS)])
        draw_spec(rng, spec).save(folder / f"{i:03d}.png")
        specs[f"{i:03d}.png"] = spec
    prompt = workdir / "prompt.txt"
    prompt.write_text("Describe the image.")
    model, tokenizer, settings = load_for_inference(model_dir)
    server = start_server(ChatSession(model, tokenizer, settings), ServerSettings("shapes", api_key=KEY), port=0)
    out = workdir / "captions.jsonl"
    try:
        os.environ["OPENAI_API_KEY"] = KEY
        code = main(["caption", str(folder), "-o", str(out), "--model", "shapes", "--base-url", server.url,
                     "--prompt-file", str(prompt), "--raw-prompt", "--max-tokens", "24",
                     "--no-progress", "--concurrency", "8"])
    finally:
        server.shutdown()
        server.worker.stop()
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    captions = {r["image"]: r["conversations"][1]["value"] for r in records}
    scores = {kind: sum(score_answer(kind, captions.get(name, ""), spec) for name, spec in specs.items()) / n
              for kind in ("shape", "color", "describe")}
    return {"exit_code": code, "captioned": len(records), "n": n, "accuracy": scores,
            "batches": server.worker.batch_sizes, "examples": list(captions.items())[:4]}


@pytest.mark.slow
def test_served_demo_model_captions_fresh_shapes(tmp_path):
    model_dir = os.environ.get("LLAVA_KIT_DEMO_MODEL")
    if not model_dir:
        result = subprocess.run([sys.executable, "-m", "llava_kit.cli", "demo", "--workdir", str(tmp_path / "demo")],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        model_dir = tmp_path / "demo" / "merged"
    report = caption_fresh_shapes(Path(model_dir), tmp_path / "caption")
    print(json.dumps(report, indent=1, default=str))
    assert report["exit_code"] == 0 and report["captioned"] == report["n"], report
    assert report["accuracy"]["shape"] >= 0.8 and report["accuracy"]["color"] >= 0.8, report


def test_raw_prompt_sends_the_prompt_file_alone(tmp_path):
    from data_gen.prompts import PromptFileError, get_task

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe the image.\n")
    raw, wrapped = get_task("caption", prompt, raw=True), get_task("caption", prompt)
    assert raw.prompt_text() == "Describe the image."
    assert wrapped.prompt_text().startswith("Describe the image.\n\n") and "JSON" in wrapped.prompt_text()
    assert raw.label != wrapped.label  # kept apart in the output ids
    with pytest.raises(PromptFileError, match="--prompt-file"):
        get_task("caption", None, raw=True)
    assert main(["caption", str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--raw-prompt"]) == 2
