"""torchrun + DeepSpeed ZeRO-2/3 through the engine on CPU (gloo): two real processes (slow: compiles a
small DeepSpeed extension on first use)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_torchrun(tmp_path, zero):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions")}
    out = tmp_path / zero
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llava_kit.cli", "train",
         "configs/tiny/pretrain.yaml", f"output_dir={out}", f"train.deepspeed=configs/deepspeed/{zero}.json",
         "train.max_steps=4", "train.logging_steps=1"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)  # printed once, by rank 0
    logs = [ast.literal_eval(line[line.index("{"):]) for line in result.stderr.replace("\r", "\n").splitlines()
            if "{'loss'" in line]
    return out, [float(log["loss"]) for log in logs]


@pytest.mark.slow
def test_zero2_and_zero3_under_torchrun(tmp_path):
    out2, losses2 = run_torchrun(tmp_path, "zero2")
    out3, losses3 = run_torchrun(tmp_path, "zero3")
    assert len(losses2) == 4 and losses2[-1] < losses2[0]
    assert losses2 == pytest.approx(losses3, abs=1e-3)  # same data, same math, different sharding
    assert 5.0 < losses2[0] < 8.0  # a per-token mean, not scaled by the number of processes
    for out in (out2, out3):
        assert (out / "projector.safetensors").is_file() and (out / "loss.png").is_file()
