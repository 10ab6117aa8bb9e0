"""LoRA variants and training tricks through peft and transformers, on tiny models: each changes what it should."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llava_kit.modality import modality_for_stage
from llava_kit.train.engine import train, training_arguments
from llava_kit.train.trainer import LlavaTrainer


@pytest.fixture
def text_data(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Name shape {i}.", "output": "A red square."}) + "\n"
                            for i in range(8)))
    return {"data.path": str(path), "data.image_root": "", "train.micro_batch_size": 4}


def built(cfg):
    return modality_for_stage(cfg.stage).build_for_training(cfg, "fp32", None, False)


def test_freeze_tuning_trains_the_last_layers_and_named_modules_only(make_config, text_data, tiny_dirs):
    cfg = make_config("freeze", stage="text-sft", **text_data, **{
        "model.trainable.llm": "freeze", "model.freeze.train_layers": 1, "model.freeze.train_modules": ["lm_head"],
        "train.max_steps": 2})
    llm, _ = built(cfg)
    trained = {n.split(".weight")[0].split(".bias")[0] for n, p in llm.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.3.", "lm_head")) for n in trained), trained
    assert not hasattr(llm, "peft_config")  # no LoRA
    run_dir = train(cfg)
    saved, base = load_file(str(run_dir / "llm" / "model.safetensors")), load_file(
        str(tiny_dirs["llm"] / "model.safetensors"))
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(saved[name.format(0)], base[name.format(0)])  # frozen layer unchanged
    assert not torch.equal(saved[name.format(3)], base[name.format(3)])  # the trained one moved


def test_freeze_names_a_missing_module(make_config, text_data):
    from llava_kit.errors import ConfigError

    cfg = make_config("freeze", stage="text-sft", **text_data, **{
        "model.trainable.llm": "freeze", "model.freeze.train_modules": ["lm_hed"]})
    with pytest.raises(ConfigError, match="no module 'lm_hed'"):
        built(cfg)


@pytest.mark.parametrize("optim, expected", [("adafactor", "Adafactor"), ("sgd", "SGD"), ("adamw_torch", "AdamW")])
def test_the_optimizer_class_is_the_one_asked_for(make_config, optim, expected):
    cfg = make_config("opt", stage="sft", **{"train.optim": optim})
    model, _ = built(cfg)
    trainer = LlavaTrainer(model=model, args=training_arguments(cfg, "fp32"),
                           projector_learning_rate=cfg.train.projector_learning_rate)
    assert type(trainer.create_optimizer()).__name__ == expected


def test_loraplus_puts_the_b_matrices_at_ratio_times_the_learning_rate(make_config):
    cfg = make_config("loraplus", stage="sft", **{"model.lora.loraplus_lr_ratio": 16.0,
                                                  "train.projector_learning_rate": 5e-3})
    model, _ = built(cfg)
    trainer = LlavaTrainer(model=model, args=training_arguments(cfg, "fp32"),
                           projector_learning_rate=cfg.train.projector_learning_rate, loraplus_lr_ratio=16.0)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    lr = cfg.train.learning_rate
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = 5e-3 if name.startswith("multi_modal_projector.") else 16 * lr if "lora_B" in name else lr
            assert lr_of[id(p)] == pytest.approx(want), name


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_from_the_same_function_and_save_the_llm_whole(make_config, text_data, init):
    from llava_kit.model.build import load_llm

    cfg = make_config(init, stage="text-sft", **text_data, **{"model.lora.init": init, "train.max_steps": 1})
    llm, _ = built(cfg)
    base = load_llm(cfg.model.llm.name_or_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    b = next(p for n, p in llm.named_parameters() if "lora_B" in n)
    assert b.abs().sum() > 0  # peft's init, not LoRA's zero B
    assert torch.allclose(llm(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)  # same function
    run_dir = train(cfg)
    assert (run_dir / "llm" / "model.safetensors").is_file() and not (run_dir / "adapter").exists()


def test_neftune_noises_the_embeddings_while_training_only(make_config, text_data):
    """Through a real run: the decoder's input differs from the plain embeddings during training steps, equals them
    at evaluation and after training (the Trainer removes its hook)."""
    cfg = make_config("neftune", stage="text-sft", **text_data, **{"train.neftune_noise_alpha": 5.0,
                                                                   "train.max_steps": 1})
    llm, tokenizer = built(cfg)
    seen = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((module.training, hidden.detach().clone(), kwargs.get("position_ids")))

    base = llm.get_base_model()
    base.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    modality = modality_for_stage(cfg.stage)
    dataset = modality.build_dataset(cfg, llm, tokenizer, torch.device("cpu"))
    from llava_kit.data.dataset import Collator

    trainer = LlavaTrainer(model=llm, args=training_arguments(cfg, "fp32"), train_dataset=dataset,
                           data_collator=Collator(tokenizer.pad_token_id))
    embed = base.get_input_embeddings()
    batches = []
    original = trainer.training_step

    def step(model, inputs, *args):
        batches.append(inputs["input_ids"].clone())
        return original(model, inputs, *args)

    trainer.training_step = step
    trainer.train()
    training = [h for mode, h, _ in seen if mode]
    assert training and not torch.allclose(training[0], embed(batches[0]), atol=1e-6)
    noise = (training[0] - embed(batches[0])).abs().max().item()
    dims = batches[0].shape[1] * embed.weight.shape[1]
    assert noise <= 5.0 / dims ** 0.5 + 1e-6  # NEFTune's bound: alpha / sqrt(seq x dim)
    seen.clear()
    llm.eval()
    with torch.no_grad():
        llm(input_ids=batches[0])
    assert torch.equal(seen[0][1], embed(batches[0]))
