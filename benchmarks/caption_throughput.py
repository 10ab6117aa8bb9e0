"""Caption throughput against the stub server: `python benchmarks/caption_throughput.py`.

Captions 500 tiny images through the real pipeline (scan, encode, openai client, validation, JSONL
output) against an OpenAI-compatible stub answering each request after 200 ms, at concurrency 16.
The stub runs in its own process, as a real server would, so it does not share the client's GIL.

Prints
  caption_vs_limit: throughput / (concurrency / latency)  -- target >= 0.90
  caption_vs_serial: throughput / one-request-at-a-time throughput, measured in the same run -- target >= 10
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from PIL import Image  # noqa: E402

from data_gen.client import ClientOptions  # noqa: E402
from data_gen.run import Job, RunOptions, run_online  # noqa: E402


def make_images(folder: Path, count: int) -> None:
    """`count` distinct small PNGs (distinct colours: identical files would be deduplicated)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = (i % 256, (i // 256) * 40 % 256, 200)
        Image.new("RGB", (96, 64), colour).save(folder / f"img{i:04d}.png")


def caption_rate(base_url: str, folder: Path, output: Path, concurrency: int, limit: int | None) -> tuple[int, float]:
    """(images captioned, seconds) for one run of the pipeline; scanning is not timed."""
    job = Job.open(RunOptions(folder, output, concurrency=concurrency, limit=limit, progress=False), "stub")
    start = time.perf_counter()
    summary = run_online(job, ClientOptions(model="stub", base_url=base_url, timeout=30), "sk-bench")
    elapsed = time.perf_counter() - start
    if summary.fatal or sum(summary.failed.values()):
        raise SystemExit(f"benchmark run failed: {summary.fatal or dict(summary.failed)}")
    return summary.done, elapsed


def main() -> None:
    """Run the benchmark and print the two ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="images for the concurrent run")
    parser.add_argument("--serial-images", type=int, default=25, help="images for the serial run (rate extrapolated)")
    parser.add_argument("--latency", type=float, default=0.2, help="stub latency per request, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import openai  # noqa: F401 - imported once up front so that neither timed run pays for it

    server = subprocess.Popen([sys.executable, "-m", "data_gen.testing.stub_server", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "images"
            make_images(folder, args.images)
            serial_done, serial_s = caption_rate(base_url, folder, Path(tmp) / "serial.jsonl", 1, args.serial_images)
            done, seconds = caption_rate(base_url, folder, Path(tmp) / "concurrent.jsonl", args.concurrency, None)
    finally:
        server.terminate()
        server.wait(timeout=10)

    rate, serial_rate = done / seconds, serial_done / serial_s
    limit = args.concurrency / args.latency
    print(f"images: {done} in {seconds:.2f}s at concurrency {args.concurrency}, latency {args.latency * 1000:.0f} ms")
    print(f"throughput: {rate:.1f} img/s; limit: {limit:.1f} img/s; serial: {serial_rate:.2f} img/s "
          f"({serial_done} images in {serial_s:.2f}s)")
    print(f"caption_vs_limit: {rate / limit:.3f}")
    print(f"caption_vs_serial: {rate / serial_rate:.2f}")


if __name__ == "__main__":
    main()
