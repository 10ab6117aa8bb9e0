"""`--batch`: the same job through the Batch API (half price, results within 24 h).

Requests are written to JSONL files of at most 50,000 lines / 200 MB (base64 images fill that fast),
uploaded with `files.create(purpose="batch")` and submitted; the batch ids go to `OUT.batches.json`
at once, so a rerun after a crash polls the submitted batches instead of paying for them again.
Results come back out of order and are matched by `custom_id` (the item id), then pass through the
same validation and output as online answers. What fails goes to the errors file; a rerun with
`--batch` resubmits it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_gen.client import (
    ClientOptions,
    FatalAPIError,
    TransientError,
    classify_error,
    reply_from_dict,
    request_body,
)
from data_gen.prompts import AnswerError
from data_gen.run import Job, Summary, _progress_bar, _run_guarded
from data_gen.scan import ImageFile

log = logging.getLogger("data_gen")

TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


@dataclass
class BatchOptions:
    """Batch API limits and polling."""

    max_requests: int = 50_000
    """Requests per input file (the API's limit)."""
    max_bytes: int = 200_000_000
    """Bytes per input file (the API's limit is 200 MB)."""
    poll_interval: float = 30.0
    """Seconds between status checks."""


def state_path(output: Path) -> Path:
    """`OUT.jsonl` -> `OUT.batches.json`: the submitted, not yet collected batches."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.batches.json")


def load_state(output: Path) -> list[dict[str, Any]]:
    """Submitted batches not yet collected: `[{"batch_id", "input_file_id", "ids"}]`."""
    path = state_path(output)
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["batches"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}). It lists batches already paid for: check them in your "
                         "provider's dashboard, then delete the file to go on.") from exc


def _save_state(output: Path, batches: list[dict[str, Any]]) -> None:
    path = state_path(output)
    if not batches:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"batches": batches}, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # atomic: the state is never half written


class _CreateError(Exception):
    """batches.create failed for an uploaded input file (the cause is the API error)."""

    def __init__(self, input_file_id: str) -> None:
        super().__init__(input_file_id)
        self.input_file_id = input_file_id


class _Submitter:
    """Packs request lines into files within the limits and submits each full file as a batch."""

    def __init__(self, job: Job, client: Any, options: BatchOptions, state: list[dict[str, Any]]) -> None:
        self.job, self.client, self.options, self.state = job, client, options, state
        self.tmp = state_path(job.options.output).with_suffix(".input.jsonl")
        self.lines: list[bytes] = []
        self.ids: list[str] = []
        self.size = 0

    def fits(self, line: bytes) -> bool:
        return len(self.lines) < self.options.max_requests and self.size + len(line) <= self.options.max_bytes

    def add(self, item_id: str, line: bytes) -> None:
        self.lines.append(line)
        self.ids.append(item_id)
        self.size += len(line)

    async def flush(self) -> None:
        """Upload the pending lines and create a batch; record it in the state file before anything else."""
        import openai

        if not self.lines:
            return
        self.tmp.write_bytes(b"".join(self.lines))
        try:
            uploaded = await self.client.files.create(file=self.tmp, purpose="batch")
        finally:
            self.tmp.unlink(missing_ok=True)
        try:
            # No blind retry here: a create that timed out may have started a batch, and a second one
            # would be paid for twice.
            batch = await self.client.with_options(max_retries=0).batches.create(
                input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                metadata={"created_by": "llava-kit"})
        except openai.OpenAIError as exc:
            raise _CreateError(uploaded.id) from exc  # the message names the file so the user can look it up
        self.state.append({"batch_id": batch.id, "input_file_id": uploaded.id, "ids": self.ids})
        _save_state(self.job.options.output, self.state)
        self.job.submitted.update(dict.fromkeys(self.ids, batch.id))
        log.info("submitted batch %s with %d requests (%.1f MB)", batch.id, len(self.ids), self.size / 1e6)
        self.lines, self.ids, self.size = [], [], 0


async def _submit(job: Job, client: Any, client_options: ClientOptions, options: BatchOptions,
                  state: list[dict[str, Any]]) -> None:
    from data_gen.images import encode_image

    pending = {item_id for entry in state for item_id in entry["ids"]}
    job.submitted.update({item_id: entry["batch_id"] for entry in state for item_id in entry["ids"]})
    todo = [img for img in job.todo if job.item_id(img) not in pending]
    if pending:
        log.info("%d images are in batches submitted earlier: collecting those, not resubmitting", len(pending))
    mode = "json_schema" if client_options.response_format == "auto" else client_options.response_format
    submitter = _Submitter(job, client, options, state)
    for img in todo:
        try:
            image_url = await asyncio.to_thread(encode_image, img.path, client_options.detail)
        except Exception as exc:
            job.fail(img, "unreadable", f"cannot decode: {type(exc).__name__}: {exc}", 0)
            continue
        item_id = job.item_id(img)
        request = {"custom_id": item_id, "method": "POST", "url": ENDPOINT,
                   "body": request_body(job.task, image_url, client_options, mode)}
        line = (json.dumps(request) + "\n").encode()
        if len(line) > options.max_bytes:
            job.fail(img, "too_large", f"one request is {len(line)} bytes, over --batch-max-bytes", 0)
            continue
        if not submitter.fits(line):
            await submitter.flush()
        submitter.add(item_id, line)
    await submitter.flush()


async def _download_lines(client: Any, file_id: str | None) -> dict[str, dict[str, Any]]:
    if not file_id:
        return {}
    content = await client.files.content(file_id)
    results = {}
    for line in content.text.splitlines():
        if line.strip():
            result = json.loads(line)
            results[str(result.get("custom_id"))] = result
    return results


def _outcome(job: Job, img: ImageFile, result: dict[str, Any] | None, batch: Any) -> None:
    """Route one batch result through validation into the dataset or the errors file."""
    if result is None:
        message = "; ".join(e.message or "" for e in (batch.errors.data or [])) if batch.errors else ""
        job.fail(img, f"batch_{batch.status}", f"no result in batch {batch.id} ({batch.status}) {message}".strip(), 1)
        return
    response = result.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if result.get("error") or status != 200:
        error = result.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
        reason = "rate_limited" if status == 429 else "server_error" if (status or 0) >= 500 else f"http_{status}"
        job.fail(img, reason, str(error.get("message") or error)[:300], 1)
        return
    try:
        reply = reply_from_dict(body)
        job.summary.prompt_tokens += reply.prompt_tokens
        job.summary.completion_tokens += reply.completion_tokens
        job.accept(img, reply)
    except (AnswerError, TransientError) as exc:
        job.fail(img, exc.reason, exc.detail, 1)


async def _collect(job: Job, client: Any, entry: dict[str, Any], batch: Any) -> None:
    by_id = {job.item_id(img): img for img in job.scan.images}
    results = await _download_lines(client, batch.output_file_id)
    results.update(await _download_lines(client, batch.error_file_id))
    for item_id in entry["ids"]:
        img = by_id.get(item_id)
        if img is None or item_id in job.store.done:
            continue  # image gone from the folder, or collected before a crash
        _outcome(job, img, results.get(item_id), batch)


MAX_POLL_FAILURES = 20


async def _retrieve(client: Any, batch_id: str, classify: Any, failures: list[int]) -> Any:
    """The batch's status, or None after a transient error (a long batch should outlive a server hiccup)."""
    import openai

    try:
        batch = await client.with_options(max_retries=0).batches.retrieve(batch_id)
    except openai.OpenAIError as exc:
        error = classify(exc)
        failures[0] += 1
        if not isinstance(error, TransientError) or failures[0] >= MAX_POLL_FAILURES:
            raise
        log.warning("checking batch %s failed (%s); trying again at the next poll", batch_id, error)
        return None
    failures[0] = 0
    return batch


async def _poll_and_collect(job: Job, client: Any, options: BatchOptions, state: list[dict[str, Any]],
                            classify: Any) -> None:
    total = sum(len(entry["ids"]) for entry in state)
    failures = [0]  # consecutive failed status checks
    last_status: dict[str, str] = {}
    collected = 0  # requests of batches already collected (they leave `state`)
    with _progress_bar(total, job.options.progress, "req", "batch") as bar:
        while state:
            finished = collected
            for entry in list(state):
                batch = await _retrieve(client, entry["batch_id"], classify, failures)
                if batch is None:
                    continue
                if last_status.get(batch.id) != batch.status:
                    log.info("batch %s: %s", batch.id, batch.status)
                    last_status[batch.id] = batch.status
                counts = batch.request_counts
                finished += (counts.completed + counts.failed) if counts else 0
                if batch.status in TERMINAL:
                    await _collect(job, client, entry, batch)
                    state.remove(entry)
                    _save_state(job.options.output, state)
                    collected += len(entry["ids"])
            bar.n = min(total, finished)
            bar.refresh()
            if state:
                await asyncio.sleep(options.poll_interval)
        bar.n = total
        bar.refresh()


async def caption_batch(job: Job, client_options: ClientOptions, api_key: str, key_env: str,
                        options: BatchOptions) -> None:
    """Submit what is left to do (unless already submitted), wait for every batch, collect the results."""
    import openai

    # SDK retries for uploads and downloads (repeating them is harmless); status checks and batch
    # creation opt out (see _retrieve and _Submitter.flush). Uploads of 200 MB take a while: long timeout.
    client = openai.AsyncOpenAI(api_key=api_key, base_url=client_options.base_url, max_retries=2,
                                timeout=max(client_options.timeout, 600.0))

    def classify(exc: BaseException) -> Exception:
        return classify_error(exc, client_options, api_key, key_env)

    try:
        try:
            state = load_state(job.options.output)
        except ValueError as exc:
            raise FatalAPIError(str(exc)) from None
        await _submit(job, client, client_options, options, state)
        await _poll_and_collect(job, client, options, state, classify)
    except (openai.OpenAIError, _CreateError) as exc:
        raise _batch_error(exc, classify(exc.__cause__ if isinstance(exc, _CreateError) else exc),
                           job.options.output) from None
    finally:
        await client.close()


def _batch_error(exc: Exception, error: Exception, output: Path) -> FatalAPIError:
    """The message that stops a batch run: what failed, and how to go on without paying twice."""
    where = f" (creating the batch for input file {exc.input_file_id})" if isinstance(exc, _CreateError) else ""
    if isinstance(error, FatalAPIError):
        return FatalAPIError(f"{error}{where}")
    return FatalAPIError(
        f"the Batch API failed{where}: {error}. Submitted batches are listed in {state_path(output)}; rerun the same "
        "command with --batch to go on (if a batch for the input file named here shows up in your provider's "
        "dashboard, cancel it or let it finish and collect it by hand first)."
    )


def run_batch(job: Job, client_options: ClientOptions, api_key: str, key_env: str,
              options: BatchOptions) -> Summary:
    """Run the job through the Batch API; like run_online, problems end up in the summary."""
    return _run_guarded(job, lambda: caption_batch(job, client_options, api_key, key_env, options))
