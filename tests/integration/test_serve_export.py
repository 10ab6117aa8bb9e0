"""A trained tiny model, served (OpenAI client, streamed and not, concurrent, bad requests) and exported."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from PIL import Image

from llava_kit.cli import main

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "assets" / "shapes_small"
QUESTION = "What shape is in the image?"
MAX_TOKENS = 12
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def merged(tiny_dirs, tmp_path_factory):
    """An sft run (LoRA, 2 steps) on the tiny models, merged."""
    from llava_kit.config import config_from_dict
    from llava_kit.export.merge import merge_run
    from llava_kit.train.engine import train
    from tests.integration.conftest import tiny_config

    root = tmp_path_factory.mktemp("served")
    cfg = config_from_dict(tiny_config(tiny_dirs, root / "sft", "sft", **{"train.max_steps": 1, "train.learning_rate": 1e-6}))
    return merge_run(train(cfg), root / "merged")


@pytest.fixture(scope="module")
def server(merged):
    from llava_kit.inference import GenerationService
    from llava_kit.serve.server import ServerSettings, start_server
    from tests.support import open_for_chat

    model, tokenizer, settings = open_for_chat(merged)
    server = start_server(GenerationService(model, tokenizer, settings),
                          ServerSettings(model_name="shapes", api_key=KEY, max_body_mb=0.3), port=0)
    yield server
    server.shutdown()
    server.worker.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def images() -> list[Path]:
    return sorted((SHAPES / "images" / "eval").glob("*.png"))[:4]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(client, image: Path, question: str = QUESTION, **kwargs):
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return client.chat.completions.create(model="shapes", messages=[{"role": "user", "content": content}],
                                          max_tokens=MAX_TOKENS, **kwargs)


def chat_answer(model_dir, image, capsys) -> str:
    capsys.readouterr()
    assert main(["chat", "--model", str(model_dir), "--image", str(image), "--prompt", QUESTION,
                 "--max-new-tokens", str(MAX_TOKENS)]) == 0
    return capsys.readouterr().out.strip()


def test_served_answers_equal_chat_prompt_streamed_or_not(merged, client, capsys):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["shapes"]
    for image in images()[:2]:
        expected = chat_answer(merged, image, capsys)
        reply = ask(client, image)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 64
        pieces = [chunk.choices[0].delta.content or "" for chunk in ask(client, image, stream=True)
                  if chunk.choices]
        assert "".join(pieces).strip() == expected


def test_concurrent_requests_are_batched_with_the_same_answers(server, client):
    expected = {image: ask(client, image).choices[0].message.content for image in images()}
    got, threads = {}, []
    for image in images():
        threads.append(threading.Thread(target=lambda im=image: got.__setitem__(im, ask(client, im))))
    before = len(server.worker.batch_sizes)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {im: r.choices[0].message.content for im, r in got.items()} == expected
    assert sum(server.worker.batch_sizes[before:]) == len(images())


def _raw(server, method, path, body: bytes = b"", headers=None):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    return response.status, data


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, tmp_path):
    image = images()[0]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="shapes", messages=[])
    bad_url = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]
    with pytest.raises(openai.BadRequestError, match="malformed data URL"):
        client.chat.completions.create(model="shapes", messages=bad_url)
    not_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]
    with pytest.raises(openai.BadRequestError, match="cannot read image"):
        client.chat.completions.create(model="shapes", messages=not_image)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
        client.chat.completions.create(model="shapes", messages=remote)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        ask(client, image, response_format={"type": "json_object"})
    wrong_key = openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()

    big = Image.effect_noise((400, 400), 100).convert("RGB")
    big.save(tmp_path / "big.png")
    body = json.dumps({"model": "shapes", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(tmp_path / "big.png")}}]}]}).encode()
    status, data = _raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 413 and "over this server's limit" in data["error"]["message"]
    status, data = _raw(server, "POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and data["error"]["type"] == "invalid_request_error"
    status, data = _raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in data

    assert ask(client, image).choices[0].message.content is not None  # still serving


def test_export_loads_without_llava_kit_and_answers_like_chat(merged, tmp_path, capsys):
    square = tmp_path / "square.png"
    Image.open(images()[1]).convert("RGB").resize((96, 96)).save(square)  # no padding: see docs/serving.md
    expected = chat_answer(merged, square, capsys)
    assert main(["export", str(merged), "--format", "hf-llava", "-o", str(tmp_path / "hf")]) == 0
    code = f"""
import sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained({str(tmp_path / 'hf')!r})
processor = AutoProcessor.from_pretrained({str(tmp_path / 'hf')!r})
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTION!r}}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open({str(square)!r})], text=prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**inputs, max_new_tokens={MAX_TOKENS}, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
assert "llava_kit" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_caption_runs_against_the_server(server, tmp_path, monkeypatch, capsys):
    """Plumbing only (the tiny model's words mean nothing): every image ends in the dataset or the errors file,
    and the structured-output negotiation falls back to text on this server's 400s."""
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images()[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "captions.jsonl"
    code = main(["caption", str(folder), "-o", str(out), "--model", "shapes", "--base-url", server.url,
                 "--max-tokens", str(MAX_TOKENS), "--no-progress", "--max-retries", "0", "--validation-retries", "0"])
    assert code in (0, 1), capsys.readouterr().err[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    errors_file = tmp_path / "captions.errors.jsonl"
    errors = [json.loads(line) for line in errors_file.read_text().splitlines()] if errors_file.exists() else []
    assert len(records) + len(errors) == 3
    assert all(e["reason"] not in ("connection_error", "server_error", "http_400") for e in errors), errors


def test_serve_command_answers_and_stops(merged, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "llava_kit.cli", "serve", "--model", str(merged), "--port",
                                str(port), "--model-name", "shapes"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["shapes"]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
        messages = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "again"}]
        with pytest.raises(openai.BadRequestError, match="turn 2 is from 'user'"):
            client.chat.completions.create(model="x", messages=messages)
        assert ask(client, images()[0]).choices[0].message.content is not None
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_too_many_images_are_refused(server, client):
    part = {"type": "image_url", "image_url": {"url": data_url(images()[0])}}
    messages = [{"role": "user", "content": [part] * (server.settings.max_images + 1)}]
    with pytest.raises(openai.BadRequestError, match="more than 8 images in one request"):
        client.chat.completions.create(model="shapes", messages=messages)
