"""The web chat: a Gradio page over the model workers, mounted at / of the server's app.

    llava-kit webui --model runs/demo/merged           # the page alone, at http://127.0.0.1:7860
    llava-kit serve --model runs/demo/merged           # the page at /, next to the OpenAI API at /v1

Two tabs. **Chat**: one model; attach images (several, in any turn), ask, read the answer as it is generated;
regenerate, clear, stop. **Side by side**: the same turn goes to two models (two projectors trained on the same
data, say), each keeping its own conversation. The sampling controls apply to both; temperature 0 is greedy,
so the chat answers what `llava-kit chat --prompt` answers. With a studio (`llava-kit serve --studio DIR`) the
Train, Runs and Compare tabs follow (studio_pages.py), and every finished run's model joins the models' lists.

The page talks to the model workers in-process, not through the OpenAI API: the same queue, batching, limits and
cancellation as API requests (stop, or closing the tab, cancels the job within a token), without a base64 round
trip for every image, and without a key for the server to send itself. With --api-key, the page asks for that
key as its password instead.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
import gradio as gr
from fastapi import FastAPI

from llava_kit.data.images import load_image
from llava_kit.errors import LlavaKitError
from llava_kit.inference.sampling import SamplingParams
from llava_kit.serve.settings import ServerSettings
from llava_kit.serve.worker import Job, JobFailed, ModelWorker, QueueFull, WorkerStopped
from llava_kit.webui.conversation import Turn, bubbles, messages_of, new_turn

if TYPE_CHECKING:
    from llava_kit.studio.workspace import Studio

# System fonts only: the page loads nothing from the internet (the default theme fetches Google fonts).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
EMPTY_INPUT = {"text": "", "files": []}
# A browser fires no `change` for a file input given the file it already holds, so attaching the same image again
# (a new conversation about it) would do nothing; emptying the inputs after each message lets it through.
FORGET_UPLOADS = "() => { document.querySelectorAll('input[type=file]').forEach((input) => { input.value = ''; }); }"


def mount_webui(app: FastAPI, studio: Studio | None = None) -> None:
    """Mount the web chat at / of `app`, an app of `llava_kit.serve.app.create_app` (its workers and settings), with
    the studio's pages when given one."""
    settings: ServerSettings = app.state.settings
    auth, auth_message = None, None
    if settings.api_key:
        key = settings.api_key.encode()

        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), key)

        auth_message = "This server needs its API key: any user name, and the key as the password."
    gr.mount_gradio_app(app, build_webui(app.state.workers, settings, studio), path="/", auth=auth,
                        auth_message=auth_message, theme=THEME, max_file_size=settings.max_body_bytes)


def build_webui(workers: Mapping[str, ModelWorker], settings: ServerSettings, studio: Studio | None = None) -> gr.Blocks:
    """The page (gr.Blocks) over `workers` (model name -> worker; it may grow while serving: the lists of models are
    read again when the page loads and when a chat tab is chosen), with the studio's tabs when given one."""
    names = list(workers)
    first, second = (names[0] if names else None), (names[min(1, len(names) - 1)] if names else None)
    # a studio adds multimodal models later: its page offers uploads before it has any model
    reads_images = any(worker.supports_images for worker in workers.values()) or studio is not None
    title = "llava-kit chat" if studio is None else "llava-kit studio"
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        header = gr.Markdown(f"## {title}\n{_models_line(workers)}")
        with gr.Tab("Chat", elem_id="tab-chat") as chat_tab:
            model = gr.Dropdown(names, value=first, label="Model", visible=len(names) > 1 or studio is not None,
                                elem_id="chat-model")
            chatbot = gr.Chatbot(label=first or "no model yet", elem_id="chat", height=420, render_markdown=False)
            box = _input_box(reads_images, "chat-input")
            with gr.Row():
                regenerate = gr.Button("Regenerate", elem_id="chat-regenerate")
                clear = gr.Button("Clear", elem_id="chat-clear")
        with gr.Tab("Side by side", elem_id="tab-side") as side_tab:
            gr.Markdown("The same turn goes to both models; each keeps its own conversation.")
            with gr.Row():
                model_a = gr.Dropdown(names, value=first, label="Model A", elem_id="side-model-a")
                model_b = gr.Dropdown(names, value=second, label="Model B", elem_id="side-model-b")
            with gr.Row():
                chat_a = gr.Chatbot(label=f"A: {model_a.value}", elem_id="side-a", height=420, render_markdown=False)
                chat_b = gr.Chatbot(label=f"B: {model_b.value}", elem_id="side-b", height=420, render_markdown=False)
            side_box = _input_box(reads_images, "side-input")
            with gr.Row():
                side_regenerate = gr.Button("Regenerate both", elem_id="side-regenerate")
                side_clear = gr.Button("Clear", elem_id="side-clear")
        if studio is not None:
            from llava_kit.webui.studio_pages import studio_tabs

            studio_tabs(studio)
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy, as llava-kit chat)")
                top_p = gr.Slider(0, 1, value=1, step=0.01, label="Top-p")
                max_new_tokens = gr.Slider(1, settings.max_new_tokens, value=min(256, settings.max_new_tokens),
                                           step=1, label="Max new tokens")
                seed = gr.Number(None, precision=0, label="Seed (empty: new draws each time)")
        sampling = [temperature, top_p, max_new_tokens, seed]
        turns, turns_a, turns_b = gr.State([]), gr.State([]), gr.State([])

        # ------------------------------------------------------------------ Chat
        async def send(value, history: list[Turn], name: str, *controls):
            turn = _turn(value)
            if turn is None:
                yield gr.skip(), gr.skip(), gr.skip()
                return
            history = [*history, turn]
            job = await _start(_worker(workers, name), history, _params(*controls), settings)
            yield bubbles(history), history, EMPTY_INPUT
            async for pending in _follow(job, turn):
                yield bubbles(history, pending), history, gr.skip()
            yield bubbles(history), history, gr.skip()

        async def again(history: list[Turn], name: str, *controls):
            if not history:
                yield gr.skip(), gr.skip()
                return
            history = [*history[:-1], Turn(history[-1].text, history[-1].images)]
            job = await _start(_worker(workers, name), history, _params(*controls), settings)
            yield bubbles(history), history
            async for pending in _follow(job, history[-1]):
                yield bubbles(history, pending), history
            yield bubbles(history), history

        sent = box.submit(send, [box, turns, model, *sampling], [chatbot, turns, box], concurrency_limit=None)
        redone = regenerate.click(again, [turns, model, *sampling], [chatbot, turns], concurrency_limit=None)
        sent.then(None, None, None, js=FORGET_UPLOADS)
        box.stop(None, None, None, cancels=[sent, redone])
        clear.click(lambda: ([], []), None, [chatbot, turns], cancels=[sent, redone])
        chatbot.clear(lambda: [], None, turns, cancels=[sent, redone])  # the chat's own bin icon
        model.change(lambda name: gr.Chatbot(label=name), model, chatbot)

        # ------------------------------------------------------------------ Side by side
        async def send_both(value, history_a: list[Turn], history_b: list[Turn], name_a: str, name_b: str,
                            *controls):
            turn = _turn(value)
            if turn is None:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            history_a, history_b = [*history_a, turn], [*history_b, Turn(turn.text, list(turn.images))]
            cleared = EMPTY_INPUT  # once: what is typed meanwhile stays
            async for shown_a, shown_b in _both(_worker(workers, name_a), history_a, _worker(workers, name_b),
                                                history_b, _params(*controls), settings):
                yield shown_a, shown_b, history_a, history_b, cleared
                cleared = gr.skip()

        async def again_both(history_a: list[Turn], history_b: list[Turn], name_a: str, name_b: str, *controls):
            if not history_a:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            history_a = [*history_a[:-1], Turn(history_a[-1].text, history_a[-1].images)]
            history_b = [*history_b[:-1], Turn(history_b[-1].text, history_b[-1].images)]
            async for shown_a, shown_b in _both(_worker(workers, name_a), history_a, _worker(workers, name_b),
                                                history_b, _params(*controls), settings):
                yield shown_a, shown_b, history_a, history_b

        both = [turns_a, turns_b, model_a, model_b, *sampling]
        side_sent = side_box.submit(send_both, [side_box, *both], [chat_a, chat_b, turns_a, turns_b, side_box],
                                    concurrency_limit=None)
        side_redone = side_regenerate.click(again_both, both, [chat_a, chat_b, turns_a, turns_b],
                                            concurrency_limit=None)
        side_sent.then(None, None, None, js=FORGET_UPLOADS)
        side_box.stop(None, None, None, cancels=[side_sent, side_redone])
        side_state = [chat_a, chat_b, turns_a, turns_b]
        for clearing in (side_clear.click, chat_a.clear, chat_b.clear):  # the button, or either chat's bin
            clearing(lambda: ([], [], [], []), None, side_state, cancels=[side_sent, side_redone])
        model_a.change(lambda name: gr.Chatbot(label=f"A: {name}"), model_a, chat_a)
        model_b.change(lambda name: gr.Chatbot(label=f"B: {name}"), model_b, chat_b)

        # ------------------------------------------------------------------ models added while serving
        def current_models(chosen: str | None, chosen_a: str | None, chosen_b: str | None):
            now = list(workers)

            def keep(value, fallback):
                return gr.Dropdown(choices=now, value=value if value in now else fallback)

            return (f"## {title}\n{_models_line(workers)}", keep(chosen, now[0] if now else None),
                    keep(chosen_a, now[0] if now else None), keep(chosen_b, now[min(1, len(now) - 1)] if now else None))

        listing = [model, model_a, model_b]
        for event in (page.load, chat_tab.select, side_tab.select):
            event(current_models, listing, [header, *listing], show_progress="hidden")
    return page


def _worker(workers: Mapping[str, ModelWorker], name: str | None) -> ModelWorker:
    """The worker of the chosen model; gr.Error (shown on the page) when there is none."""
    if name is None or name not in workers:
        raise gr.Error("no model to answer yet: choose one (a studio run's model appears once the run has finished)"
                       if not list(workers) or name is None else f"model {name!r} is not served here")
    return workers[name]


def _models_line(workers: Mapping[str, ModelWorker]) -> str:
    kinds = [f"**{name}** ({'images and text' if w.supports_images else 'text only'})" for name, w in workers.items()]
    return "Models: " + (" · ".join(kinds) or "none yet (the studio's finished runs appear here)")


def _input_box(reads_images: bool, elem_id: str) -> gr.MultimodalTextbox:
    if reads_images:
        return gr.MultimodalTextbox(placeholder="Ask about an image: attach one or more with the paperclip",
                                    file_types=["image"], file_count="multiple", sources=["upload"], stop_btn=True,
                                    show_label=False, elem_id=elem_id)
    return gr.MultimodalTextbox(placeholder="Ask something (these models read text only)", sources=[],
                                stop_btn=True, show_label=False, elem_id=elem_id)


# ---------------------------------------------------------------------------------------------- generation

def _turn(value) -> Turn | None:
    try:
        return new_turn(value)
    except LlavaKitError as err:
        raise gr.Error(str(err)) from None


def _params(temperature, top_p, max_new_tokens, seed) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                              seed=None if seed is None else int(seed))
    except LlavaKitError as err:
        raise gr.Error(str(err)) from None


async def _start(worker: ModelWorker, history: list[Turn], params: SamplingParams, settings: ServerSettings) -> Job:
    """Queue the answer to the conversation's last turn; gr.Error (shown on the page) when it cannot be."""
    messages, paths = messages_of(history)
    try:
        if len(paths) > settings.max_images:
            raise LlavaKitError(f"this conversation has {len(paths)} images; this server takes at most "
                                f"{settings.max_images} (--max-images): clear it and start again")
        images = await anyio.to_thread.run_sync(lambda: [load_image(path) for path in paths])
        request = await anyio.to_thread.run_sync(worker.prepare, messages, images, params, True)
        return worker.submit(request)
    except (LlavaKitError, QueueFull, WorkerStopped) as err:
        raise gr.Error(str(err)) from None


async def _follow(job: Job, turn: Turn):
    """The answer so far, after each piece; then the turn holds the answer (what there is of it when stopped)."""
    text = ""
    try:
        async for piece in job.stream():
            text += piece
            yield text
        turn.answer = job.completion.text
    except JobFailed as err:
        raise gr.Error(str(err)) from None
    finally:  # stopped, or the page closed: the worker moves on within a token
        job.cancel()
        if turn.answer is None:
            turn.answer = text.strip()


async def _both(worker_a: ModelWorker, history_a: list[Turn], worker_b: ModelWorker, history_b: list[Turn],
                params: SamplingParams, settings: ServerSettings):
    """Both conversations' chat bubbles as either answer grows; both answers are generated at once."""
    job_a = await _start(worker_a, history_a, params, settings)
    try:
        job_b = await _start(worker_b, history_b, params, settings)
    except gr.Error:
        job_a.cancel()
        raise
    pending = ["", ""]
    changed: asyncio.Queue = asyncio.Queue()  # an index whose answer grew; None when that side is done

    async def follow(side: int, job: Job, turn: Turn) -> None:
        try:
            async for text in _follow(job, turn):
                pending[side] = text
                changed.put_nowait(side)
        finally:
            changed.put_nowait(None)

    tasks = [asyncio.create_task(follow(0, job_a, history_a[-1])), asyncio.create_task(follow(1, job_b, history_b[-1]))]
    try:
        yield bubbles(history_a), bubbles(history_b)
        finished = 0
        while finished < 2:
            if await changed.get() is None:
                finished += 1
            else:
                yield bubbles(history_a, pending[0]), bubbles(history_b, pending[1])
        for task in tasks:
            task.result()  # a side that failed raises its gr.Error here
        yield bubbles(history_a), bubbles(history_b)
    finally:
        for task in tasks:
            task.cancel()
