"""`llava-kit caption` against `llava-kit serve`: the demo's shapes model captions fresh images (slow: trains it),
and answers concurrent and streamed requests exactly as `llava-kit chat --prompt` does.

Set LLAVA_KIT_DEMO_MODEL=DIR (a demo's WORKDIR/merged) to reuse a trained model instead of training one (the
`demo_model` fixture, tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from llava_kit.cli import main
from llava_kit.demo.shapes import COLORS, SHAPES, draw_spec, random_spec, score_answer

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-caption-test"


def caption_fresh_shapes(model_dir: Path, workdir: Path, n: int = 48, seed: int = 7) -> dict:
    """Serve `model_dir`, caption `n` fresh shapes images through `llava-kit caption`; returns the scores."""
    from llava_kit.inference import GenerationService
    from llava_kit.serve.server import ServerSettings, start_server
    from tests.support import open_for_chat

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
    model, tokenizer, settings = open_for_chat(model_dir)
    server = start_server(GenerationService(model, tokenizer, settings), ServerSettings(model_name="shapes", api_key=KEY), port=0)
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
def test_served_demo_model_captions_fresh_shapes(demo_model, tmp_path):
    report = caption_fresh_shapes(demo_model, tmp_path / "caption")
    print(json.dumps(report, indent=1, default=str))
    assert report["exit_code"] == 0 and report["captioned"] == report["n"], report
    assert report["accuracy"]["shape"] >= 0.8 and report["accuracy"]["color"] >= 0.8, report


@pytest.mark.slow
def test_served_demo_model_answers_like_chat_concurrently_and_streamed(demo_model):
    """30 held-out questions sent at once (batched by the server) and 10 streamed = `chat --prompt`'s answers."""
    import base64
    import threading

    import openai

    from llava_kit.inference import ChatSession, GenerationService, SamplingParams, answer_once
    from llava_kit.serve.server import ServerSettings, start_server
    from tests.support import open_for_chat

    model, tokenizer, settings = open_for_chat(demo_model)
    session = ChatSession(model, tokenizer, settings, SamplingParams(max_new_tokens=32))
    questions = ["What shape is in the image?", "What color is the shape?", "Describe the image."]
    images = sorted((demo_model.parent / "data" / "images" / "eval").glob("*.png"))[:30]
    jobs = [(image, questions[i % 3]) for i, image in enumerate(images)]
    expected = [answer_once(session, str(image), question) for image, question in jobs]
    server = start_server(GenerationService(model, tokenizer, settings), ServerSettings(model_name="shapes"), port=0)
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)

    def ask(image, question, **kwargs):
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
        return client.chat.completions.create(model="shapes", max_tokens=32,
                                              messages=[{"role": "user", "content": content}], **kwargs)

    try:
        got = [None] * len(jobs)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(*jobs[i]).choices[0].message.content))
                   for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        streamed = ["".join(chunk.choices[0].delta.content or "" for chunk in ask(*job, stream=True)
                            if chunk.choices).strip() for job in jobs[:10]]
    finally:
        server.shutdown()
        server.worker.stop()
    assert got == expected
    assert streamed == expected[:10]
    assert max(server.worker.batch_sizes) > 1  # concurrent requests were batched


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
