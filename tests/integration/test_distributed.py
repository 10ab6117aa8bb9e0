"""torchrun / accelerate launch + DeepSpeed ZeRO-2/3 through the engine on CPU (gloo): two real processes end
where one process with the same global batch ends (slow: DeepSpeed compiles a small extension on first use)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_support import zero3_partitioning_everything
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
GLOBAL_BATCH = 8


def train(out: Path, config: str, *overrides: str, launcher: str = "python", processes: int = 1) -> list[float]:
    """Run `llava-kit train` under a launcher; returns the logged losses (printed by rank 0 only)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions"),
           "LLAVA_KIT_HOME": str(out.parent / "home")}
    prefix = {
        "python": [sys.executable, "-m", "llava_kit.cli"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "-m", "llava_kit.cli"],
        # ENVIRONMENT.md: `--cpu` alone silently runs one process; --multi_gpu with the Trainer's use_cpu gives two.
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                       str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "llava_kit.cli"],
    }[launcher]
    micro_batch = GLOBAL_BATCH // processes
    result = subprocess.run(
        [*prefix, "train", config, f"output_dir={out}", f"train.max_steps={STEPS}", "train.logging_steps=1",
         f"train.micro_batch_size={micro_batch}", *overrides],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)  # printed once, by rank 0
    logs = [ast.literal_eval(line[line.index("{"):]) for line in result.stderr.replace("\r", "\n").splitlines()
            if "{'loss'" in line]
    assert len(logs) == STEPS, result.stderr[-3000:]
    return [float(log["loss"]) for log in logs]


def assert_same_tensors(file_a: Path, file_b: Path, atol: float) -> None:
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].numel() > 0 and a[name].shape == b[name].shape, name  # whole tensors, not empty partitions
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.slow
def test_pretrain_two_processes_zero2_and_zero3_end_with_the_single_process_projector(tmp_path):
    config = "configs/tiny/pretrain.yaml"
    single = train(tmp_path / "single", config)
    zero2 = train(tmp_path / "zero2", config, "train.deepspeed=configs/deepspeed/zero2.json",
                  launcher="torchrun", processes=2)
    zero3 = train(tmp_path / "zero3", config, f"train.deepspeed={zero3_partitioning_everything(tmp_path)}",
                  launcher="torchrun", processes=2)
    assert single[-1] < single[0]
    assert 5.0 < single[0] < 8.0  # a per-token mean, not scaled by the number of processes
    assert zero2 == pytest.approx(single, abs=1e-3) and zero3 == pytest.approx(single, abs=1e-3)
    for run in ("zero2", "zero3"):
        assert_same_tensors(tmp_path / "single" / "projector.safetensors", tmp_path / run / "projector.safetensors",
                            atol=1e-5)
    # ZeRO-3 partitioned every weight: the provenance record still fingerprints the tower and the LLM, gathered whole
    single_spec = json.loads((tmp_path / "single" / "projector.json").read_text())
    zero3_spec = json.loads((tmp_path / "zero3" / "projector.json").read_text())
    assert zero3_spec["trained_with"]["identity"] == single_spec["trained_with"]["identity"] is not None


@pytest.mark.slow
def test_anyres_pretrain_under_zero3_ends_with_the_single_process_projector_and_newline(tmp_path):
    """AnyRes under ZeRO-3 with every weight partitioned: the tiles' views, image_newline (a parameter of the
    composite itself, gathered for the forward pass and for saving) and the projector end as one process ends."""
    config = "configs/tiny/pretrain.yaml"
    anyres = ("model.vision.image_strategy=anyres", "model.vision.grid_pinpoints=anyres_max_3",
              "model.projector.name=avgpool", "data.max_seq_len=512")
    single = train(tmp_path / "single", config, *anyres)
    zero3 = train(tmp_path / "zero3", config, *anyres, f"train.deepspeed={zero3_partitioning_everything(tmp_path)}",
                  launcher="torchrun", processes=2)
    assert zero3 == pytest.approx(single, abs=1e-3)
    assert_same_tensors(tmp_path / "single" / "projector.safetensors", tmp_path / "zero3" / "projector.safetensors",
                        atol=1e-5)
    assert "image_newline" in load_file(str(tmp_path / "zero3" / "projector.safetensors"))


@pytest.mark.slow
def test_sft_lora_under_accelerate_launch_zero3_saves_the_whole_adapter(tmp_path):
    config = "configs/tiny/sft.yaml"
    single = train(tmp_path / "single", config)
    zero3 = train(tmp_path / "zero3", config, f"train.deepspeed={zero3_partitioning_everything(tmp_path)}",
                  launcher="accelerate", processes=2)
    assert zero3 == pytest.approx(single, abs=1e-3)
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        assert_same_tensors(tmp_path / "single" / name, tmp_path / "zero3" / name, atol=1e-5)


@pytest.mark.slow
def test_text_pt_full_under_torchrun_zero3_saves_the_whole_llm(tmp_path):
    corpus = tmp_path / "corpus.txt"
    shapes = [(c, s) for c in ("red", "blue", "green", "purple") for s in ("circle", "square", "star", "triangle")]
    corpus.write_text("\n\n".join(f"the {c} {s} sits on a white page, number {i}." for i, (c, s) in
                                    enumerate(shapes * 6)))  # ~100 documents: >= 3 global batches of blocks
    config = tmp_path / "text_pt.yaml"
    config.write_text(f"""stage: text-pt
model:
  llm: {{name_or_path: "tiny:llm"}}
  trainable: {{llm: full}}
data: {{path: "{corpus}", max_seq_len: 32}}
train: {{learning_rate: 1.0e-3, save_steps: 1000, report_to: none, use_cpu: true, lr_scheduler: constant}}
""")
    single = train(tmp_path / "single", str(config))
    zero3 = train(tmp_path / "zero3", str(config), f"train.deepspeed={zero3_partitioning_everything(tmp_path)}",
                  launcher="torchrun", processes=2)
    assert zero3 == pytest.approx(single, abs=1e-3)
    assert_same_tensors(tmp_path / "single" / "llm" / "model.safetensors",
                        tmp_path / "zero3" / "llm" / "model.safetensors", atol=1e-4)
