"""`text-pt`: the LLM alone on raw text, loss on every token; its output is the LLM of a pretrain run."""

from __future__ import annotations

import json

import pytest
import torch

from llava_kit.config import config_from_dict
from llava_kit.data.dataset import BadRecordError
from llava_kit.model.build import load_llm, load_tokenizer
from llava_kit.train.engine import train


def text_config(tiny_dirs, tmp_path, data_path, bad_records="skip", **train):
    return config_from_dict({
        "stage": "text-pt", "output_dir": str(tmp_path / "text-pt"),
        "model": {"llm": {"name_or_path": str(tiny_dirs["llm"])}, "trainable": {"llm": "full"}},
        "data": {"path": str(data_path), "max_seq_len": 64, "bad_records": bad_records},
        "train": {"micro_batch_size": 8, "max_steps": 30, "learning_rate": 3e-3, "logging_steps": 5,
                  "report_to": "none", "use_cpu": True, "lr_warmup_ratio": 0.0, **train},
    })


def test_text_pt_learns_captions_and_feeds_a_pretrain_run(tiny_dirs, tmp_path, make_config):
    captions = [f"A {c} {s} on a white background." for c in ("red", "blue", "green") for s in ("circle", "star")]
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"text": c}) + "\n" for c in captions * 10) + "{broken\n")
    run_dir = train(text_config(tiny_dirs, tmp_path, data))

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["kept"] == 60 and report["skipped"] == 1  # the broken line, reported
    assert report["datasets"][0]["in_mixture"] == 60  # packed (the text-pt default) into blocks of max_seq_len

    # a plain transformers model directory that ends its captions with EOS
    llm, tokenizer = load_llm(str(run_dir / "llm")), load_tokenizer(str(run_dir / "llm"))
    prompt = torch.tensor([[tokenizer.bos_token_id, *tokenizer("A red", add_special_tokens=False)["input_ids"]]])
    out = llm.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.eos_token_id in out[0, prompt.shape[1]:].tolist()
    untrained = load_llm(str(tiny_dirs["llm"])).generate(prompt, max_new_tokens=20, do_sample=False,
                                                        pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.eos_token_id not in untrained[0, prompt.shape[1]:].tolist()  # the untrained model runs on

    # `merge` of a text run gives the same plain transformers model
    from llava_kit.export.merge import merge_run
    merged = merge_run(run_dir, tmp_path / "merged-text")
    assert torch.equal(load_llm(str(merged))(prompt).logits, llm(prompt).logits)

    # chat without an image continues the prompt as plain text, and stops at EOS
    from llava_kit.inference import ChatSession, SamplingParams, answer_once
    from tests.support import open_for_chat

    session = ChatSession(*open_for_chat(merged), SamplingParams(max_new_tokens=30))
    assert session.settings.template == "completion"
    answer = answer_once(session, None, "A red")
    assert answer and "background" in answer and len(tokenizer(answer)["input_ids"]) < 30, answer

    # ... and the LLM of a pretrain run
    pretrain_dir = train(make_config("pretrain-on-text-pt", **{"model.llm.name_or_path": str(run_dir / "llm"),
                                                              "train.max_steps": 2}))
    assert (pretrain_dir / "projector.safetensors").is_file()


def test_text_pt_strict_policy_stops_on_bad_lines(tiny_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(BadRecordError, match="missing or empty `text`"):
        train(text_config(tiny_dirs, tmp_path, data, bad_records="error", max_steps=1))
