"""Start-up of `llava-kit chat --prompt` against the floor of importing torch and transformers.

    python benchmarks/cold_start.py [--workdir DIR] [--repeats 5]

Wall time of a fresh process running `llava-kit chat --model DIR --image X --prompt Q --max-new-tokens 8` on a
merged model of the benchmark shapes (llava_setup.py: CLIP 6x256 at 224 px, Llama 4x256, vocabulary 32,000),
against `python -c "import torch, transformers"`, both as subprocesses, interleaved, best of `--repeats` after
one unmeasured run of each (the page cache). A short answer (8 tokens): what is measured is the start-up, not
the decoding (decode.py measures that).

Prints `chat_cold_start_vs_floor` = chat ÷ floor (target <= 1.5). On stderr, with it, the seconds of a third
process, `from transformers import PreTrainedModel, LlamaForCausalLM, CLIPVisionModel` (what any process that
builds a transformers model imports; transformers 5 imports torch.distributed.tensor and torch._dynamo with
modeling_utils), so that the ratio splits into what transformers costs and what llava-kit adds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_setup import build_merged  # noqa: E402

FLOOR = "import torch, transformers"
MODEL_FLOOR = "import torch; from transformers import PreTrainedModel, LlamaForCausalLM, CLIPVisionModel"


def llava_kit_command() -> list[str]:
    """The installed `llava-kit` script beside this interpreter, else `python -m llava_kit.cli`."""
    script = Path(sys.executable).with_name("llava-kit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llava_kit.cli"]


def seconds(command: list[str]) -> float:
    """Wall time of one run of `command` (it must succeed)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="reuse the model here (default: temp)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (best of)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llava-kit-bench-"))
    model_dir = build_merged(workdir)
    image = workdir / "data" / "images" / "0000.png"
    commands = {
        "chat": [*llava_kit_command(), "chat", "--model", str(model_dir), "--image", str(image), "--prompt",
                 "What shape is in the image?", "--max-new-tokens", "8"],
        "floor": [sys.executable, "-c", FLOOR],
        "model floor": [sys.executable, "-c", MODEL_FLOOR],
    }
    for command in commands.values():  # unmeasured: files into the page cache
        seconds(command)
    best = dict.fromkeys(commands, float("inf"))
    for _ in range(args.repeats):  # interleaved: a change of machine load falls on every command alike
        for name, command in commands.items():
            best[name] = min(best[name], seconds(command))
    print(f"cold start seconds (best of {args.repeats}): llava-kit chat {best['chat']:.2f}, "
          f"python -c {FLOOR!r} {best['floor']:.2f}, python -c {MODEL_FLOOR!r} {best['model floor']:.2f}",
          file=sys.stderr)
    print(f"chat_cold_start_vs_floor: {best['chat'] / best['floor']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
