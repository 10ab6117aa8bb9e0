"""The `llava-kit` command: one entry point, subcommand -> function.

Heavy libraries (torch, transformers) are imported inside the functions that need them, so
`llava-kit --help` and `llava-kit caption ...` start fast.
"""

from __future__ import annotations

import argparse
import sys


def _add_caption(sub: argparse._SubParsersAction) -> None:
    from data_gen.cli import add_caption_arguments

    parser = sub.add_parser(
        "caption",
        help="turn an image folder into LLaVA training data through an OpenAI-compatible vision API",
        description="Caption every image under IMAGE_DIR with a vision chat API into LLaVA JSONL; resumable.",
    )
    add_caption_arguments(parser)
    parser.set_defaults(handler=_run_caption)


def _run_caption(args: argparse.Namespace) -> int:
    from data_gen.cli import run_caption

    return run_caption(args)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand (cheap: no torch import)."""
    parser = argparse.ArgumentParser(
        prog="llava-kit",
        description="Build LLaVA-style vision-language models: data, pretrain, SFT, merge, chat.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_caption(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen subcommand; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
