"""Serving throughput under concurrent clients: `llava-kit serve` with 16 clients at once against one at a time.

    python benchmarks/serve_throughput.py [--workdir DIR] [--clients 16] [--max-tokens 64] [--repeats 3]

Starts `llava-kit serve --no-webui` in its own process on a merged model of the benchmark shapes
(llava_setup.py: CLIP 6x256 at 224 px, Llama 4x256, vocabulary 32,000), then, in rounds that interleave the two
ways (a change of machine load falls on both alike), sends the same greedy requests (one image as a data URL + a
question, fixed max_tokens, the image and question varying across the requests of a round):
  - sequential: one client, one request at a time, `--clients` x `--per-client` requests;
  - concurrent: `--clients` client threads, each sending `--per-client` requests one after the other.
The server runs with `--max-batch-size` equal to the number of clients (serve's default is 8: 16 clients would be
answered in two batches).
Both ways send the same requests; each answer must be HTTP 200 and equal to the sequential one (greedy batching
must not change answers). Prints `serve_throughput_vs_sequential` = requests/s concurrent ÷ sequential, best
round of each (target >= 4 on 2 cores); the errors are counted and any error fails the benchmark.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_setup import build_merged  # noqa: E402

QUESTIONS = ["What shape is in the image?", "What color is the shape?", "Describe the image.",
             "What is the background colour?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, max_batch_size: int) -> subprocess.Popen:
    """`llava-kit serve` in its own process, answering once /health does."""
    import httpx

    command = [sys.executable, "-m", "llava_kit.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--no-webui", "--model-name", "bench", "--max-batch-size", str(max_batch_size)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"llava-kit serve exited with {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("llava-kit serve did not answer /health within 300 s")


def request_bodies(images: list[Path], n: int, max_tokens: int) -> list[bytes]:
    """`n` chat-completion bodies, JSON-encoded once (the clients only send them)."""
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
    bodies = []
    for i in range(n):
        content = [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                   {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        bodies.append(json.dumps({"model": "bench", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": max_tokens, "temperature": 0}).encode())
    return bodies


def send_all(url: str, bodies: list[bytes], clients: int) -> tuple[float, list[str | None]]:
    """Send `bodies` with `clients` threads (each a keep-alive connection taking the next body when it has its
    answer); returns (seconds, answers in body order: the text, or None where the request failed)."""
    import httpx

    answers: list[str | None] = [None] * len(bodies)
    errors: list[str] = []
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600, headers={"Content-Type": "application/json"}) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    response = http.post(url, content=bodies[i])
                    if response.status_code == 200:
                        answers[i] = response.json()["choices"][0]["message"]["content"]
                    else:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as err:
                    errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for error in errors[:3]:
        print(f"request failed: {error}", file=sys.stderr)
    return seconds, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="reuse the model here (default: temp)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--per-client", type=int, default=2, help="requests each concurrent client sends (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each way (best of)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the server's --max-batch-size (default: --clients, all answered together)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llava-kit-bench-"))
    model_dir = build_merged(workdir)
    images = sorted((workdir / "data" / "images").glob("*.png"))[:8]
    n = args.clients * args.per_client
    bodies = request_bodies(images, n, args.max_tokens)

    port = free_port()
    server = start_server(model_dir, port, args.max_batch_size or args.clients)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        send_all(url, bodies[:4], 4)  # warm-up: the first forward passes, the allocator, connection set-up
        sequential, concurrent, errors, mismatches = [], [], 0, 0
        reference = None
        for _ in range(args.repeats):
            seconds, answers = send_all(url, bodies, 1)
            sequential.append(seconds)
            reference = reference or answers
            errors += sum(a is None for a in answers)
            seconds, answers = send_all(url, bodies, args.clients)
            concurrent.append(seconds)
            errors += sum(a is None for a in answers)
            mismatches += sum(a is not None and r is not None and a != r
                              for a, r in zip(answers, reference, strict=True))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    sequential_rate, concurrent_rate = n / min(sequential), n / min(concurrent)
    print(f"serve: {n} requests (max_tokens {args.max_tokens}, one image each, --max-batch-size "
          f"{args.max_batch_size or args.clients}) in {min(sequential):.2f} s one at a "
          f"time ({sequential_rate:.2f} req/s), {min(concurrent):.2f} s from {args.clients} clients "
          f"({concurrent_rate:.2f} req/s), best of {args.repeats}; errors {errors}, answers differing from the "
          f"sequential ones {mismatches}", file=sys.stderr)
    print(f"serve_throughput_vs_sequential: {concurrent_rate / sequential_rate:.2f}")
    if errors or mismatches:
        print(f"serve_throughput: {errors} failed requests, {mismatches} answers changed by batching",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
