"""`llava-kit caption`: caption an image folder into LLaVA training data through an OpenAI-compatible API.

    llava-kit caption photos/ -o data/captions.jsonl --model gpt-4o-mini --dry-run
    llava-kit caption photos/ -o data/captions.jsonl --model gpt-4o-mini --task detail --concurrency 16

`add_caption_arguments` and `run_caption` are the contract with `llava_kit/cli.py`. The options are the fields
of `CaptionOptions` (data_gen/options.py), which also checks them. Only the standard library, data_gen's light
modules and llava_kit's schema layer (pydantic) are imported at module level: `--help` must start fast, and
nothing here may import torch. Exit codes: 0 done, 1 some images failed (rerun retries them),
2 usage error, 3 fatal API error (quota, key, model), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from data_gen.options import DETAILS as DETAILS  # re-exported: tests check them against images/export
from data_gen.options import EXPORT_FORMATS as EXPORT_FORMATS
from data_gen.options import CaptionOptions
from llava_kit.schema import add_arguments

if TYPE_CHECKING:
    from data_gen.client import ClientOptions
    from data_gen.cost import Price
    from data_gen.run import Job

log = logging.getLogger("data_gen")

EXIT_USAGE = 2


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `caption` options to `parser` (every option documented in --help)."""
    parser.epilog = (
        "Resume: rerun the same command; images already in OUT (keyed by image hash + task) are skipped, "
        "failures listed in OUT.errors.jsonl are retried. Exit status: 0 done, 1 some images failed, "
        "2 usage error, 3 fatal API error (quota, key, model), 130 interrupted. The API key is read from the "
        "environment only and never written anywhere."
    )
    add_arguments(parser, CaptionOptions, ["image_dir", "output", "model", "base_url", "api_key_env"], {
        "image_dir": {"flags": ("image_dir",), "metavar": "IMAGE_DIR"},
        "output": {"flags": ("-o", "--output"), "metavar": "OUT.jsonl"},
        "base_url": {"metavar": "URL"}, "api_key_env": {"metavar": "NAME"}})
    add_arguments(parser.add_argument_group("what to generate"), CaptionOptions,
                  ["task", "prompt_file", "raw_prompt", "seed", "detail", "response_format", "max_tokens",
                   "temperature", "limit"],
                  {"prompt_file": {"metavar": "FILE"}, "max_tokens": {"metavar": "N"}, "limit": {"metavar": "N"}})
    add_arguments(parser.add_argument_group("preference pairs (--task preference)"), CaptionOptions,
                  ["sampler_base_url", "sampler_model", "sampler_api_key_env", "samples", "sampler_temperature",
                   "sampler_max_tokens"],
                  {"sampler_base_url": {"metavar": "URL"}, "sampler_model": {"metavar": "NAME"},
                   "sampler_api_key_env": {"metavar": "NAME"}, "samples": {"metavar": "N"},
                   "sampler_max_tokens": {"metavar": "N"}})
    add_arguments(parser.add_argument_group("how to send"), CaptionOptions,
                  ["concurrency", "rpm", "timeout", "max_retries", "validation_retries", "retry_delay", "no_progress"],
                  {"concurrency": {"metavar": "N"}, "rpm": {"metavar": "N"}, "timeout": {"metavar": "S"},
                   "max_retries": {"metavar": "N"}, "validation_retries": {"metavar": "N"},
                   "retry_delay": {"metavar": "S"}})
    add_arguments(parser.add_argument_group("cost"), CaptionOptions, ["dry_run", "price", "price_table"],
                  {"price": {"metavar": "IN,OUT"}, "price_table": {"metavar": "FILE"}})
    add_arguments(parser.add_argument_group("batch API"), CaptionOptions,
                  ["batch", "batch_max_requests", "batch_max_bytes", "poll_interval"],
                  {"batch_max_requests": {"metavar": "N"}, "batch_max_bytes": {"metavar": "B"},
                   "poll_interval": {"metavar": "S"}})
    add_arguments(parser.add_argument_group("export"), CaptionOptions, ["export", "export_only", "dataset_name"],
                  {"dataset_name": {"metavar": "NAME"}})


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
    opts, problems = CaptionOptions.from_arguments(args)
    if opts is None:
        for problem in problems:
            log.error("error: %s", problem)
        return EXIT_USAGE
    if opts.export_only:
        return _export(opts)

    from data_gen import cost
    from data_gen.lock import OutputLockedError
    from data_gen.prompts import PromptFileError
    from data_gen.run import Job
    from data_gen.store import CorruptOutputError

    try:
        table = cost.load_price_table(opts.price_table) if opts.price_table else dict(cost.PRICES)
        price = cost.parse_price(opts.price) if opts.price else cost.find_price(opts.model, table)
    except cost.PriceTableError as exc:
        return _fail(str(exc))
    client_options = opts.client_options()
    try:
        job = Job.open(opts.run_options(), opts.model, dry_run=opts.dry_run)
    except (PromptFileError, CorruptOutputError, OutputLockedError, OSError) as exc:
        return _fail(str(exc))
    if opts.dry_run:
        sampler = opts.sampler_options()
        # The judge reads the drawn answers too: about half their budget each, 4 characters a token.
        answer_chars = sampler.samples * sampler.max_tokens * 2 if sampler else 0
        return _dry_run(job, client_options, price, opts.batch, answer_chars)

    api_key = os.environ.get(opts.api_key_env, "").strip()
    if not api_key:
        if not opts.base_url:
            job.close()
            return _fail(f"no API key: ${opts.api_key_env} is not set. Export it (export {opts.api_key_env}=...) or "
                         "name the variable that holds it with --api-key-env NAME.")
        log.warning("$%s is not set; sending the placeholder key 'EMPTY' to %s (fine for local servers without "
                    "auth)", opts.api_key_env, opts.base_url)
        api_key = "EMPTY"

    if opts.batch:
        from data_gen.batch import run_batch

        summary = run_batch(job, client_options, api_key, opts.api_key_env, opts.batch_options())
    else:
        from data_gen.batch import load_state
        from data_gen.run import run_online

        try:
            if load_state(opts.output):
                log.warning("batches submitted with --batch are still pending for %s; rerun with --batch to "
                            "collect them instead of paying for those images twice", opts.output)
        except ValueError as exc:
            log.warning("%s", exc)
        sampler_key = os.environ.get(opts.sampler_api_key_env, "").strip() or "EMPTY"
        summary = run_online(job, client_options, api_key, opts.api_key_env, opts.sampler_options(), sampler_key)

    usd = cost.cost(summary.prompt_tokens, summary.completion_tokens, price, opts.batch)
    for line in summary.lines(opts.output, usd):
        log.info("%s", line)
    if summary.fatal:
        log.error("stopped: %s", summary.fatal)
    if summary.interrupted:
        log.warning("interrupted: finished images are saved; rerun the same command to continue")
    if opts.export and not summary.fatal and not summary.interrupted:
        code = _export(opts)
        if code:
            return code
    return summary.exit_code


def _dry_run(job: Job, client_options: ClientOptions, price: Price | None, batch: bool,
             extra_prompt_chars: int = 0) -> int:
    from data_gen import cost

    sizes = [(img.width, img.height) for img in job.todo]
    task = job.task
    estimate = cost.estimate(sizes, client_options.detail, len(task.prompt_text()) + extra_prompt_chars,
                             task.expected_output_tokens,
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


def _export(opts: CaptionOptions) -> int:
    from data_gen.export import export
    from data_gen.store import CorruptOutputError

    for fmt in dict.fromkeys(opts.export):
        try:
            count, paths = export(opts.output, fmt, opts.image_dir, dataset_name=opts.dataset_name)
        except (CorruptOutputError, ValueError, OSError) as exc:
            return _fail(f"export {fmt}: {exc}")
        log.info("exported %d records as %s: %s", count, fmt, ", ".join(str(p) for p in paths))
    return 0
