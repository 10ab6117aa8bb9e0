"""The model worker: one thread owns the model; HTTP threads hand it jobs through a queue.

Greedy non-streaming jobs waiting together are generated as one batch by the generation service (every row's
answer is what it would be alone). Streaming and sampling jobs run one at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

from llava_kit.errors import LlavaKitError
from llava_kit.inference.service import Completion, GenerationRequest, GenerationService, Prompt

logger = logging.getLogger(__name__)


class Job:
    """One request on its way through the worker; the HTTP thread waits on `done` or reads `pieces`."""

    def __init__(self, request):
        self.request = request
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.pieces: queue.Queue = queue.Queue()  # streamed text; None ends it
        self.done = threading.Event()
        self.completion: Completion | None = None
        self.error: str | None = None
        self.error_status = 500

    @property
    def text(self) -> str:
        return self.completion.text if self.completion else ""

    @property
    def finish_reason(self) -> str:
        return self.completion.finish_reason if self.completion else "stop"

    def usage(self) -> dict:
        c = self.completion
        prompt, completion = (c.prompt_tokens, c.completion_tokens) if c else (0, 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def fail(self, message: str, status: int) -> None:
        self.error, self.error_status = message, status
        self.finish()

    def finish(self) -> None:
        self.pieces.put(None)
        self.done.set()


class ModelWorker(threading.Thread):
    """Takes jobs from a queue and generates their answers with the generation service."""

    def __init__(self, service: GenerationService, max_batch_size: int = 8):
        super().__init__(name="llava-kit-model", daemon=True)
        self.service = service
        self.max_batch_size = max_batch_size
        self.jobs: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # for logs and tests

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        waiting: list[Job] = []
        while True:
            job = waiting.pop(0) if waiting else self.jobs.get()
            if job is None:
                return
            batch = [job]
            if _batchable(job):
                while len(batch) < self.max_batch_size:  # everything queued meanwhile joins, if it can
                    try:
                        other = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if other is None:
                        waiting.append(None)
                        break
                    (batch if _batchable(other) else waiting).append(other)
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        ready, requests = [], []
        for job in batch:
            try:
                request = job.request
                prompt = Prompt(self.service.encode(request.messages, request.n_images, request.image_sizes),
                                request.pixel_values, request.image_sizes)
            except LlavaKitError as err:  # a prompt over the model's positions, an image for a text model
                job.fail(str(err), 400)
                continue
            ready.append(job)
            requests.append(GenerationRequest(prompt, job.request.params, _streamer(job) if job.request.stream
                                              else None))
        if not ready:
            return
        self.batch_sizes.append(len(ready))
        try:
            completions = self.service.generate(requests)
        except Exception as err:  # noqa: BLE001 (the server must keep serving; the client gets a 500)
            logger.exception("generation failed")
            for job in ready:
                job.fail(f"generation failed: {type(err).__name__}", 500)
            return
        for job, completion in zip(ready, completions, strict=True):
            job.completion = completion
            job.finish()


def _batchable(job: Job) -> bool:
    return job.request.params.greedy and not job.request.stream


def _streamer(job: Job):
    """Streamed pieces into the job's queue; the final answer is stripped, so the stream's start is too."""
    started = [False]

    def on_text(piece: str) -> None:
        if not started[0]:
            piece = piece.lstrip()
            started[0] = bool(piece)
        if piece:
            job.pieces.put(piece)

    return on_text
