"""Screenshots of the web chat for the README, and the browser driver its tests share.

    .venv/bin/python scripts/screenshots.py --model sft=demo_workdir/merged --model pretrain=demo_workdir/runs/pretrain \\
        --image demo_workdir/data/images/eval/000000.png -o docs/

Serves the models with the web chat (as `llava-kit serve` does), opens it in the system's chromium (headless,
driven by Playwright), asks about the image in the Chat tab and in the Side-by-side tab, and saves
`webui-chat.png` and `webui-side-by-side.png`. tests/integration/test_webui_browser.py drives the page with the
same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Copies what the page receives from Gradio's event stream into window.__events, so a test can see the answer
# arrive in pieces (each piece is one `process_generating` message) rather than only its final state.
EVENT_TAP = """
window.__events = [];
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await realFetch(...args);
  const url = String((args[0] && args[0].url) || args[0]);
  if (url.includes('/queue/data') && response.body) {
    const [mine, theirs] = response.body.tee();
    (async () => {
      const reader = mine.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        window.__events.push(decoder.decode(value, {stream: true}));
      }
    })();
    return new Response(theirs, {headers: response.headers, status: response.status, statusText: response.statusText});
  }
  return response;
};
"""


def find_chromium() -> str | None:
    """The system's chromium: $LLAVA_KIT_CHROMIUM, else chromium or chromium-browser on the PATH."""
    for candidate in (os.environ.get("LLAVA_KIT_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


def launch(playwright, executable: str):
    """Headless chromium (no sandbox: these machines run as root; nothing from the network)."""
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def open_page(browser, url: str, width: int = 1280, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.add_init_script(EVENT_TAP)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea")
    return page


def ask(page, box: str, question: str, images: list[Path] = ()) -> None:
    """Attach `images` to the input box `box` (an elem_id), type `question` and send it."""
    if images:
        page.set_input_files(f"#{box} input[type=file]", [str(image) for image in images])
        page.wait_for_function(f"document.querySelectorAll('#{box} img').length >= {len(images)}")  # uploaded
    page.fill(f"#{box} textarea", question)
    page.press(f"#{box} textarea", "Enter")


def wait_for_answer(page, chatbot: str, answer: str, timeout_ms: int = 120_000) -> str:
    """Wait until the last bot message of `chatbot` (an elem_id) reads `answer` (whitespace aside); returns it."""
    page.wait_for_function(
        """([chatbot, answer]) => {
            // whitespace squashed and control characters dropped (a random model's answer may hold some)
            const squash = (text) => text.replace(/[\\u0000-\\u0008\\u000b-\\u001f\\u007f]/g, '')
                .replace(/\\s+/g, ' ').trim();
            const bots = document.querySelectorAll(`#${chatbot} .bot`);
            return bots.length > 0 && squash(bots[bots.length - 1].innerText) === squash(answer);
        }""", arg=[chatbot, answer], timeout=timeout_ms)
    bots = page.query_selector_all(f"#{chatbot} .bot")
    return bots[-1].inner_text()


def events(page) -> list[dict]:
    """The messages the page has received from Gradio's event stream (`msg`: process_generating, ...)."""
    lines = "".join(page.evaluate("window.__events")).splitlines()
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def wait_for_completed(page, count: int, timeout_s: float = 120) -> None:
    """Wait until `count` events (sending a message, regenerating, ...) have completed on the page."""
    deadline = time.monotonic() + timeout_s
    while sum(m.get("msg") == "process_completed" for m in events(page)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} events completed on the page")
        page.wait_for_timeout(50)


def streamed_pieces(page) -> list[str]:
    """The text pieces appended to answers, in the order the page received them (each in its own message)."""
    pieces = []
    for message in events(page):
        if message.get("msg") == "process_generating":
            for output in message["output"]["data"]:
                if isinstance(output, list):  # a diff: [["append", path, text], ...]
                    pieces += [op[2] for op in output if isinstance(op, list) and op and op[0] == "append"]
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="[NAME=]DIR, twice for side by side")
    parser.add_argument("--image", required=True, type=Path, help="the image to ask about")
    parser.add_argument("--question", default="What shape is in the image?")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs"))
    args = parser.parse_args()

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from llava_kit.serve.server import load_services, start_server
    from llava_kit.serve.settings import ServerSettings, parse_models
    from llava_kit.webui import mount_webui

    executable = find_chromium()
    if executable is None:
        raise SystemExit("no chromium: run scripts/install_browser.sh or set LLAVA_KIT_CHROMIUM")
    services = load_services(parse_models(args.model))
    server = start_server(services, ServerSettings(max_new_tokens=64), port=0, setup=mount_webui)
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright, executable)
            page = open_page(browser, server.url.removesuffix("/v1") + "/")
            ask(page, "chat-input", args.question, [args.image])
            wait_for_completed(page, 1)
            args.output.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.output / "webui-chat.png"), full_page=True)
            page.get_by_role("tab", name="Side by side").click()
            ask(page, "side-input", args.question, [args.image])
            wait_for_completed(page, 2)
            page.screenshot(path=str(args.output / "webui-side-by-side.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
    print(args.output / "webui-chat.png", args.output / "webui-side-by-side.png")


if __name__ == "__main__":
    main()
