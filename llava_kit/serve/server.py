"""`llava-kit serve`: load the models, start their workers, and run the app under uvicorn.

    llava-kit serve --model runs/demo/merged --port 8000 [--api-key KEY]
    llava-kit serve --model linear=runs/linear/merged --model mlp=runs/mlp/merged     # several models, by name

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="merged", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What shape is in the image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

The routes are in app.py, the OpenAI request models in protocol.py, the model workers in worker.py. This module
wires them: one worker per model, one FastAPI app, uvicorn on a socket bound here (so a taken port is a one-line
error). uvicorn closes idle kept-alive connections itself; `_HeaderDeadline` also closes connections that do
not complete a request's headers within `request_timeout` (uvicorn would hold them open for ever).
`start_server` runs the same in a background thread, for tests and notebooks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import uvicorn
from fastapi import APIRouter, FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from llava_kit.errors import UsageError
from llava_kit.inference.service import GenerationService
from llava_kit.serve.app import create_app
from llava_kit.serve.settings import ServerSettings
from llava_kit.serve.worker import ModelWorker, ModelWorkers

__all__ = ["ModelWorkers", "RunningServer", "ServerSettings", "create_app", "make_workers", "serve", "start_server"]

logger = logging.getLogger(__name__)

KEEP_ALIVE_S = 5  # idle kept-alive connections close after this (uvicorn's default)
GRACEFUL_SHUTDOWN_S = 5  # in-flight requests get this long to finish when the server stops; then they are cancelled


def make_worker(name: str, service: GenerationService, settings: ServerSettings) -> ModelWorker:
    """A started worker for one model, with the settings' batch, queue and prompt limits."""
    return ModelWorker(name, service, settings.max_batch_size, settings.max_queue, settings.max_prompt_tokens).start()


def make_workers(services: Mapping[str, GenerationService], settings: ServerSettings) -> ModelWorkers:
    """One started worker per model (name -> worker)."""
    return ModelWorkers({name: make_worker(name, service, settings) for name, service in services.items()})


def load_services(models: list[tuple[str, str]], trust_remote_code: bool = False) -> dict[str, GenerationService]:
    """(name, model directory) pairs -> name -> generation service, through the one loader."""
    from llava_kit.loader import open_model_dir

    services = {}
    for name, model_dir in models:
        logger.info("loading %s as %r", model_dir, name)
        services[name] = GenerationService.from_loaded(open_model_dir(model_dir, trust_remote_code=trust_remote_code))
    return services


# ---------------------------------------------------------------------------------------------- uvicorn

def _header_deadline(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete within
    `timeout` seconds of it opening or of the previous response (uvicorn itself never closes a connection that
    sends nothing, or a byte now and then: each held connection costs the server a descriptor)."""

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout, self._headers_late, None)

        def on_response_complete(self) -> None:
            completed = self.cycle  # before super(): it may start a pipelined request's cycle
            self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout, self._headers_late, completed)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _headers_late(self, previous_cycle) -> None:
            waiting_for_headers = self.cycle is previous_cycle  # no request has started since the timer began
            if waiting_for_headers and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def _uvicorn_server(app: FastAPI, settings: ServerSettings, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, http=_header_deadline(settings.request_timeout), timeout_keep_alive=KEEP_ALIVE_S,
                            limit_concurrency=settings.max_connections, backlog=2048,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_config=None, log_level=log_level)
    return uvicorn.Server(config)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one); UsageError when that address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or "
                         "--host") from None
    return sock


class RunningServer:
    """The app under uvicorn in a background thread: `.url` (ends in /v1), `.shutdown()`."""

    def __init__(self, app: FastAPI, workers: ModelWorkers, settings: ServerSettings, host: str, port: int):
        self.app, self.workers, self.settings = app, workers, settings
        sock = _listen(host, port)
        self.server_address = sock.getsockname()[:2]
        self._server = _uvicorn_server(app, settings, log_level="warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="llava-kit-http",
                                        daemon=True)
        self._thread.start()
        while not self._server.started:  # the socket is bound already: connections wait in its backlog meanwhile
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped while starting; see its log")
            time.sleep(0.01)

    @property
    def worker(self) -> ModelWorker:
        """The first (with one model, the only) model's worker."""
        return next(iter(self.workers.values()))

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}/v1"

    def shutdown(self) -> None:
        """Stop serving (in-flight requests get GRACEFUL_SHUTDOWN_S), then stop the workers; idempotent."""
        self._server.should_exit = True
        self._thread.join()
        self.workers.stop()


def start_server(services: GenerationService | Mapping[str, GenerationService], settings: ServerSettings,
                 host: str | None = None, port: int | None = None,
                 setup: Callable[[FastAPI], None] | None = None, routers: Sequence[APIRouter] = ()) -> RunningServer:
    """Start workers and the app in background threads; returns the running server.

    `services` is one generation service (named by `settings.model_name`, else "model") or name -> service. It
    listens on `host` and `port`, by default the settings'; `port=0` picks a free port (`server.url` says which).
    `routers` are more API routes (the studio's), `setup(app)` runs before serving (e.g.
    `llava_kit.webui.mount_webui`). Stop with `server.shutdown()`.
    """
    if isinstance(services, GenerationService):
        services = {settings.model_name or "model": services}
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    workers = make_workers(services, settings)
    try:
        app = create_app(workers, settings, routers=routers)
        if setup is not None:
            setup(app)
        return RunningServer(app, workers, settings, host, port)
    except BaseException:
        workers.stop()
        raise


def serve(models: list[tuple[str, str]], settings: ServerSettings, trust_remote_code: bool = False,
          setup: Callable[[FastAPI], None] | None = None, openai_api: bool = True,
          routers: Sequence[APIRouter] = ()) -> None:
    """Load the (name, directory) models and serve them at the settings' host and port until interrupted.

    `routers` are more API routes (the studio's fine-tuning API), behind the same key; `setup(app)` adds to the app
    before it serves (the web chat, the studio's models); `openai_api=False` serves only what setup adds and /health
    (`llava-kit webui`).
    """
    sock = _listen(settings.host, settings.port)  # before loading: a taken port fails fast
    workers = make_workers(load_services(models, trust_remote_code), settings)
    try:
        app = create_app(workers, settings, openai_api=openai_api, routers=routers)
        if setup is not None:
            setup(app)
        host, port = sock.getsockname()[:2]
        logger.info("serving %s at http://%s:%d%s%s", ", ".join(workers) or "no model yet", host, port,
                    " (POST /v1/chat/completions, GET /v1/models)" if openai_api else "",
                    "; API key required" if settings.api_key and openai_api else "")
        _uvicorn_server(app, settings, log_level="info").run(sockets=[sock])
    finally:
        workers.stop()
