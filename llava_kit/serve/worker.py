"""The model worker: one thread owns the model; HTTP threads hand it jobs through a queue.

Greedy non-streaming jobs waiting together are generated as one left-padded batch (`answer_batch`'s method:
every row's answer is what it would be alone). Streaming and sampling jobs run one at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import torch

from llava_kit.data.encode import encode_messages
from llava_kit.model.llava import causal_lm_of
from llava_kit.serve.chat import _CallbackStreamer

logger = logging.getLogger(__name__)


class Job:
    """One request on its way through the worker; the HTTP thread waits on `done` or reads `pieces`."""

    def __init__(self, request):
        self.request = request
        self.input_ids: list[int] = []  # the encoded prompt, set by the worker
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.pieces: queue.Queue = queue.Queue()  # streamed text; None ends it
        self.done = threading.Event()
        self.text = ""
        self.finish_reason = "stop"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.error: str | None = None
        self.error_status = 500

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def fail(self, message: str, status: int) -> None:
        self.error, self.error_status = message, status
        self.finish()

    def finish(self) -> None:
        self.pieces.put(None)
        self.done.set()


class ModelWorker(threading.Thread):
    """Takes jobs from a queue and generates their answers with the session's model."""

    def __init__(self, session, max_batch_size: int = 8):
        super().__init__(name="llava-kit-model", daemon=True)
        self.session = session
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
            if job.request.greedy and not job.request.stream:
                while len(batch) < self.max_batch_size:  # everything queued meanwhile joins, if it can
                    try:
                        other = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if other is None:
                        waiting.append(None)
                        break
                    (batch if other.request.greedy and not other.request.stream else waiting).append(other)
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        ready = []
        for job in batch:
            try:
                job.input_ids = self._encode(job.request)
                ready.append(job)
            except ValueError as err:
                job.fail(str(err), 400)
        if not ready:
            return
        self.batch_sizes.append(len(ready))
        try:
            self._generate(ready)
        except Exception as err:  # noqa: BLE001 (the server must keep serving; the client gets a 500)
            logger.exception("generation failed")
            for job in ready:
                if not job.done.is_set():
                    job.fail(f"generation failed: {type(err).__name__}: {err}", 500)

    def _encode(self, request) -> list[int]:
        session = self.session
        model, settings = session.model, session.settings
        enc = encode_messages(request.messages, session.tokenizer, settings.template, model.image_token_id,
                              model.tokens_per_image, max_seq_len=10**9, n_images=request.n_images,
                              system_prompt=settings.system_prompt, add_generation_prompt=True)
        # The LLM's position limit, not the training max_seq_len: longer prompts than trained on still work.
        # The answer budget shrinks to what fits (finish_reason "length" when it runs out).
        limit = getattr(causal_lm_of(model.language_model).config.get_text_config(), "max_position_embeddings", None)
        if limit and len(enc.input_ids) >= limit:
            raise ValueError(f"the prompt is {len(enc.input_ids)} tokens (images included), over the model's "
                             f"{limit} positions; send fewer images or less text")
        if limit:
            request.max_new_tokens = min(request.max_new_tokens, limit - len(enc.input_ids))
        return enc.input_ids

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        session = self.session
        tokenizer, model = session.tokenizer, session.model
        pad = tokenizer.pad_token_id
        stops = session.stop_token_ids()
        width = max(len(job.input_ids) for job in jobs)
        device = model.device
        input_ids = torch.tensor([[pad] * (width - len(j.input_ids)) + j.input_ids for j in jobs], device=device)
        attention_mask = torch.tensor([[0] * (width - len(j.input_ids)) + [1] * len(j.input_ids) for j in jobs],
                                      device=device)
        pixels = [j.request.pixel_values for j in jobs if j.request.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(device) if pixels else None
        first = jobs[0].request
        max_new_tokens = max(j.request.max_new_tokens for j in jobs)
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} if not first.greedy \
            else {"do_sample": False}
        streamer = None
        if first.stream:
            job = jobs[0]
            started = [False]

            def on_text(piece: str) -> None:
                if not started[0]:  # the final answer is stripped: so is the stream's start
                    piece = piece.lstrip()
                    started[0] = bool(piece)
                if piece:
                    job.pieces.put(piece)

            streamer = _CallbackStreamer(tokenizer, on_text)
        output = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                streamer=streamer, **sampling)
        for job, row in zip(jobs, output.tolist(), strict=True):
            row = row[: job.request.max_new_tokens]  # greedy: a shorter budget is a prefix of the longer one
            stop_at = next((i for i, token in enumerate(row) if token in stops), None)
            job.finish_reason = "stop" if stop_at is not None else "length"
            tokens = row if stop_at is None else row[:stop_at]
            job.text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            job.prompt_tokens, job.completion_tokens = len(job.input_ids), len(tokens) + (stop_at is not None)
            job.finish()
