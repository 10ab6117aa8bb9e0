"""An OpenAI-compatible HTTP server for a llava-kit model, on the standard library only.

    llava-kit serve --model runs/demo/merged --port 8000 [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="merged", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What shape is in the image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

Endpoints: `POST /v1/chat/completions` (streaming over SSE with `"stream": true`), `GET /v1/models`.
Requests are handled by one thread each (ThreadingHTTPServer); they queue for a single model worker thread,
which runs greedy non-streaming requests that wait together as one left-padded batch (same answers as one at a
time) and streaming or sampling requests one by one. Images come as `data:` URLs; remote `http(s)` URLs are
refused unless `allow_remote_images` is set. The default temperature is 0 (greedy), so answers equal
`llava-kit chat --prompt`'s.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llava_kit.errors import UsageError
from llava_kit.inference.service import GenerationService
from llava_kit.serve.requests import RequestError, parse_chat_request
from llava_kit.serve.settings import ServerSettings
from llava_kit.serve.worker import Job, ModelWorker

logger = logging.getLogger(__name__)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    server_version = "llava-kit"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ plumbing
    @property
    def settings(self) -> ServerSettings:
        return self.server.settings

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, kind: str = "invalid_request_error",
                    code: str | None = None) -> None:
        self._send_json(status, error_body(message, kind, code))

    def _authorised(self, body_pending: bool = False) -> bool:
        """True when no key is set or the request carries it; otherwise answers 401 and returns False."""
        key = self.settings.api_key
        if not key:
            return True
        header = self.headers.get("Authorization", "")
        if header == f"Bearer {key}":
            return True
        if body_pending:
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
        self._send_error(401, "Incorrect API key provided: pass the server's --api-key as the client's api_key "
                              "(Authorization: Bearer KEY)", code="invalid_api_key")
        return False

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 411/413 (the body is then left unread)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._send_error(411, "a Content-Length header is required")
            return None
        if int(length) > self.settings.max_body_bytes:
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
            self._send_error(413, f"request body of {int(length)} bytes is over this server's limit of "
                                  f"{self.settings.max_body_bytes} bytes (--max-body-mb); send smaller images")
            return None
        return self.rfile.read(int(length))

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": self.settings.model_name, "object": "model", "created": self.settings.created,
                     "owned_by": "llava-kit"}
            self._send_json(200, {"object": "list", "data": [model]})
        elif self.path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(404, f"no route GET {self.path}; try GET /v1/models or POST /v1/chat/completions",
                             code="not_found")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.close_connection = True
            self._send_error(404, f"no route POST {self.path}; this server has POST /v1/chat/completions",
                             code="not_found")
            return
        if not self._authorised(body_pending=True):
            return
        body = self._read_body()
        if body is None:
            return
        try:
            request = parse_chat_request(body, self.server.worker.service, self.settings)
        except RequestError as err:
            self._send_json(400, error_body(str(err), param=err.param))
            return
        job = Job(request)
        self.server.worker.submit(job)
        if request.stream:
            self._stream(job)
        else:
            self._complete(job)

    # ------------------------------------------------------------------ answers
    def _envelope(self, job: Job, kind: str) -> dict:
        return {"id": job.id, "object": kind, "created": job.created, "model": self.settings.model_name}

    def _complete(self, job: Job) -> None:
        job.done.wait()
        if job.error is not None:
            self._send_error(job.error_status, job.error, kind="server_error" if job.error_status >= 500 else
                             "invalid_request_error")
            return
        body = {**self._envelope(job, "chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish_reason}],
                "usage": job.usage()}
        self._send_json(200, body)

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        envelope = self._envelope(job, "chat.completion.chunk")

        def send(delta: dict, finish_reason: str | None = None, **extra) -> None:
            chunk = {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            send({"role": "assistant", "content": ""})
            while True:
                piece = job.pieces.get()
                if piece is None:
                    break
                send({"content": piece})
            if job.error is not None:
                error = error_body(job.error, "server_error" if job.error_status >= 500 else "invalid_request_error")
                self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
            else:
                send({}, job.finish_reason, usage=job.usage())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client of %s disconnected during the stream", job.id)


class LlavaServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the settings and the model worker."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], worker: ModelWorker, settings: ServerSettings):
        super().__init__(address, _Handler)
        self.worker = worker
        self.settings = settings

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def start_server(service: GenerationService, settings: ServerSettings, host: str | None = None,
                 port: int | None = None) -> LlavaServer:
    """Start the model worker and an HTTP server in background threads; returns the server.

    It listens on `host` and `port`, by default the settings'; `port=0` picks a free port (`server.url` says
    which). Stop with `server.shutdown(); server.worker.stop()`.
    """
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    worker = ModelWorker(service, settings.max_batch_size)
    try:
        server = LlavaServer((host, port), worker, settings)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or "
                         "--host") from None
    worker.start()
    threading.Thread(target=server.serve_forever, name="llava-kit-http", daemon=True).start()
    return server


def serve(model_dir: str, settings: ServerSettings | None = None, trust_remote_code: bool = False) -> None:
    """Load `model_dir` and serve it until interrupted at the settings' host and port (`llava-kit serve`)."""
    from pathlib import Path

    from llava_kit.loader import open_model_dir

    service = GenerationService.from_loaded(open_model_dir(model_dir, trust_remote_code=trust_remote_code))
    settings = settings or ServerSettings()
    if not settings.model_name:
        settings = settings.model_copy(update={"model_name": Path(model_dir).resolve().name})
    server = start_server(service, settings)
    logger.info("serving %s as %r at %s (POST /chat/completions, GET /models)%s", model_dir, settings.model_name,
                server.url, "; API key required" if settings.api_key else "")
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
        server.worker.stop()
