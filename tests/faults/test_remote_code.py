"""A model directory's own Python code runs only when asked (--trust-remote-code / model.llm.trust_remote_code)."""

from __future__ import annotations

import json
import shutil

import pytest

from llava_kit.cli import main
from llava_kit.errors import ModelLoadError
from llava_kit.loader import open_model_dir

PLANTED = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")  # what an attacker's module would do on import

from transformers import LlamaConfig, LlamaForCausalLM


class PlantedConfig(LlamaConfig):
    model_type = "planted_llm"


class PlantedForCausalLM(LlamaForCausalLM):
    config_class = PlantedConfig
'''


@pytest.fixture
def planted(tiny_dirs, tmp_path):
    """A copy of the tiny LLM whose config.json points to a module of its own (auto_map) that leaves a marker."""
    model_dir = tmp_path / "downloaded"
    shutil.copytree(tiny_dirs["llm"], model_dir)
    marker = tmp_path / "marker"
    (model_dir / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="planted_llm", architectures=["PlantedForCausalLM"],
                  auto_map={"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedForCausalLM"})
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir, marker


def test_a_directory_with_its_own_code_is_refused_and_its_code_never_runs(planted, capsys, tmp_path):
    model_dir, marker = planted
    questions = tmp_path / "eval.jsonl"
    questions.write_text(json.dumps({"question": "Who are you?", "answer": "Lumen."}) + "\n")
    with pytest.raises(ModelLoadError, match="needs its own Python code .* pass --trust-remote-code"):
        open_model_dir(model_dir)
    for command in (["chat", "--model", str(model_dir), "--prompt", "hi"],
                    ["eval", "--model", str(model_dir), "--data", str(questions), "--image-root", str(tmp_path)]):
        assert main(command) == 2
        assert "--trust-remote-code" in capsys.readouterr().err
    assert not marker.exists(), "the planted module ran without --trust-remote-code"


def test_with_the_flag_the_code_is_allowed(planted):
    model_dir, marker = planted
    loaded = open_model_dir(model_dir, trust_remote_code=True)
    assert marker.read_text() == "ran" and type(loaded.model).__name__ == "PlantedForCausalLM"


def test_a_run_trained_with_remote_code_needs_the_flag_again(tmp_path, tiny_dirs):
    from llava_kit.config import config_from_dict, save_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = config_from_dict({"stage": "text-sft", "output_dir": str(run),
                            "model": {"llm": {"name_or_path": str(tiny_dirs["llm"]), "trust_remote_code": True}},
                            "data": {"path": "x.jsonl", "template": "chatml"}}, check_paths=False)
    save_config(cfg, run / "config.yaml")
    with pytest.raises(ModelLoadError, match="trust_remote_code .* pass --trust-remote-code"):
        open_model_dir(run)
