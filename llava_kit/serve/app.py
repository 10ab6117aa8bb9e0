"""The FastAPI app: OpenAI's chat-completions API over the model workers, and /health.

    app = create_app({"shapes": worker}, ServerSettings(api_key="sk-..."), routers=[more_routes])
    # more routes share the key and the error shape (the studio's /v1/files, /v1/fine_tuning/jobs); the web chat
    # mounts itself at / afterwards

Routes: `POST /v1/chat/completions` (SSE with `"stream": true`), `GET /v1/models`, `GET /health`. Every
mistake of a client is answered in OpenAI's error shape with a 4xx (400 bad request, 401 key, 404 model or
route, 408 slow body, 413 body too large, 429 queue full) and never with a Python repr; 503 means the server
is stopping. The body is read here, not by FastAPI, so its size is capped while it arrives and its JSON is
parsed by pydantic (depth-limited, NaN refused) rather than Python's recursive `json` module.

A client that disconnects cancels its job: a task waits for the ASGI server's `http.disconnect` message (the
body has been read, so it is the next message) and sets the job's cancelled flag, which the generation service
checks after every token. So a client that hangs up frees the model within a token, streamed or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping, Sequence

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from llava_kit.errors import LlavaKitError
from llava_kit.serve.protocol import (
    ERROR_TYPES,
    ApiError,
    ChatCompletionRequest,
    error_body,
    public_message,
    validation_error,
)
from llava_kit.serve.requests import RequestError, conversation_of
from llava_kit.serve.settings import ServerSettings
from llava_kit.serve.worker import ChatRequest, Job, JobFailed, ModelWorker, QueueFull, WorkerStopped

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


def create_app(workers: Mapping[str, ModelWorker], settings: ServerSettings, openai_api: bool = True,
               routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The app serving `workers` (model name -> worker); without `openai_api` only /health (for a UI alone).

    `routers` add routes behind the same API key, ahead of the answer to unknown /v1 routes. `app.state.workers` and
    `app.state.settings` are there for what mounts itself on the app (the web chat).
    """
    app = FastAPI(title="llava-kit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workers, app.state.settings = workers, settings
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)  # unknown routes and methods
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(workers)}

    for router in routers:
        app.include_router(router, dependencies=[Depends(_key_check(settings.api_key))])
    included = [*routers, openai_router(workers, settings)] if openai_api else list(routers)
    if openai_api:
        app.include_router(included[-1])
    # what a 404 lists: every route but the catch-all
    app.state.route_names = sorted({f"{method} {route.path}" for router in included for route in router.routes
                                    if "{path" not in route.path for method in getattr(route, "methods", ())}
                                   | {"GET /health"})
    return app


# ---------------------------------------------------------------------------------------------- errors

def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(public_message(message), kind, code, param), status_code=status, headers=headers)


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return _error_response(err.status, err.message, err.param, err.code, err.headers)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    if err.status_code == 404:
        routes = ", ".join(request.app.state.route_names)
        return _error_response(404, f"no route {request.method} {request.url.path}; this server has {routes}",
                               code="not_found")
    return _error_response(err.status_code, str(err.detail), headers=getattr(err, "headers", None))


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
    return _error_response(500, "internal server error (a bug in llava-kit serve; see the server's log)")


# ---------------------------------------------------------------------------------------------- routes

def openai_router(workers: Mapping[str, ModelWorker], settings: ServerSettings) -> APIRouter:
    """/v1/chat/completions and /v1/models over `workers`, behind the settings' API key."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(settings.api_key))])

    @router.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": settings.created,
                                            "owned_by": "llava-kit"} for name in workers]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        raw = await _read_body(request, settings)
        # parsing, decoding images and tokenizing take CPU time: a thread does them, so the loop keeps serving
        worker, chat_request, include_usage = await run_in_threadpool(_parse, raw, workers, settings)
        job = _submit(worker, chat_request)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        if chat_request.stream:
            return StreamingResponse(_sse(job, watcher, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            completion = await job.result()
        except JobFailed as err:
            raise ApiError(err.status, str(err)) from None
        finally:
            watcher.cancel()
            job.cancel()  # a no-op when done; stops generating when this handler is cancelled (shutdown)
        return {**_envelope(job, "chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "logprobs": None, "finish_reason": completion.finish_reason}],
                "usage": _usage(job)}

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(request: Request):
        raise HTTPException(404)

    return router


def _key_check(key: str | None):
    """A dependency refusing requests without `Authorization: Bearer KEY` (401), compared in constant time."""
    expected = f"Bearer {key}".encode() if key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # the header's bytes as sent
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "Incorrect API key provided: pass the server's --api-key as the client's api_key "
                                "(Authorization: Bearer KEY)", code="invalid_api_key")

    return check


async def _read_body(request: Request, settings: ServerSettings) -> bytes:
    """The body, at most max_body_bytes (413, refused by its Content-Length before reading when it says so),
    arriving within request_timeout (408)."""
    limit = settings.max_body_bytes
    too_large = ApiError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-mb); "
                              "send smaller images")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        with anyio.fail_after(settings.request_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {settings.request_timeout:g} s "
                            "(--request-timeout)") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request") from None
    return bytes(body)


def _worker_for(workers: Mapping[str, ModelWorker], model: str | None) -> ModelWorker:
    """The worker of the requested model. With one model, any name reaches it (clients often send a fixed one)."""
    names = list(workers)  # one snapshot: models may be added meanwhile
    if not names:
        raise ApiError(404, "this server has no model yet (a studio server serves each fine-tuning job's model once "
                            "the job has succeeded)", param="model", code="model_not_found")
    if len(names) == 1:
        return workers[names[0]]
    if model in names:
        return workers[model]
    if model is None:
        raise ApiError(400, f"`model` is required: this server has several models ({', '.join(names)})",
                       param="model")
    raise ApiError(404, f"The model `{model}` does not exist; this server has: {', '.join(names)}", param="model",
                   code="model_not_found")


def _parse(raw: bytes, workers: Mapping[str, ModelWorker],
           settings: ServerSettings) -> tuple[ModelWorker, ChatRequest, bool]:
    """The body -> (the model's worker, the encoded request, include_usage); an ApiError (4xx) naming the problem
    when it is the client's."""
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as err:
        raise validation_error(err) from None
    worker = _worker_for(workers, body.model)
    try:
        conversation = conversation_of(body, settings)
        request = worker.prepare(conversation.messages, conversation.images, conversation.params,
                                 conversation.stream)
    except RequestError as err:
        raise ApiError(400, str(err), err.param) from None
    except LlavaKitError as err:  # a prompt over the limit of tokens, images for a text-only model
        raise ApiError(400, str(err), "messages") from None
    return worker, request, conversation.include_usage


def _submit(worker: ModelWorker, request: ChatRequest) -> Job:
    try:
        return worker.submit(request)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
    except WorkerStopped as err:
        raise ApiError(503, str(err), code="shutting_down", headers={"Retry-After": RETRY_AFTER_S}) from None


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when its client goes away: after the body, the next ASGI message is `http.disconnect`
    (it also arrives once the response is complete, when cancelling is a no-op)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _sse(job: Job, watcher: asyncio.Task, include_usage: bool):
    """The answer as Server-Sent Events: chat.completion.chunk objects, then `data: [DONE]`."""
    envelope = _envelope(job, "chat.completion.chunk")

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        return event({**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish_reason}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})  # at once: the client knows it is queued
        try:
            async for piece in job.stream():
                yield chunk({"content": piece})
        except JobFailed as err:
            kind = "server_error" if err.status >= 500 else "invalid_request_error"
            yield event(error_body(str(err), kind))
        else:
            yield chunk({}, job.completion.finish_reason, usage=_usage(job))
            if include_usage:
                yield event({**envelope, "choices": [], "usage": _usage(job)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (the response's task is cancelled) or the server stops
        watcher.cancel()
        job.cancel()


def _envelope(job: Job, kind: str) -> dict:
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model}


def _usage(job: Job) -> dict:
    prompt, completion = job.completion.prompt_tokens, job.completion.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
