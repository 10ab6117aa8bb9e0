"""The generation service: sampling checks, batching, stop strings, streaming, cancellation, limits."""

from __future__ import annotations

import math

import pytest
import torch

from llava_kit.config import ModelConfig
from llava_kit.errors import UsageError
from llava_kit.inference import (
    GenerationRequest,
    GenerationService,
    PromptTooLongError,
    SamplingError,
    SamplingParams,
)
from llava_kit.model.build import build_llava, load_llm, load_tokenizer
from llava_kit.store.specs import InferenceSettings

CHATML = InferenceSettings("chatml", None, "pad", 2048)


@pytest.fixture(scope="module")
def service(tiny_dirs):
    cfg = ModelConfig()
    cfg.vision.name_or_path = str(tiny_dirs["vision"])
    cfg.llm.name_or_path = str(tiny_dirs["llm"])
    torch.manual_seed(0)
    model, tokenizer = build_llava(cfg)
    with torch.no_grad():  # wider weights than the 0.02 init: varied greedy answers
        generator = torch.Generator().manual_seed(0)
        for p in model.language_model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return GenerationService(model.eval(), tokenizer, CHATML)


@pytest.fixture
def endless(service, monkeypatch):
    """The service with no stop tokens: every answer runs to its token budget."""
    monkeypatch.setattr(service, "stop_ids", [])
    return service


def image(seed: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40 + 8 * seed, 56, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def prompt(service, text: str, seed: int | None = None):
    if seed is None:
        return service.prepare([{"role": "user", "content": text}])
    return service.prepare([{"role": "user", "content": f"<image>\n{text}"}], [image(seed)])


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"temperature": -1}, "temperature must be a finite number >= 0"),
    ({"temperature": "hot"}, "temperature must be a finite number >= 0"),
    ({"top_p": 5}, r"top_p must be a number in \[0, 1\]"),
    ({"top_p": math.inf}, r"top_p must be a number in \[0, 1\]"),
    ({"max_new_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_new_tokens": 1.5}, "max_tokens must be an integer >= 1"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop must be a non-empty string or a list of at most 4"),
    ({"stop": [""]}, "stop must be a non-empty string"),
])
def test_bad_sampling_values_are_one_clear_user_error(kwargs, message):
    with pytest.raises(SamplingError, match=message) as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, UsageError) and err.value.param in ("temperature", "top_p", "max_tokens", "seed", "stop")
    assert SamplingParams(top_p=0).top_p == 0 and SamplingParams(stop="###").stop == ("###",)


def test_a_greedy_batch_gives_each_request_its_answer_alone(service):
    requests = [GenerationRequest(prompt(service, "What shape is in the image?", 1), SamplingParams(max_new_tokens=9)),
                GenerationRequest(prompt(service, "Describe the image.", 2), SamplingParams(max_new_tokens=4)),
                GenerationRequest(prompt(service, "Who are you?"), SamplingParams(max_new_tokens=12))]
    together = service.generate(requests)
    alone = [service.generate([r])[0] for r in requests]
    assert together == alone
    assert all(c.completion_tokens <= r.params.max_new_tokens for c, r in zip(together, requests, strict=True))


def test_budgets_stop_strings_and_the_stream(endless):
    service = endless
    request = prompt(service, "Describe the image.", 3)
    [full] = service.generate([GenerationRequest(request, SamplingParams(max_new_tokens=20))])
    assert full.finish_reason == "length" and full.completion_tokens == 20 and len(full.text) > 10
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    pieces: list[str] = []
    [cut] = service.generate([GenerationRequest(request, SamplingParams(max_new_tokens=20, stop=(stop,)),
                                                on_text=pieces.append)])
    expected = full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.text == expected.strip() and cut.completion_tokens < 20
    assert "".join(pieces) == expected.lstrip() or "".join(pieces).strip() == expected.strip()
    assert stop not in "".join(pieces)  # held back, never streamed


def test_a_cancelled_request_stops_within_a_token_and_the_batch_goes_on(endless):
    service = endless
    steps = {"n": 0}

    def cancelled() -> bool:
        steps["n"] += 1
        return steps["n"] >= 3

    requests = [GenerationRequest(prompt(service, "Describe the image.", 4), SamplingParams(max_new_tokens=15),
                                  cancelled=cancelled),
                GenerationRequest(prompt(service, "Who are you?"), SamplingParams(max_new_tokens=15))]
    stopped, other = service.generate(requests)
    # checked after every token: it stops at the token where cancelled() first says True (its third call)
    assert stopped.finish_reason == "cancelled" and stopped.completion_tokens <= 3 and steps["n"] == 3
    assert other.finish_reason == "length" and other.completion_tokens == 15
    assert other == service.generate([requests[1]])[0]  # the cancelled row did not disturb its neighbour


def test_sampling_is_reproducible_under_a_seed(service):
    request = prompt(service, "Describe the image.", 5)
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=7)
    first, again = (service.generate([GenerationRequest(request, params)])[0] for _ in range(2))
    assert first == again
    others = {service.generate([GenerationRequest(request, SamplingParams(max_new_tokens=12, temperature=1.5,
                                                                          seed=s))])[0].text for s in range(5)}
    assert len(others) > 1


def test_limits_and_modality_are_checked_before_decoding(service, tiny_dirs):
    with pytest.raises(PromptTooLongError, match="over the model's 1024 positions"):
        service.prepare([{"role": "user", "content": "red " * 1100}])
    text = GenerationService(load_llm(str(tiny_dirs["llm"])).eval(), load_tokenizer(str(tiny_dirs["llm"])),
                             InferenceSettings("chatml", None, "pad", 512))
    assert not text.supports_images
    with pytest.raises(UsageError, match="text-only model"):
        text.prepare([{"role": "user", "content": "<image>\nhi"}], [image(1)])
    assert text.answer([{"role": "user", "content": "Who are you?"}], params=SamplingParams(max_new_tokens=3)).text
