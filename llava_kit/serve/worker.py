"""The model worker: one thread owns each model; requests reach it through a bounded queue.

    worker = ModelWorker("shapes", service, max_batch_size=8, max_queue=128).start()
    request = worker.prepare(messages, images, params, stream=True)   # the prompt, encoded (a LlavaKitError: 400)
    job = worker.submit(request)            # inside an event loop; QueueFull (429) or WorkerStopped (503)
    async for piece in job.stream(): ...    # or: completion = await job.result()
    job.cancel()                            # the client went away: generation stops within a token

    workers = ModelWorkers({"shapes": worker})   # the server's workers by name; more may be added while it serves

Greedy non-streaming jobs that wait together are generated as one batch by the generation service (every row's
answer is what it would be alone); streaming and sampled jobs run one at a time. A greedy batch about to start
also waits (at most GATHER_S) for the requests that are being prepared meanwhile (parsed, images decoded,
tokenized: `prepare()` has started, `submit()` not yet), so that clients who send together are answered together
rather than one alone and the rest after it; nothing is waited for when no request is being prepared. A job
cancelled while it waits is dropped without generating; one cancelled while generating stops after the current
token (the service checks `cancelled()` after every token), and a batch ends when all its jobs have stopped.

The worker is a thread, not a coroutine: generation holds the processor for seconds and torch releases the GIL
while it computes, so the event loop keeps serving other connections meanwhile. What the worker produces goes
back to the job's event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

from llava_kit.inference.sampling import SamplingParams
from llava_kit.inference.service import (
    Completion,
    GenerationRequest,
    GenerationService,
    Prompt,
    PromptTooLongError,
    image_sizes,
)
from llava_kit.serve.requests import RequestError

logger = logging.getLogger(__name__)

GATHER_S = 0.25
"""Longest a greedy batch waits, before it starts, for requests being prepared to join it (about the time `prepare()`
takes for a request with an image on a busy CPU)."""


class QueueFull(Exception):
    """The model's queue is full; the client should retry later (HTTP 429 with Retry-After)."""


class WorkerStopped(Exception):
    """The model worker has stopped (the server is shutting down; HTTP 503)."""


class JobFailed(Exception):
    """A job that ended without an answer; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)  # compared (and hashed) by identity: the worker tracks prepared requests in a WeakSet
class ChatRequest:
    """A conversation encoded for one model, with how to answer it."""

    prompt: Prompt
    params: SamplingParams
    stream: bool = False


class Job:
    """One request on its way through a worker. The event loop's side reads `stream()` / `result()` and may
    `cancel()`; the worker's side (its thread) posts text, the completion or a failure."""

    def __init__(self, request: ChatRequest, model: str, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.completion: Completion | None = None
        """Set when the job is done (before `stream()` ends)."""
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()  # ("text", str) ... then ("done", None) or ("failed", JobFailed)
        self._cancelled = threading.Event()

    # ------------------------------------------------------------------ the client's side (its event loop)
    def cancel(self) -> None:
        """Stop generating this answer (any thread); a no-op once it is done."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled (its client went away, or the server is stopping)."""
        return self._cancelled.is_set()

    async def stream(self) -> AsyncIterator[str]:
        """The answer's text in pieces as it is generated; JobFailed when it ends without an answer."""
        while True:
            kind, value = await self._events.get()
            if kind == "text":
                yield value
            elif kind == "done":
                return
            else:
                raise value

    async def result(self) -> Completion:
        """The whole answer, once generated; JobFailed when it ends without one."""
        async for _ in self.stream():
            pass
        return self.completion

    # ------------------------------------------------------------------ the worker's side (its thread)
    def _post(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody waits for this answer any more
            self._cancelled.set()

    def _text(self, piece: str) -> None:
        self._post("text", piece)

    def _finish(self, completion: Completion) -> None:
        self.completion = completion
        self._post("done")

    def _fail(self, status: int, message: str) -> None:
        self._post("failed", JobFailed(status, message))


class ModelWorker:
    """Takes jobs from a bounded queue and generates their answers with one model's generation service."""

    def __init__(self, name: str, service: GenerationService, max_batch_size: int = 8, max_queue: int = 128,
                 max_prompt_tokens: int | None = None):
        self.name = name
        self.service = service
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_sizes: list[int] = []
        """Jobs per generation call, for logs and tests (the latest 10,000)."""
        self.finish_reasons: collections.Counter[str] = collections.Counter()
        """How the jobs ended: stop, length, cancelled (for logs and tests)."""
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._stopping = False
        self._condition = threading.Condition()
        self._encode_lock = threading.Lock()
        self._preparing = 0  # prepare() calls running now
        self._prepared: weakref.WeakSet[ChatRequest] = weakref.WeakSet()  # prepared, not submitted (nor dropped)
        self._thread = threading.Thread(target=self._run, name=f"llava-kit-model-{name}", daemon=True)

    @property
    def supports_images(self) -> bool:
        """Whether the model reads images (a multimodal model) or text only."""
        return self.service.supports_images

    @property
    def running(self) -> int:
        """Jobs being generated now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Jobs in the queue."""
        return len(self._waiting)

    def start(self) -> ModelWorker:
        """Start the worker thread; returns the worker."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more jobs, cancel the running ones, answer the waiting ones 503; idempotent."""
        with self._condition:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            for job in self._running:
                job.cancel()
            self._condition.notify_all()
        for job in waiting:
            job._fail(503, "the server is shutting down")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests
    def prepare(self, messages: list[dict], images: list, params: SamplingParams, stream: bool = False) -> ChatRequest:
        """Preprocess the images and encode the prompt, in the caller's thread (so neither holds up generation).

        RequestError or PromptTooLongError (both LlavaKitErrors: the client's to fix) when this model cannot take
        the conversation.
        """
        if images and not self.supports_images:
            raise RequestError(f"model {self.name!r} reads text only; send the conversation without images",
                               "messages")
        with self._condition:
            self._preparing += 1
        request = None
        try:
            pixel_values = self.service.preprocess(images)
            sizes = image_sizes(images)  # an AnyRes model counts each image's tokens from its size
            with self._encode_lock:  # one tokenizer, shared by every request's thread
                input_ids = self.service.encode(messages, len(images), sizes)
            if self.max_prompt_tokens is not None and len(input_ids) > self.max_prompt_tokens:
                raise PromptTooLongError(f"the prompt is {len(input_ids)} tokens (images included), over this "
                                         f"server's limit of {self.max_prompt_tokens} (--max-prompt-tokens); send "
                                         "fewer images or less text")
            request = ChatRequest(Prompt(input_ids, pixel_values, sizes), params, stream)
            return request
        finally:
            with self._condition:
                self._preparing -= 1
                if request is not None:
                    self._prepared.add(request)  # until submitted; a request never submitted leaves with its object
                self._condition.notify_all()

    def submit(self, request: ChatRequest) -> Job:
        """Queue a request; call it from the event loop that will read the job. QueueFull / WorkerStopped when
        it cannot wait."""
        job = Job(request, self.name, asyncio.get_running_loop())
        with self._condition:
            self._prepared.discard(request)
            if self._stopping:
                raise WorkerStopped(f"model {self.name!r} is not serving any more (the server is shutting down)")
            if len(self._waiting) >= self.max_queue:  # jobs whose clients left do not hold places
                for cancelled in [j for j in self._waiting if j.cancelled]:
                    self._waiting.remove(cancelled)
                    self._drop(cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for model {self.name!r}, this "
                                f"server's limit (--max-queue); retry later")
            self._waiting.append(job)
            self._condition.notify_all()
        return job

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._generate(batch)

    def _next_batch(self) -> list[Job] | None:
        """The next job, and with a greedy non-streaming one every such job waiting (up to max_batch_size).
        Jobs cancelled while they waited are answered without generating. None when the worker stops."""
        with self._condition:
            while True:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return None
                first = self._waiting.popleft()
                if not first.cancelled:
                    break
                self._drop(first)
            if _batchable(first):
                self._gather()
                if self._stopping:  # stop() answered the waiting jobs; this one was in hand
                    first._fail(503, "the server is shutting down")
                    return None
            batch, kept = [first], collections.deque()
            while _batchable(first) and self._waiting:
                job = self._waiting.popleft()
                if job.cancelled:
                    self._drop(job)
                elif _batchable(job) and len(batch) < self.max_batch_size:
                    batch.append(job)
                else:
                    kept.append(job)  # waits on, in its place
            self._waiting = kept + self._waiting
            self._running = batch
            return batch

    def _gather(self) -> None:
        """Wait (holding the condition's lock between waits) while requests are being prepared and the batch could
        still grow: until they are all submitted, the batch is full, the worker stops or GATHER_S has passed."""
        deadline = time.monotonic() + GATHER_S
        while (self._preparing or len(self._prepared)) and len(self._waiting) + 1 < self.max_batch_size \
                and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _drop(self, job: Job) -> None:
        self.finish_reasons["cancelled"] += 1
        job._finish(Completion("", "cancelled", len(job.request.prompt.input_ids), 0))

    def _generate(self, batch: list[Job]) -> None:
        requests = [GenerationRequest(job.request.prompt, job.request.params,
                                      _streamer(job) if job.request.stream else None, job._cancelled.is_set)
                    for job in batch]
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        try:
            completions = self.service.generate(requests)
        except Exception as err:  # noqa: BLE001 (the server must keep serving; these clients get a 500)
            logger.exception("generation failed")
            for job in batch:
                job._fail(500, f"generation failed: {type(err).__name__}")
            return
        finally:
            with self._condition:
                self._running = []
        for job, completion in zip(batch, completions, strict=True):
            self.finish_reasons[completion.finish_reason] += 1
            job._finish(completion)


class ModelWorkers(Mapping[str, ModelWorker]):
    """The server's model workers by name: a mapping that may grow while it serves (the studio adds the models of
    finished fine-tuning jobs). Iterating it reads a snapshot, so a request listing the models never sees the mapping
    change under it."""

    def __init__(self, workers: Mapping[str, ModelWorker] | None = None):
        self._workers = dict(workers or {})
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> ModelWorker:
        with self._lock:
            return self._workers[name]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._workers))

    def __len__(self) -> int:
        with self._lock:
            return len(self._workers)

    def add(self, worker: ModelWorker) -> bool:
        """Add a started worker under its name; False (nothing changed) when a model has that name already."""
        with self._lock:
            if worker.name in self._workers:
                return False
            self._workers[worker.name] = worker
            return True

    def stop(self) -> None:
        """Stop every worker (see ModelWorker.stop)."""
        for worker in self.values():
            worker.stop()


def _batchable(job: Job) -> bool:
    return job.request.params.greedy and not job.request.stream


def _streamer(job: Job):
    """Streamed pieces to the job; the final answer is stripped, so the stream's start is too."""
    started = False

    def on_text(piece: str) -> None:
        nonlocal started
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            job._text(piece)

    return on_text
