"""The web chat in a real browser: the system's chromium, headless, driven by Playwright (scripts/screenshots.py
holds the driver). Upload an image, ask, read the answer as it streams in; a second turn, regenerate, clear; the
side-by-side tab shows two models' answers; a text-only server offers no upload; with an API key the page asks
for it.

Needs chromium (scripts/install_browser.sh, run by scripts/install.sh): without it these tests skip with the
reason, or fail where LLAVA_KIT_BROWSER_TESTS=required (CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from llava_kit.config import ModelConfig
from llava_kit.inference import GenerationService, SamplingParams
from llava_kit.loader import open_model_dir
from llava_kit.model.build import build_llava
from llava_kit.serve.server import ServerSettings, start_server
from llava_kit.store.specs import InferenceSettings
from scripts import screenshots as driver

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
IMAGE = SHAPES / "images" / "eval" / "000001.png"
QUESTIONS = ["What shape is in the image?", "What color is the shape?"]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def services(answering_model, tiny_dirs) -> dict[str, GenerationService]:
    """Two models for side by side: the fine-tuned tiny model, and the same tower and LLM under an untrained
    linear projector."""
    cfg = ModelConfig()
    cfg.vision.name_or_path, cfg.llm.name_or_path = str(tiny_dirs["vision"]), str(tiny_dirs["llm"])
    cfg.projector.name = "linear"
    untrained, tokenizer = build_llava(cfg)
    return {"tuned": GenerationService.from_loaded(open_model_dir(answering_model)),
            "untrained": GenerationService(untrained.eval(), tokenizer, InferenceSettings("chatml", None, "pad", 256))}


def serve_page(services, settings: ServerSettings):
    from llava_kit.webui import mount_webui

    server = start_server(services, settings, port=0, setup=mount_webui)
    return server, server.url.removesuffix("/v1") + "/"


@pytest.fixture(scope="module")
def page_url(chromium_path, services):
    server, url = serve_page(services, ServerSettings(max_new_tokens=MAX_NEW_TOKENS))
    yield url
    server.shutdown()


def expected(service: GenerationService, turns: list[tuple[str, str | None]]) -> str:
    """The answer to the last question of `turns` [(question, answer)], the image in the first."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    image = Image.open(IMAGE).convert("RGB")
    return service.answer(messages, [image], SamplingParams(max_new_tokens=MAX_NEW_TOKENS)).text


def test_chat_uploads_an_image_and_streams_the_answer(browser, page_url, services, tmp_path):
    page = driver.open_page(browser, page_url)
    first = expected(services["tuned"], [(QUESTIONS[0], None)])
    driver.ask(page, "chat-input", QUESTIONS[0], [IMAGE])
    driver.wait_for_answer(page, "chat", first)
    driver.wait_for_completed(page, 1)
    pieces = driver.streamed_pieces(page)
    assert pieces and first.endswith("".join(pieces).strip()), pieces  # the answer arrived in several messages
    assert page.locator("#chat .user img").count() == 1  # the uploaded image is in the conversation
    page.screenshot(path=str(tmp_path / "webui-chat.png"), full_page=True)

    second = expected(services["tuned"], [(QUESTIONS[0], first), (QUESTIONS[1], None)])
    driver.ask(page, "chat-input", QUESTIONS[1])
    driver.wait_for_answer(page, "chat", second)
    driver.wait_for_completed(page, 2)
    assert page.locator("#chat .bot").count() == 2

    page.click("#chat-regenerate")  # greedy: the same answer again, in place of the last one
    driver.wait_for_completed(page, 3)
    driver.wait_for_answer(page, "chat", second)
    assert page.locator("#chat .bot").count() == 2

    page.click("#chat-clear")
    page.wait_for_function("document.querySelectorAll('#chat .bot').length === 0")
    driver.ask(page, "chat-input", QUESTIONS[0], [IMAGE])  # a fresh conversation: the first answer again
    driver.wait_for_answer(page, "chat", first)
    page.close()


def test_side_by_side_shows_both_models_answers(browser, page_url, services, tmp_path):
    page = driver.open_page(browser, page_url)
    page.get_by_role("tab", name="Side by side").click()
    driver.ask(page, "side-input", QUESTIONS[0], [IMAGE])
    answers = {name: expected(service, [(QUESTIONS[0], None)]) for name, service in services.items()}
    shown_a = driver.wait_for_answer(page, "side-a", answers["tuned"])
    shown_b = driver.wait_for_answer(page, "side-b", answers["untrained"])
    assert shown_a != shown_b
    assert page.locator("#side-a .user img").count() == page.locator("#side-b .user img").count() == 1
    page.screenshot(path=str(tmp_path / "webui-side-by-side.png"), full_page=True)
    page.close()


def test_a_text_only_model_gets_no_upload_and_a_key_is_asked_for(browser, tiny_dirs):
    text = GenerationService.from_loaded(open_model_dir(tiny_dirs["llm"]))
    server, url = serve_page({"lumen": text}, ServerSettings(max_new_tokens=MAX_NEW_TOKENS, api_key="sk-page"))
    try:
        page = browser.new_page()
        page.goto(url)
        page.fill("input[type=password]", "sk-page")
        page.fill("input[type=text]", "anyone")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#chat-input textarea")
        assert page.locator("#chat-input input[type=file]").count() == 0
        assert "text only" in page.inner_text("body")
        answer = text.answer([{"role": "user", "content": "Who are you?"}], [],
                             SamplingParams(max_new_tokens=MAX_NEW_TOKENS)).text
        driver.ask(page, "chat-input", "Who are you?")
        driver.wait_for_answer(page, "chat", answer)
        page.close()
    finally:
        server.shutdown()
