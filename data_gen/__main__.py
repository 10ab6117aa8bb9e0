"""`python -m data_gen IMAGE_DIR -o OUT.jsonl --model NAME`: the caption command without llava_kit's CLI."""

import argparse
import sys

from data_gen.cli import add_caption_arguments, run_caption


def main(argv: list[str] | None = None) -> int:
    """Parse the caption arguments and run; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m data_gen",
        description="Caption every image under IMAGE_DIR with a vision chat API into LLaVA JSONL; resumable.",
    )
    add_caption_arguments(parser)
    return run_caption(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
