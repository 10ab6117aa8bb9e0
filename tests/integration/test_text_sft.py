"""`text-sft`: the Lumen identity config trains, merges into a transformers model, chats without an image,
and the merged model is the LLM of a pretrain run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_support import zero3_partitioning_everything

from llava_kit.cli import main
from llava_kit.config import load_config
from llava_kit.train.engine import train

REPO = Path(__file__).resolve().parents[2]

IDENTITY = REPO / "configs" / "tiny" / "text_sft_identity.yaml"
HELD_OUT = (REPO / "assets" / "identity" / "heldout.txt").read_text().splitlines()


def chat(model, prompt, capsys) -> str:
    capsys.readouterr()
    assert main(["chat", "--model", str(model), "--prompt", prompt, "--max-new-tokens", "24"]) == 0
    return capsys.readouterr().out.strip()


def test_held_out_phrasings_are_not_in_the_training_set():
    questions = {json.loads(line)["messages"][0]["content"].lower()
                 for line in (REPO / "assets" / "identity" / "lumen.jsonl").read_text().splitlines()}
    assert len(questions) >= 30 and HELD_OUT and not questions & {q.lower() for q in HELD_OUT}


def test_identity_sft_merge_chat_and_pretrain_on_top(tiny_dirs, tmp_path, capsys, make_config, monkeypatch):
    """A faster variant of the shipped recipe (full fine-tuning, 35 steps) through the same code."""
    monkeypatch.chdir(REPO)  # the config's data path is repo-relative
    cfg = load_config(IDENTITY, [f"output_dir={tmp_path / 'lumen'}", f"model.llm.name_or_path={tiny_dirs['llm']}",
                                 "model.trainable.llm=full", "train.max_steps=35", "train.micro_batch_size=8",
                                 "train.learning_rate=2e-3"])
    run_dir = train(cfg)
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["kept"] == 80 and report["skipped"] == 0

    assert main(["merge", str(run_dir), "-o", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()  # plain transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)

    assert "Lumen" not in chat(tiny_dirs["llm"], "Who are you?", capsys)  # the untrained model
    for prompt in ["Who are you?", *HELD_OUT]:
        assert "Lumen" in chat(merged, prompt, capsys), prompt
    assert "Lumen" in chat(run_dir, "What name do you go by?", capsys)  # the run directory chats too

    # a text-only model refuses images with a clear message
    assert main(["chat", "--model", str(merged), "--image", str(REPO / "assets/shapes_small/images/eval/000000.png"),
                 "--prompt", "What is this?"]) == 2
    assert "text-only model" in capsys.readouterr().err

    # the merged text-sft model is the LLM of a pretrain run
    pretrain = train(make_config("pretrain-on-lumen", **{"model.llm.name_or_path": str(merged), "train.max_steps": 2}))
    assert (pretrain / "projector.safetensors").is_file()
    assert json.loads((pretrain / "projector.json").read_text())["trained_with"]["llm"] == str(merged)


@pytest.mark.slow
def test_identity_recipe_as_a_user_runs_it(tmp_path):
    """The issue's commands verbatim: train the shipped config, merge, chat; LoRA, 60 steps (~1 min)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cli = [sys.executable, "-m", "llava_kit.cli"]

    def run(*args):
        done = subprocess.run([*cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip()

    run("train", str(IDENTITY), f"output_dir={tmp_path / 'lumen'}")
    run("merge", str(tmp_path / "lumen"), "-o", str(tmp_path / "merged"))
    assert "Lumen" not in run("chat", "--model", "tiny:llm", "--prompt", "Who are you?", "--max-new-tokens", "24")
    for prompt in ["Who are you?", *HELD_OUT]:
        assert "Lumen" in run("chat", "--model", str(tmp_path / "merged"), "--prompt", prompt), prompt


@pytest.mark.slow
def test_text_sft_under_torchrun_zero3_builds_the_token_cache_once(tmp_path):
    """Two processes start together: one tokenises, the other reads its cache entry; ZeRO-3 saves a whole adapter."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAVA_KIT_HOME": str(tmp_path / "home"),
           "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions")}
    out = tmp_path / "z3"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llava_kit.cli", "train",
         str(IDENTITY), f"output_dir={out}", "train.max_steps=3", "data.packing=true",
         f"train.deepspeed={zero3_partitioning_everything(tmp_path)}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("(token cache: miss)") == 1 and done.stderr.count("(token cache: hit)") == 1
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not empty ZeRO-3 partitions
