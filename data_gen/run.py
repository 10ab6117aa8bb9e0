"""The resumable caption run: scan -> skip what is done -> caption concurrently -> validate -> append.

    job = Job.open(RunOptions(image_dir, output), model="gpt-4o")
    summary = run_online(job, ClientOptions(model="gpt-4o"), api_key)

Every unique image ends exactly once in OUT.jsonl (a record keyed by image hash + task) or in
OUT.errors.jsonl (with a reason; a run stopped by a fatal error or Ctrl-C lists what it did not finish
as `not_attempted`, `stopped` or `batch_pending`). Rerunning the same command skips the done ids and
retries the rest; `--batch` (batch.py) shares this Job and differs only in how requests are sent. Only
one run at a time may write an output (lock.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_gen.client import (
    ClientOptions,
    FatalAPIError,
    RateLimiter,
    Reply,
    TransientError,
    VisionClient,
    backoff_delay,
)
from data_gen.lock import OutputLock
from data_gen.prompts import AnswerError, Task, get_task, sample_question, to_conversations
from data_gen.scan import ImageFile, ScanResult, scan_folder
from data_gen.store import ErrorLog, OutputStore, errors_path
from data_gen.validate import validated_turns

if TYPE_CHECKING:
    from data_gen.preference import SamplerOptions

log = logging.getLogger("data_gen")


@dataclass
class RunOptions:
    """What to caption and how hard to try."""

    image_dir: Path
    """Folder scanned recursively for images."""
    output: Path
    """The dataset, LLaVA JSONL; failures go next to it in OUT.errors.jsonl."""
    task: str = "caption"
    """caption, detail, conversation or reasoning."""
    prompt_file: Path | None = None
    """Replaces the task's instruction to the model."""
    raw_prompt: bool = False
    """Send the prompt file's text alone (no rules, no JSON format)."""
    seed: int = 0
    """Seeds the per-image choice of the stored question (caption, detail)."""
    concurrency: int = 8
    """Requests in flight at once."""
    rpm: float | None = None
    """Requests per minute at most; None: no limit besides concurrency."""
    max_retries: int = 6
    """Retries per image after 429, 5xx, timeouts and dropped connections."""
    validation_retries: int = 2
    """Retries per image after a refusal, a truncated, empty, malformed or leaking answer."""
    retry_delay: float = 1.0
    """First backoff in seconds (doubles per retry, jittered) when the server gives no Retry-After."""
    limit: int | None = None
    """Caption at most this many of the images still to do."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclass
class Summary:
    """Counts for the end-of-run report and the exit code."""

    found: int = 0
    unique: int = 0
    skipped: int = 0
    done: int = 0
    todo: int = 0
    beyond_limit: int = 0
    failed: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    unfinished: Counter = field(default_factory=Counter)
    """Images of a stopped run listed in the errors file by reason (not_attempted, stopped, batch_pending)."""
    duplicates: int = 0
    unreadable_at_scan: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed: float = 0.0
    sampler_tokens: tuple[int, int] | None = None
    """Prompt and completion tokens of the sampled model (`--task preference`); not billed by the API."""
    fatal: str | None = None
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 all done, 1 some images failed (rerun retries them), 3 fatal API error, 130 interrupted."""
        if self.fatal:
            return 3
        if self.interrupted:
            return 130
        return 1 if sum(n for reason, n in self.failed.items() if reason != "unreadable") else 0

    def lines(self, output: Path, usd: float | None = None) -> list[str]:
        """The human-readable report."""
        failed = sum(self.failed.values())
        rate = f", {self.done / self.elapsed:.1f} img/s" if self.elapsed > 0 and self.done else ""
        out = [
            f"image files found: {self.found} ({self.unique} unique readable, {self.duplicates} exact duplicates "
            "dropped)",
            f"done this run: {self.done} in {self.elapsed:.1f}s{rate}; skipped (already done): {self.skipped}; "
            f"failed: {failed}",
        ]
        if self.failed:
            out.append("failed by reason: " + ", ".join(f"{k} {v}" for k, v in self.failed.most_common()))
        if self.retries:
            out.append("retries by reason: " + ", ".join(f"{k} {v}" for k, v in self.retries.most_common()))
        missing = self.todo - self.done - (failed - self.unreadable_at_scan)  # scan failures are not in todo
        if missing > 0:
            listed = ", ".join(f"{k} {v}" for k, v in sorted(self.unfinished.items()))
            out.append(f"not attempted (run stopped): {missing}" + (f", listed in the errors file as {listed}"
                                                                     if listed else ""))
        if self.beyond_limit:
            out.append(f"left for a later run (--limit): {self.beyond_limit}")
        tokens = f"tokens used: {self.prompt_tokens} prompt + {self.completion_tokens} completion"
        out.append(tokens + (f" (about ${usd:.4f} at list price)" if usd is not None else ""))
        if self.sampler_tokens is not None:
            out.append(f"sampled model's tokens: {self.sampler_tokens[0]} prompt + {self.sampler_tokens[1]} "
                       "completion")
        out.append(f"dataset: {output}  errors: {errors_path(output)}")
        if failed or missing > 0 or self.interrupted or self.beyond_limit:
            out.append("rerun the same command to retry what failed or is missing; finished images are skipped")
        return out


class Job:
    """State shared by the online and batch runs: the scan, the task, the output files and the counts."""

    def __init__(self, options: RunOptions, model: str, scan: ScanResult, task: Task, store: OutputStore,
                 errors: ErrorLog | None, lock: OutputLock | None = None) -> None:
        self.options = options
        self.model = model
        self.scan = scan
        self.task = task
        self.store = store
        self.errors = errors
        self.lock = lock
        self.failed_ids: set[str] = set()
        self.attempts: Counter = Counter()  # requests sent per item id (online runs)
        self.submitted: dict[str, str] = {}  # item id -> id of the batch it is in (--batch runs)
        self.summary = Summary(found=scan.files_seen, unique=len(scan.images), duplicates=len(scan.duplicates),
                               unreadable_at_scan=len(scan.unreadable))
        self.todo = [img for img in scan.images if self.item_id(img) not in store.done]
        self.summary.skipped = len(scan.images) - len(self.todo)
        if options.limit is not None:
            self.summary.beyond_limit = max(0, len(self.todo) - options.limit)
            self.todo = self.todo[: options.limit]
        self.summary.todo = len(self.todo)

    @classmethod
    def open(cls, options: RunOptions, model: str, *, dry_run: bool = False) -> Job:
        """Scan the folder and open the output files (read-only for a dry run).

        A real run first takes the output's lock (lock.py): OutputLockedError while another run writes it.
        """
        task = get_task(options.task, options.prompt_file, options.raw_prompt)
        lock = None
        if not dry_run:
            lock = OutputLock(options.output)
            lock.acquire()  # before anything is read or written: the files are the holder's
        try:
            scan = _scan_with_progress(options.image_dir, options.progress)
            store = OutputStore(options.output, readonly=dry_run)
            errors = None if dry_run else ErrorLog(errors_path(options.output))
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        job = cls(options, model, scan, task, store, errors, lock)
        if not scan.files_seen:
            log.warning("no images (jpg, jpeg, png, webp, gif, bmp) found under %s", options.image_dir)
        if errors is not None:
            retried = sum(1 for e in errors.previous if "id" in e)  # scan problems have no id and no retry
            if retried:
                log.info("retrying the %d images that failed or were not finished in the previous run", retried)
            for problem in scan.unreadable + scan.duplicates:
                job.fail_problem(problem.rel, problem.reason, problem.detail, problem.sha256)
        return job

    def item_id(self, img: ImageFile) -> str:
        """Stable id of one image for this task: content hash + task label."""
        return f"{img.sha256[:16]}-{self.task.label}"

    def accept(self, img: ImageFile, reply: Reply) -> None:
        """Validate a reply and append its record; raises AnswerError when it may not enter the dataset."""
        turns = validated_turns(self.task, reply.finish_reason, reply.refusal, reply.content)
        question = sample_question(self.task, img.sha256, self.options.seed)
        record: dict[str, Any] = {
            "id": self.item_id(img),
            "image": img.rel,
            "conversations": to_conversations(self.task, turns, question),
            "task": self.task.label,
            "model": self.model,
            "sha256": img.sha256,
        }
        if self.store.append(record):
            self.summary.done += 1

    def accept_pair(self, img: ImageFile, fields: dict[str, Any]) -> None:
        """Append a preference pair's record (`--task preference`, data_gen/preference.py), RLAIF-V's layout."""
        record = {"id": self.item_id(img), "image": img.rel, **fields, "task": self.task.label, "model": self.model,
                  "sha256": img.sha256}
        if self.store.append(record):
            self.summary.done += 1

    def fail(self, img: ImageFile, reason: str, detail: str, attempts: int) -> None:
        """Record that an image will not be in the dataset this run, and why."""
        self.summary.failed[reason] += 1
        self.failed_ids.add(self.item_id(img))
        if self.errors is not None:
            self.errors.write({"id": self.item_id(img), "image": img.rel, "task": self.task.label, "reason": reason,
                               "detail": detail, "attempts": attempts, "sha256": img.sha256})

    def fail_problem(self, rel: str, reason: str, detail: str, sha256: str | None) -> None:
        """Record a file the scan dropped (unreadable, duplicate)."""
        if reason != "duplicate":
            self.summary.failed[reason] += 1
        if self.errors is not None:
            self.errors.write({"image": rel, "reason": reason, "detail": detail, "sha256": sha256})

    def account_unfinished(self, cause: str) -> None:
        """After a stop (fatal error, Ctrl-C): list each image of this run that is neither done nor failed.

        `not_attempted`: never sent; `stopped`: sent, but the run stopped before a usable answer came;
        `batch_pending`: in a submitted batch that a rerun with --batch collects. A rerun retries them
        all (the errors file is only a report: whatever is not in OUT.jsonl is sent again).
        """
        if self.errors is None:
            return
        for img in self.todo:
            item_id = self.item_id(img)
            if item_id in self.store.done or item_id in self.failed_ids:
                continue
            attempts = self.attempts[item_id]
            if item_id in self.submitted:
                reason = "batch_pending"
                detail = (f"in batch {self.submitted[item_id]}, not collected when the run stopped ({cause}); "
                          "rerun with --batch to collect it without paying again")
            elif attempts:
                reason, detail = "stopped", f"sent, but the run stopped before a usable answer came ({cause})"
            else:
                reason, detail = "not_attempted", f"never sent: the run stopped first ({cause})"
            self.summary.unfinished[reason] += 1
            self.errors.write({"id": item_id, "image": img.rel, "task": self.task.label, "reason": reason,
                               "detail": detail, "attempts": attempts, "sha256": img.sha256})

    def close(self) -> None:
        """Flush and close the output files, then release the output's lock."""
        try:
            self.store.close()
            if self.errors is not None:
                self.errors.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def _progress_bar(total: int, enabled: bool, unit: str, desc: str) -> Any:
    from tqdm import tqdm  # tqdm's rate and ETA, on stderr so stdout stays clean

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1)


def _scan_with_progress(image_dir: Path, progress: bool) -> ScanResult:
    with _progress_bar(0, progress, "file", "scanning") as bar:
        return scan_folder(image_dir, progress=bar.update)


class CaptionRequester:
    """One attempt at one image: send it with the task's prompt, validate the answer, store the record."""

    def __init__(self, job: Job, client: VisionClient) -> None:
        self.job = job
        self.client = client

    async def __call__(self, img: ImageFile, image_url: str) -> None:
        self.job.accept(img, await self.client.complete(self.job.task, image_url))

    def unreachable(self, exc: TransientError) -> tuple[str, str] | None:
        """(the endpoint, its option) when an error shows it was never reached (no request to it succeeded)."""
        if exc.reason in ("connection_error", "timeout") and self.client.successes == 0:
            return self.client.options.base_url or "api.openai.com", "--base-url"
        return None


async def _caption_one(job: Job, request: Any, limiter: RateLimiter, img: ImageFile,
                       encoded: asyncio.Future[str]) -> None:
    """Attempts at one image until one is stored, or the retries run out (then the image is failed with the
    reason). `request` is a CaptionRequester or a PreferenceRequester: the attempt; this is the retry policy."""
    options = job.options
    try:
        image_url = await encoded
    except Exception as exc:  # the header was fine at scan time but the pixels are not
        job.fail(img, "unreadable", f"cannot decode: {type(exc).__name__}: {exc}", 0)
        return
    transient = invalid = 0
    while True:
        await limiter.acquire()
        try:
            job.attempts[job.item_id(img)] += 1
            await request(img, image_url)
            return
        except TransientError as exc:
            transient += 1
            if transient > options.max_retries:
                unreachable = request.unreachable(exc)
                if unreachable is not None:
                    where, option = unreachable
                    raise FatalAPIError(
                        f"no request to {where} has succeeded ({exc.reason}: {exc.detail}).\n"
                        f"Check {option} and that the server is up; if it is just slow, raise --timeout."
                    ) from None
                job.fail(img, exc.reason, exc.detail, transient + invalid)
                return
            job.summary.retries[exc.reason] += 1  # counted only when a retry follows
            delay = backoff_delay(transient, exc.retry_after, base=options.retry_delay)
            if exc.reason == "rate_limited":
                limiter.pause(delay)  # the limit is the account's: everyone waits, not just this worker
            log.debug("%s: %s; retry %d in %.2fs", img.rel, exc, transient, delay)
            await asyncio.sleep(delay)
        except AnswerError as exc:
            invalid += 1
            if invalid > options.validation_retries:
                job.fail(img, exc.reason, exc.detail, transient + invalid)
                return
            job.summary.retries[exc.reason] += 1
            log.debug("%s: unusable answer (%s); asking again", img.rel, exc)


async def caption_online(job: Job, client: VisionClient, request: Any = None) -> None:
    """Caption `job.todo` with `concurrency` workers; the first fatal error cancels the rest.

    `request` makes one attempt at one image (default: a CaptionRequester on `client`).

    A feeder decodes and re-encodes images in threads ahead of the workers (at most `concurrency`
    waiting), so a worker whose answer arrives sends its next request at once instead of first spending
    a decode; on big photos the decode costs as much as a short request.
    """
    from data_gen.images import encode_image

    request = request or CaptionRequester(job, client)
    limiter = RateLimiter(job.options.rpm)
    n_workers = max(1, min(job.options.concurrency, len(job.todo)))
    ready: asyncio.Queue[tuple[ImageFile, asyncio.Future[str]] | None] = asyncio.Queue(maxsize=n_workers)
    detail = client.options.detail

    async def feed() -> None:
        for img in job.todo:
            await ready.put((img, asyncio.ensure_future(asyncio.to_thread(encode_image, img.path, detail))))
        for _ in range(n_workers):
            await ready.put(None)  # one stop sign per worker

    stopping = False

    with _progress_bar(len(job.todo), job.options.progress, "img", "captioning") as bar:

        async def worker() -> None:
            while not stopping and (entry := await ready.get()) is not None:  # each image to exactly one worker
                before = sum(job.summary.failed.values())
                await _caption_one(job, request, limiter, *entry)
                bar.update(1)
                failed = sum(job.summary.failed.values())
                if failed != before:
                    bar.set_postfix(failed=failed, refresh=False)

        feeder = asyncio.ensure_future(feed())
        workers = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
        try:
            # the feeder is watched too: if it died, workers would wait on the queue for ever
            done, _ = await asyncio.wait([feeder, *workers], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raises a FatalAPIError
        finally:
            stopping = True
            tasks = [feeder, *workers]
            while True:
                for task in tasks:
                    task.cancel()
                _, still_running = await asyncio.wait(tasks, timeout=1.0)
                if not still_running:
                    break  # else a cancel was lost (asyncio on Python 3.10): cancel again
            while not ready.empty():  # encodes started for images that will not be sent now
                entry = ready.get_nowait()
                if entry is not None:
                    entry[1].cancel()
                    await asyncio.gather(entry[1], return_exceptions=True)


def run_online(job: Job, client_options: ClientOptions, api_key: str, key_env: str = "OPENAI_API_KEY",
               sampler: SamplerOptions | None = None, sampler_key: str = "EMPTY") -> Summary:
    """Run the job against the API; never raises for API trouble or Ctrl-C (see Summary.fatal/interrupted).

    `sampler`: the endpoint whose answers the API judges (`--task preference`, data_gen/preference.py).
    """

    async def main() -> None:
        client = VisionClient(client_options, api_key, key_env)
        request = None
        if sampler is not None:
            from data_gen.preference import PreferenceRequester

            request = PreferenceRequester(job, client, sampler, sampler_key)
        try:
            await caption_online(job, client, request)
        finally:
            job.summary.prompt_tokens += client.prompt_tokens
            job.summary.completion_tokens += client.completion_tokens
            await client.close()
            if request is not None:
                job.summary.sampler_tokens = request.sampler_tokens
                await request.close()

    return _run_guarded(job, main)


def _run_guarded(job: Job, main: Any) -> Summary:
    """asyncio.run(main()) with fatal errors and Ctrl-C turned into the summary; closes the job.

    After a stop, every image not finished is listed in the errors file (Job.account_unfinished).
    """
    start = time.monotonic()
    try:
        asyncio.run(main())
    except FatalAPIError as exc:
        job.summary.fatal = str(exc)
    except KeyboardInterrupt:
        job.summary.interrupted = True
    except OSError as exc:  # a full disk or a vanished output folder: say so instead of a traceback
        job.summary.fatal = f"stopped by an OS error: {exc}. Fix it (disk space, paths, permissions), then rerun."
    finally:
        job.summary.elapsed = time.monotonic() - start
        try:
            if job.summary.fatal or job.summary.interrupted:
                cause = job.summary.fatal.splitlines()[0] if job.summary.fatal else "interrupted"
                job.account_unfinished(cause)
        except OSError as exc:  # the disk that stopped the run may refuse the list too; the rerun still works
            log.warning("could not list the unfinished images in %s: %s", errors_path(job.options.output), exc)
        finally:
            job.close()
    return job.summary
