"""`llava-kit caption`: caption an image folder into LLaVA training data through an OpenAI-compatible API.

    llava-kit caption photos/ -o data/captions.jsonl --model gpt-4o-mini --dry-run
    llava-kit caption photos/ -o data/captions.jsonl --model gpt-4o-mini --task detail --concurrency 16

`add_caption_arguments` and `run_caption` are the contract with `llava_kit/cli.py`. Only the standard
library and data_gen's light modules are imported at module level: `--help` must start fast, and
nothing here may import torch. Exit codes: 0 done, 1 some images failed (rerun retries them),
2 usage error, 3 fatal API error (quota, key, model), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data_gen.client import RESPONSE_FORMATS
from data_gen.prompts import TASKS

if TYPE_CHECKING:
    from data_gen.client import ClientOptions
    from data_gen.cost import Price
    from data_gen.run import Job

log = logging.getLogger("data_gen")

DETAILS = ("low", "high", "auto")  # same as data_gen.images.DETAILS, without importing PIL for --help
EXPORT_FORMATS = ("llava-json", "sharegpt")
EXIT_USAGE = 2


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `caption` options to `parser` (every option documented in --help)."""
    parser.epilog = (
        "Resume: rerun the same command; images already in OUT (keyed by image hash + task) are skipped, "
        "failures listed in OUT.errors.jsonl are retried. Exit status: 0 done, 1 some images failed, "
        "2 usage error, 3 fatal API error (quota, key, model), 130 interrupted. The API key is read from the "
        "environment only and never written anywhere."
    )
    parser.add_argument("image_dir", metavar="IMAGE_DIR", type=Path,
                        help="folder scanned recursively for jpg/jpeg/png/webp/gif/bmp images")
    parser.add_argument("-o", "--output", metavar="OUT.jsonl", type=Path, required=True,
                        help="LLaVA JSONL dataset to create or extend; failures go to OUT.errors.jsonl")
    parser.add_argument("--model", help="model name as the API knows it, e.g. gpt-4o-mini (required unless "
                                        "--export-only)")
    parser.add_argument("--base-url", metavar="URL",
                        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: api.openai.com)")
    parser.add_argument("--api-key-env", metavar="NAME", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (default: %(default)s)")

    what = parser.add_argument_group("what to generate")
    what.add_argument("--task", choices=tuple(TASKS), default="caption",
                      help="caption: brief (pretraining); detail: detailed description; conversation: several QA "
                           "turns; reasoning: one complex-reasoning QA (default: %(default)s)")
    what.add_argument("--prompt-file", metavar="FILE", type=Path,
                      help="text file replacing the task's instruction to the model (the JSON answer format is "
                           "still appended); results are kept apart from the default prompt's")
    what.add_argument("--raw-prompt", action="store_true",
                      help="send the --prompt-file text alone, without the rules and the JSON answer format, and "
                           "read the answer as plain text (small local models trained on short questions, e.g. "
                           "`llava-kit serve`)")
    what.add_argument("--seed", type=int, default=0,
                      help="seed for the per-image choice of the stored question (default: %(default)s)")
    what.add_argument("--detail", choices=DETAILS, default="auto",
                      help="image detail sent to the API; images are downscaled to match before upload "
                           "(default: %(default)s)")
    what.add_argument("--response-format", choices=RESPONSE_FORMATS, default="auto",
                      help="auto tries json_schema, falls back to json_object, then to text parsing "
                           "(default: %(default)s)")
    what.add_argument("--max-tokens", type=int, metavar="N",
                      help="completion token limit per request (default: per task; 0: do not send one)")
    what.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    what.add_argument("--limit", type=int, metavar="N", help="caption at most N of the images not yet done")

    how = parser.add_argument_group("how to send")
    how.add_argument("--concurrency", type=int, default=8, metavar="N",
                     help="requests in flight at once (default: %(default)s)")
    how.add_argument("--rpm", type=float, metavar="N", help="at most N requests per minute (default: no limit)")
    how.add_argument("--timeout", type=float, default=120.0, metavar="S",
                     help="seconds allowed for one request (default: %(default)s)")
    how.add_argument("--max-retries", type=int, default=6, metavar="N",
                     help="retries per image after 429, 5xx, timeouts, dropped connections (default: %(default)s)")
    how.add_argument("--validation-retries", type=int, default=2, metavar="N",
                     help="retries per image after a refusal or an empty, truncated, malformed or source-leaking "
                          "answer (default: %(default)s)")
    how.add_argument("--retry-delay", type=float, default=1.0, metavar="S",
                     help="first backoff when the server sends no Retry-After; doubles per retry, jittered "
                          "(default: %(default)s)")
    how.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    cost = parser.add_argument_group("cost")
    cost.add_argument("--dry-run", action="store_true",
                      help="count images and estimate tokens and cost; send nothing, write nothing")
    cost.add_argument("--price", metavar="IN,OUT",
                      help="USD per 1M input and output tokens for --model, overriding the built-in table")
    cost.add_argument("--price-table", metavar="FILE", type=Path,
                      help='JSON {"model": {"input": USD, "output": USD, "image_multiplier": 1.0}} merged over '
                           "the built-in price table")

    batch = parser.add_argument_group("batch API")
    batch.add_argument("--batch", action="store_true",
                       help="send through the Batch API (half price, results within 24 h); rerun with --batch "
                            "after a crash to collect submitted batches without paying again")
    batch.add_argument("--batch-max-requests", type=int, default=50_000, metavar="N",
                       help="requests per batch file (default: %(default)s, the API limit)")
    batch.add_argument("--batch-max-bytes", type=int, default=200_000_000, metavar="B",
                       help="bytes per batch file (default: %(default)s, the API limit)")
    batch.add_argument("--poll-interval", type=float, default=30.0, metavar="S",
                       help="seconds between batch status checks (default: %(default)s)")

    export = parser.add_argument_group("export")
    export.add_argument("--export", choices=EXPORT_FORMATS, action="append", default=[],
                        help="after the run, also write OUT.llava.json (one LLaVA JSON array) or "
                             "OUT.sharegpt.json + dataset_info.json (LLaMA-Factory); repeatable")
    export.add_argument("--export-only", action="store_true",
                        help="only convert the existing OUT to the --export formats; no API calls")
    export.add_argument("--dataset-name", metavar="NAME",
                        help="name of the dataset_info.json entry for sharegpt (default: OUT's name)")


def _check(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments, each saying what was wrong and what to do."""
    problems = []
    if not args.image_dir.is_dir():
        problems.append(f"IMAGE_DIR {args.image_dir} is not a folder: give the folder holding the images")
    if args.output.is_dir():
        problems.append(f"-o {args.output} is a folder: give a file name such as {args.output / 'captions.jsonl'}")
    if not args.model and not args.export_only:
        problems.append("--model is required: name the vision model, e.g. --model gpt-4o-mini")
    if args.export_only and not args.export:
        problems.append("--export-only needs at least one --export llava-json|sharegpt")
    if args.export_only and not args.output.is_file():
        problems.append(f"--export-only: {args.output} does not exist yet; run the caption command first")
    if args.prompt_file is not None and not args.prompt_file.is_file():
        problems.append(f"--prompt-file {args.prompt_file} does not exist")
    if args.raw_prompt and args.prompt_file is None:
        problems.append("--raw-prompt sends the text of --prompt-file as it is: give --prompt-file too")
    if args.raw_prompt and args.response_format not in ("auto", "text"):
        problems.append(f"--raw-prompt asks for plain text: --response-format {args.response_format} cannot apply")
    if args.price_table is not None and not args.price_table.is_file():
        problems.append(f"--price-table {args.price_table} does not exist")
    for name, minimum in (("concurrency", 1), ("max_retries", 0), ("validation_retries", 0), ("limit", 0),
                          ("max_tokens", 0), ("batch_max_requests", 1), ("batch_max_bytes", 1024)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            problems.append(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")
    for name in ("timeout", "rpm", "poll_interval"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            problems.append(f"--{name.replace('_', '-')} {value}: must be a positive number of "
                            f"{'requests per minute' if name == 'rpm' else 'seconds'}")
    if args.retry_delay < 0:
        problems.append(f"--retry-delay {args.retry_delay}: cannot be negative")
    if args.batch and args.rpm:
        problems.append("--rpm does not apply to --batch (the Batch API has its own limits): drop one of them")
    return problems


def _setup_logging() -> None:
    """data_gen's logs to stderr through tqdm.write, so they do not break the progress bar."""
    if log.handlers:
        return

    class _TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            from tqdm import tqdm

            try:
                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:
                self.handleError(record)

    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("caption: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if os.environ.get("LLAVA_KIT_DEBUG") else logging.INFO)
    log.propagate = False


def _fail(message: str) -> int:
    log.error("error: %s", message)
    return EXIT_USAGE


def run_caption(args: argparse.Namespace) -> int:
    """Run `llava-kit caption` with parsed arguments; returns the exit code (never raises for user errors)."""
    _setup_logging()
    try:
        return _run_caption(args)
    except KeyboardInterrupt:  # during the scan or an export; the API phase handles Ctrl-C itself
        log.warning("interrupted: finished images are saved; rerun the same command to continue")
        return 130


def _run_caption(args: argparse.Namespace) -> int:
    problems = _check(args)
    if problems:
        for problem in problems:
            log.error("error: %s", problem)
        return EXIT_USAGE
    if args.export_only:
        return _export(args)

    from data_gen import cost
    from data_gen.client import ClientOptions
    from data_gen.lock import OutputLockedError
    from data_gen.prompts import PromptFileError
    from data_gen.run import Job, RunOptions
    from data_gen.store import CorruptOutputError

    try:
        table = cost.load_price_table(args.price_table) if args.price_table else dict(cost.PRICES)
        price = cost.parse_price(args.price) if args.price else cost.find_price(args.model, table)
    except cost.PriceTableError as exc:
        return _fail(str(exc))
    options = RunOptions(
        image_dir=args.image_dir, output=args.output, task=args.task, prompt_file=args.prompt_file,
        raw_prompt=args.raw_prompt, seed=args.seed,
        concurrency=args.concurrency, rpm=args.rpm, max_retries=args.max_retries,
        validation_retries=args.validation_retries, retry_delay=args.retry_delay, limit=args.limit,
        progress=not args.no_progress,
    )
    client_options = ClientOptions(
        model=args.model, base_url=args.base_url, timeout=args.timeout, detail=args.detail,
        response_format="text" if args.raw_prompt else args.response_format, max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    try:
        job = Job.open(options, args.model, dry_run=args.dry_run)
    except (PromptFileError, CorruptOutputError, OutputLockedError, OSError) as exc:
        return _fail(str(exc))
    if args.dry_run:
        return _dry_run(job, client_options, price, args.batch)

    api_key = os.environ.get(args.api_key_env, "").strip()
    if not api_key:
        if not args.base_url:
            job.close()
            return _fail(f"no API key: ${args.api_key_env} is not set. Export it (export {args.api_key_env}=...) or "
                         "name the variable that holds it with --api-key-env NAME.")
        log.warning("$%s is not set; sending the placeholder key 'EMPTY' to %s (fine for local servers without "
                    "auth)", args.api_key_env, args.base_url)
        api_key = "EMPTY"

    if args.batch:
        from data_gen.batch import BatchOptions, run_batch

        batch_options = BatchOptions(args.batch_max_requests, args.batch_max_bytes, args.poll_interval)
        summary = run_batch(job, client_options, api_key, args.api_key_env, batch_options)
    else:
        from data_gen.batch import load_state
        from data_gen.run import run_online

        try:
            if load_state(args.output):
                log.warning("batches submitted with --batch are still pending for %s; rerun with --batch to "
                            "collect them instead of paying for those images twice", args.output)
        except ValueError as exc:
            log.warning("%s", exc)
        summary = run_online(job, client_options, api_key, args.api_key_env)

    usd = cost.cost(summary.prompt_tokens, summary.completion_tokens, price, args.batch)
    for line in summary.lines(args.output, usd):
        log.info("%s", line)
    if summary.fatal:
        log.error("stopped: %s", summary.fatal)
    if summary.interrupted:
        log.warning("interrupted: finished images are saved; rerun the same command to continue")
    if args.export and not summary.fatal and not summary.interrupted:
        code = _export(args)
        if code:
            return code
    return summary.exit_code


def _dry_run(job: Job, client_options: ClientOptions, price: Price | None, batch: bool) -> int:
    from data_gen import cost

    sizes = [(img.width, img.height) for img in job.todo]
    task = job.task
    estimate = cost.estimate(sizes, client_options.detail, len(task.prompt_text()), task.expected_output_tokens,
                             price, batch)
    summary = job.summary
    log.info("dry run: nothing sent, nothing written")
    log.info("image files: %d, unique readable: %d, duplicates: %d, unreadable: %d", summary.found, summary.unique,
             summary.duplicates, summary.unreadable_at_scan)
    log.info("already done: %d; to caption: %d", summary.skipped, estimate.requests)
    log.info("estimated tokens: %d input + %d output (images at detail=%s, ~%d output tokens per %s answer)",
             estimate.input_tokens, estimate.output_tokens, client_options.detail, task.expected_output_tokens,
             task.name)
    if estimate.usd is None:
        log.info("estimated cost: unknown, no price for model %r: pass --price IN,OUT (USD per 1M tokens) "
                 "or --price-table FILE", client_options.model)
    else:
        log.info("estimated cost: $%.2f%s (list prices; retries and refusals add to it)", estimate.usd,
                 " with the batch discount" if batch else "")
    job.close()
    return 0


def _export(args: argparse.Namespace) -> int:
    from data_gen.export import export
    from data_gen.store import CorruptOutputError

    for fmt in dict.fromkeys(args.export):
        try:
            count, paths = export(args.output, fmt, args.image_dir, dataset_name=args.dataset_name)
        except (CorruptOutputError, ValueError, OSError) as exc:
            return _fail(f"export {fmt}: {exc}")
        log.info("exported %d records as %s: %s", count, fmt, ", ".join(str(p) for p in paths))
    return 0
