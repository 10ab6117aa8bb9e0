"""Screenshots of the web UI for the README, and the browser driver its tests share.

    .venv/bin/python scripts/screenshots.py --model sft=demo_workdir/merged --model pretrain=demo_workdir/runs/pretrain \\
        --image demo_workdir/data/images/eval/000000.png -o docs/
    .venv/bin/python scripts/screenshots.py --studio /tmp/studio -o docs/      # the studio's Train and Runs pages

Serves the models with the web chat (as `llava-kit serve` does), opens it in the system's chromium (headless,
driven by Playwright), asks about the image in the Chat tab and in the Side-by-side tab, and saves
`webui-chat.png` and `webui-side-by-side.png`. With --studio it serves a studio instead (`serve --studio`), starts a
tiny run from the Train page (the tiny-shapes-pretrain recipe) and saves `studio-train.png` once the run has ended and
`studio-runs.png`. tests/integration/test_webui_browser.py and test_studio_browser.py drive the pages with the same
functions.
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


# ---------------------------------------------------------------------------------------------- the studio's pages

def start_training(page, max_steps: int, logging_steps: int = 1) -> str:
    """On the Train page (its recipe's values as they are): set the steps, start the run; returns the job's id."""
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-start")
    page.fill("#train-max-steps input", str(max_steps))
    page.fill("#train-logging-steps input", str(logging_steps))
    page.click("#train-start")
    # the id as soon as the status names it (the page's timer soon rewrites the line, with the id still in it)
    return page.wait_for_function(
        "(() => { const m = document.querySelector('#train-status').innerText.match(/\\b(job-[0-9a-f]{12})\\b/);"
        " return m && m[1]; })()", polling=50).json_value()


def plotted_points(page, plot: str) -> int:
    """How many points the line plot `plot` (an elem_id) draws (Vega draws one hover symbol per point)."""
    return page.evaluate(f"document.querySelectorAll('#{plot} .mark-symbol path').length")


def follow_plot(page, plot: str, status: str, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
                timeout_s: float = 600) -> list[int]:
    """Watch the plot `plot` until the Markdown `status` (elem_ids) says one of `until`; returns each point count
    the plot showed, in order (so a test sees it grow while the run trains)."""
    counts, deadline = [], time.monotonic() + timeout_s
    while True:
        count = plotted_points(page, plot)
        if not counts or count != counts[-1]:
            counts.append(count)
        text = page.inner_text(f"#{status}")
        if any(f": {word}" in text for word in until):
            page.wait_for_timeout(1500)  # the last tick's plot
            count = plotted_points(page, plot)
            return counts if count == counts[-1] else [*counts, count]
        if time.monotonic() > deadline:
            raise TimeoutError(f"#{status} still reads {text!r}")
        page.wait_for_timeout(100)


def studio_screenshots(studio_dir: Path, output: Path) -> list[Path]:
    """Serve a studio with the web UI, start a tiny run from the Train page, and save the Train and Runs pages."""
    from playwright.sync_api import sync_playwright

    from llava_kit.serve.server import start_server
    from llava_kit.serve.settings import ServerSettings
    from llava_kit.studio import Studio
    from llava_kit.studio.api import studio_router
    from llava_kit.studio.models import serve_fine_tuned_models
    from llava_kit.studio.settings import StudioSettings
    from llava_kit.webui import mount_webui

    studio = Studio(studio_dir).start()
    settings = ServerSettings(max_new_tokens=64)

    def setup(app) -> None:
        serve_fine_tuned_models(studio, app.state.workers, settings)
        mount_webui(app, studio)

    server = start_server({}, settings, port=0, routers=[studio_router(studio, StudioSettings())], setup=setup)
    shots = [output / "studio-train.png", output / "studio-runs.png"]
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright, find_chromium())
            page = open_page(browser, server.url.removesuffix("/v1") + "/", height=1000)
            page.get_by_role("tab", name="Train").click()
            page.click("#train-preview")
            page.wait_for_function("document.querySelector('#train-data-summary').innerText.includes('can be trained')")
            job_id = start_training(page, max_steps=30)
            follow_plot(page, "train-loss", "train-status")
            output.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots[0]), full_page=True)
            page.get_by_role("tab", name="Runs").click()
            page.fill("#runs-job input", job_id)
            page.press("#runs-job input", "Enter")
            page.wait_for_function("document.querySelectorAll('#runs-loss .mark-symbol path').length > 0")
            page.screenshot(path=str(shots[1]), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        studio.close(cancel_running=True)
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="[NAME=]DIR, twice for side by side")
    parser.add_argument("--image", type=Path, help="the image to ask about")
    parser.add_argument("--question", default="What shape is in the image?")
    parser.add_argument("--studio", type=Path, help="a studio folder: screenshots of the Train and Runs pages instead")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs"))
    args = parser.parse_args()

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if find_chromium() is None:
        raise SystemExit("no chromium: run scripts/install_browser.sh or set LLAVA_KIT_CHROMIUM")
    if args.studio:
        print(*studio_screenshots(args.studio, args.output))
        return
    if not args.model or not args.image:
        parser.error("give --model (and --image), or --studio")
    from playwright.sync_api import sync_playwright

    from llava_kit.serve.server import load_services, start_server
    from llava_kit.serve.settings import ServerSettings, parse_models
    from llava_kit.webui import mount_webui

    executable = find_chromium()
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
