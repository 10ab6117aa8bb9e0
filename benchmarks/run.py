"""Run every benchmark in this folder and print their ratio lines: `python benchmarks/run.py [SCRIPT ...]`.

Each benchmark is a standalone script that measures llava-kit against a reference in the same run
and prints `name: ratio` lines; this runner executes them one after another (never in parallel: the
ratios would measure each other) and repeats the ratio lines at the end. Naming scripts runs only those
(`python benchmarks/run.py serve_throughput.py cold_start.py`). `gpu.py` is not among them: it needs a CUDA GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["caption_throughput.py", "stage1.py", "stage2.py", "decode.py", "serve_throughput.py", "cold_start.py",
              "anyres.py"]
RATIO_LINE = re.compile(r"^[a-z0-9_]+_vs_[a-z0-9_]+: [0-9.]+")


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    ratios, failed = [], []
    for name in names or BENCHMARKS:
        print(f"== {name}", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, str(HERE / name)], capture_output=True, text=True)
        sys.stderr.write(result.stderr)
        sys.stdout.write(result.stdout)
        if result.returncode != 0:
            failed.append(name)
        ratios += [line for line in result.stdout.splitlines() if RATIO_LINE.match(line)]
    print("\n".join(ratios))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
