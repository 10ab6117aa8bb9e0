"""`llava-kit caption` options: one schema model (data_gen/options.py) gives the flags, their help and the checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_gen.cli import add_caption_arguments
from data_gen.options import CaptionOptions

FLAGS = ["IMAGE_DIR", "-o/--output", "--model", "--base-url", "--api-key-env", "--task", "--prompt-file",
         "--raw-prompt", "--seed", "--detail", "--response-format", "--max-tokens", "--temperature", "--limit",
         "--sampler-base-url", "--sampler-model", "--sampler-api-key-env", "--samples", "--sampler-temperature",
         "--sampler-max-tokens", "--concurrency", "--rpm", "--timeout", "--max-retries", "--validation-retries", "--retry-delay",
         "--no-progress", "--dry-run", "--price", "--price-table", "--batch", "--batch-max-requests",
         "--batch-max-bytes", "--poll-interval", "--export", "--export-only", "--dataset-name"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-kit caption")
    add_caption_arguments(parser)
    return parser


def test_every_flag_comes_from_a_documented_field():
    actions = [a for a in _parser()._actions if a.dest != "help"]
    assert ["/".join(a.option_strings) or a.metavar for a in actions] == FLAGS
    for action in actions:
        assert action.help.startswith(CaptionOptions.model_fields[action.dest].description)


def test_checked_options_build_the_pipelines_options(tmp_path: Path):
    args = _parser().parse_args([str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--raw-prompt",
                                 "--prompt-file", __file__, "--rpm", "30", "--no-progress", "--export", "sharegpt"])
    options, problems = CaptionOptions.from_arguments(args)
    assert problems == [] and options.export == ["sharegpt"]
    run, client, batch = options.run_options(), options.client_options(), options.batch_options()
    assert run.image_dir == tmp_path and run.rpm == 30 and run.progress is False and run.raw_prompt
    assert client.model == "m" and client.response_format == "text"  # --raw-prompt reads plain text
    assert (batch.max_requests, batch.max_bytes, batch.poll_interval) == (50_000, 200_000_000, 30.0)


def test_bounds_and_cross_checks_are_reported_together(tmp_path: Path):
    args = _parser().parse_args([str(tmp_path / "missing"), "-o", str(tmp_path / "o.jsonl"), "--concurrency", "0",
                                 "--batch-max-bytes", "10", "--poll-interval", "0", "--batch", "--rpm", "5",
                                 "--raw-prompt"])
    options, problems = CaptionOptions.from_arguments(args)
    assert options is None
    assert problems == [
        "--concurrency 0: must be at least 1",
        "--batch-max-bytes 10: must be at least 1024",
        "--poll-interval 0.0: must be a positive number",
        f"IMAGE_DIR {tmp_path / 'missing'} is not a folder: give the folder holding the images",
        "--model is required: name the vision model, e.g. --model gpt-4o-mini",
        "--raw-prompt sends the text of --prompt-file as it is: give --prompt-file too",
        "--rpm does not apply to --batch (the Batch API has its own limits): drop one of them",
    ]
