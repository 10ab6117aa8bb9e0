"""chat, eval and the server answer through the one generation service, with the same tokens."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest

from llava_kit.config import ModelConfig
from llava_kit.eval import evaluate
from llava_kit.inference import ChatSession, GenerationService, SamplingParams, answer_once
from llava_kit.model.build import build_llava
from llava_kit.serve.server import ServerSettings, start_server
from llava_kit.store.specs import InferenceSettings

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
IMAGE = SHAPES / "images" / "eval" / "000000.png"
QUESTION = "What shape is in the image?"


@pytest.fixture
def calls(monkeypatch):
    """Every GenerationService.generate call: the answers each returned."""
    seen: list[list[str]] = []
    original = GenerationService.generate

    def spy(self, requests):
        completions = original(self, requests)
        seen.append([c.text for c in completions])
        return completions

    monkeypatch.setattr(GenerationService, "generate", spy)
    return seen


def test_chat_eval_and_server_give_the_same_answer_through_the_service(tiny_dirs, calls, tmp_path):
    cfg = ModelConfig()
    cfg.vision.name_or_path, cfg.llm.name_or_path = str(tiny_dirs["vision"]), str(tiny_dirs["llm"])
    model, tokenizer = build_llava(cfg)
    settings = InferenceSettings("chatml", None, "pad", 2048)
    service = GenerationService(model.eval(), tokenizer, settings)

    chat = answer_once(ChatSession(model, tokenizer, settings, SamplingParams(max_new_tokens=8)), str(IMAGE), QUESTION)
    predictions = tmp_path / "predictions.jsonl"
    evaluate(service, [{"image": IMAGE.name, "question": QUESTION, "answer": "x"}], IMAGE.parent, max_new_tokens=8,
             predictions_path=predictions)
    from_eval = json.loads(predictions.read_text())["prediction"]

    server = start_server(service, ServerSettings(model_name="tiny"), port=0)
    try:
        url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
        body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}
        request = urllib.request.Request(f"{server.url}/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            from_server = json.loads(response.read())["choices"][0]["message"]["content"]
    finally:
        server.shutdown()
        server.worker.stop()

    assert chat == from_eval == from_server
    assert calls == [[chat], [chat], [chat]]  # each front-end made exactly one call to the service


def test_a_nan_temperature_is_a_400_naming_the_parameter(tiny_dirs):
    cfg = ModelConfig()
    cfg.vision.name_or_path, cfg.llm.name_or_path = str(tiny_dirs["vision"]), str(tiny_dirs["llm"])
    model, tokenizer = build_llava(cfg)
    server = start_server(GenerationService(model.eval(), tokenizer, InferenceSettings("chatml", None, "pad", 2048)),
                          ServerSettings(model_name="tiny"), port=0)
    try:
        for field, value in (("temperature", "NaN"), ("top_p", "5"), ("max_tokens", "0")):
            # raw JSON: json.dumps would not write NaN the way clients send it
            body = ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "' + field + '": ' + value
                    + "}").encode()
            request = urllib.request.Request(f"{server.url}/chat/completions", body,
                                             {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=30)
            assert err.value.code == 400
            error = json.loads(err.value.read())["error"]
            assert error["param"] == field and field in error["message"], error
    finally:
        server.shutdown()
        server.worker.stop()
