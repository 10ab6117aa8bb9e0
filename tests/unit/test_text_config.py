"""Text-stage config checks, LoRA options (rsLoRA, DoRA), the QLoRA message, and `datasets` hub names."""

import json
import sys
import types

import pytest
import torch

from llava_kit.config import ConfigError, LoraConfig, config_from_dict


def text_cfg(tmp_path, stage="text-sft", **data):
    return {"stage": stage, "output_dir": str(tmp_path / "run"), "model": {"llm": {"name_or_path": "tiny:llm"}},
            "data": {"template": "chatml", **data}}


def test_text_data_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(text_cfg(tmp_path, path="a.jsonl", format="text", datasets=[
            {"path": "b.jsonl", "wieght": 2}, {"path": "c.jsonl", "weight": 0}, {"format": "alpaca"}, 5, "e.jsonl"]),
            check_paths=False)
    text = str(err.value)
    assert "`data.format` 'text' is not read by stage `text-sft`" in text
    assert "either `data.path` or `data.datasets`" in text
    assert "unknown key `data.datasets[0].wieght`; did you mean `weight`?" in text
    assert "`data.datasets[1].weight` must be a number > 0" in text
    assert "`data.datasets[2].path` is missing" in text and "`data.datasets[3]` must be a mapping" in text


def test_text_sft_needs_a_chat_template_and_multimodal_packing_is_opt_in(tmp_path):
    with pytest.raises(ConfigError, match="needs a chat template"):
        config_from_dict(text_cfg(tmp_path, path="a.jsonl", template="plain"), check_paths=False)
    multimodal = {"stage": "sft", "output_dir": "x", "model": {"vision": {"name_or_path": "tiny:vision"},
                  "llm": {"name_or_path": "tiny:llm"}}, "data": {"path": "a.json", "image_root": "i"}}
    assert config_from_dict(multimodal, check_paths=False).data.packing is False
    multimodal["data"]["packing"] = True
    assert config_from_dict(multimodal, check_paths=False).data.packing is True


def test_packing_defaults_on_for_text_pt_only(tmp_path):
    assert config_from_dict(text_cfg(tmp_path, "text-pt", path="a.txt"), check_paths=False).data.packing is True
    assert config_from_dict(text_cfg(tmp_path, path="a.jsonl"), check_paths=False).data.packing is False


def test_hub_names_pass_the_path_check_but_missing_files_do_not(tmp_path):
    config_from_dict(text_cfg(tmp_path, path="tatsu-lab/alpaca"))
    with pytest.raises(ConfigError, match="'missing.jsonl' does not exist"):
        config_from_dict(text_cfg(tmp_path, path="missing.jsonl"))


def test_hub_dataset_without_the_datasets_library_gives_a_clear_message(tiny_tokenizer, monkeypatch):
    from llava_kit.config import DataConfig
    from llava_kit.data.text import build_text_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the `datasets` library: pip install datasets"):
        build_text_dataset(DataConfig(path="tatsu-lab/alpaca", template="chatml", cache=False), "text-sft",
                           tiny_tokenizer)


def test_hub_dataset_records_go_through_the_same_readers(tiny_tokenizer, monkeypatch):
    from llava_kit.config import DataConfig
    from llava_kit.data.text import build_text_dataset

    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return [{"instruction": "Say hi.", "input": "", "output": "Hi!"}, {"instruction": "x", "output": ""}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = DataConfig(datasets=[{"path": "someone/alpaca-like", "split": "train[:2]", "subset": "en"}],
                      template="chatml", cache=False)
    dataset = build_text_dataset(data, "text-sft", tiny_tokenizer)
    assert calls == [("someone/alpaca-like", "en", "train[:2]")]
    assert len(dataset) == 1 and dataset.report.reasons() == {"empty answer": 1}


def test_rslora_and_dora_are_peft_options(tiny_dirs):
    from peft import get_peft_model

    from llava_kit.model.build import load_llm
    from llava_kit.model.trainable import peft_lora_config

    model = get_peft_model(load_llm(str(tiny_dirs["llm"])),
                           peft_lora_config(LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert not any("lm_head" in n for n in names)  # all-linear leaves the LM head alone


@pytest.mark.parametrize("stage", ["text-sft", "sft"])
def test_qlora_without_gpu_or_bitsandbytes_stops_with_a_clear_message(tmp_path, stage, capsys, monkeypatch):
    import torch

    from llava_kit.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = text_cfg(tmp_path, stage, path=str(tmp_path / "a.jsonl"))
    if stage == "sft":
        cfg["model"]["vision"] = {"name_or_path": "tiny:vision"}
        cfg["data"]["image_root"] = str(tmp_path)
    cfg["model"]["trainable"] = {"llm": "qlora"}
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.trainable.llm=qlora loads the LLM in 4 bits, which needs a CUDA GPU" in err
    assert "use model.trainable.llm=lora" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_qlora_quantization_is_nf4_with_double_quantization():
    import torch

    from llava_kit.model.trainable import qlora_quantization_config

    q = qlora_quantization_config(torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16



def test_qlora_on_cpu_or_with_zero3_is_refused_up_front(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the shipped DeepSpeed configs
    cfg = text_cfg(tmp_path, path="a.jsonl")
    cfg["model"]["trainable"] = {"llm": "qlora"}
    cfg["train"] = {"use_cpu": True, "deepspeed": "configs/deepspeed/zero3.json"}
    with pytest.raises(ConfigError) as err:
        config_from_dict(cfg, check_paths=False)
    assert "qlora needs a CUDA GPU but `train.use_cpu` is true" in str(err.value)
    assert "qlora with ZeRO-3 (configs/deepspeed/zero3.json) is not supported" in str(err.value)
    cfg["train"] = {"deepspeed": "configs/deepspeed/zero2.json"}
    assert config_from_dict(cfg, check_paths=False).model.trainable.llm == "qlora"


def test_qlora_code_path_with_the_4bit_load_stubbed(tmp_path, tiny_dirs, monkeypatch):
    """Everything of a QLoRA run but the 4-bit load (no GPU here): k-bit preparation, LoRA, saving, merging."""
    import llava_kit.model.trainable as trainable
    import llava_kit.train.engine as engine
    from llava_kit.export.merge import merge_run

    monkeypatch.setattr(engine, "check_qlora_available", lambda: None)
    monkeypatch.setattr(trainable, "qlora_settings", lambda mode, precision: (torch.float32, None))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Who are you?"},
                                             {"role": "assistant", "content": "I am Lumen."}]}) + "\n")
    cfg = text_cfg(tmp_path, path=str(data))
    cfg["model"] = {"llm": {"name_or_path": str(tiny_dirs["llm"])}, "trainable": {"llm": "qlora"},
                    "lora": {"r": 4, "alpha": 8, "use_dora": True}}
    cfg["train"] = {"max_steps": 2, "micro_batch_size": 1, "report_to": "none", "logging_steps": 1}
    run_dir = engine.train(config_from_dict(cfg))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    merged = merge_run(run_dir, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
