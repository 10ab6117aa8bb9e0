"""Shared set-up of the stage-1 and decode benchmarks: models, data and the transformers reference.

The shapes of issue 7: a CLIP tower of 6 layers x 256 at 224 px with 16 px patches (196 patch tokens),
a Llama of 4 layers x 256 with a 32,000-token vocabulary, batch 8, captions of 16-48 tokens. All random
(no downloads); the tokenizer is the tiny locally trained BPE, its ids all fall inside the 32k rows.

The reference is transformers' `LlavaForConditionalGeneration` holding the *same* weights as
llava-kit's model: tower, projector (mlp2x_gelu = linear_1, GELU, linear_2) and LLM.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path

import torch

N_SAMPLES = 96
BATCH = 8
VOCAB = 32_000


def build_workdir(root: Path, n_samples: int = N_SAMPLES) -> dict:
    """Write vision/, llm/ and data/ under `root` (once); returns their paths."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava_kit.demo.shapes import COLORS, SHAPES, draw_spec, random_spec
    from llava_kit.testing.tiny import build_tiny_tokenizer

    paths = {"vision": root / "vision", "llm": root / "llm", "data": root / "data" / "pretrain.json",
             "images": root / "data" / "images"}
    if paths["data"].is_file():
        return paths
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=256, num_hidden_layers=6,
                                              num_attention_heads=4, intermediate_size=1024, projection_dim=256))
    vision.save_pretrained(paths["vision"])
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        paths["vision"])
    tokenizer = build_tiny_tokenizer(1024)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])

    rng = random.Random(0)
    # Each of these words is one token of the tiny tokenizer (after a space), so a caption of 16-48 words is
    # 16-48 tokens, as issue 7 specifies (words of several tokens made captions of 20-83 tokens).
    words = ("a red blue green circle square triangle star on the white gray background image shape colour picture "
             "of in and").split()
    paths["images"].mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_samples):
        spec = random_spec(rng, rng.choice(SHAPES), rng.choice(list(COLORS)), min_side=224, max_side=224)
        draw_spec(rng, spec).save(paths["images"] / f"{i:04d}.png")
        caption = " ".join(rng.choice(words) for _ in range(rng.randint(16, 48)))  # 16-48 tokens
        records.append({"id": str(i), "image": f"{i:04d}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]})
    paths["data"].write_text(json.dumps(records))
    return paths


def stage1_config(paths: dict, output_dir: Path, cache_dir: Path, **train) -> dict:
    """The llava-kit stage-1 run on the benchmark data (a config dict for `config_from_dict`)."""
    return {
        "stage": "pretrain", "output_dir": str(output_dir), "seed": 0,
        "model": {"vision": {"name_or_path": str(paths["vision"]), "feature_layer": -2, "select_strategy": "patch"},
                  "llm": {"name_or_path": str(paths["llm"])}, "projector": {"name": "mlp2x_gelu"}},
        "data": {"path": str(paths["data"]), "image_root": str(paths["images"]), "template": "plain",
                 "image_aspect": "resize", "max_seq_len": 1024, "feature_cache_dir": str(cache_dir)},
        "train": {"micro_batch_size": BATCH, "num_epochs": 1, "learning_rate": 1e-3, "logging_steps": 1000,
                  "save_steps": 100_000, "report_to": "none", "use_cpu": True, "lr_warmup_ratio": 0.0,
                  "lr_scheduler": "constant", **train},
    }


def reference_loader(config: dict):
    """(llava-kit's model built from run-config dict `config`, a DataLoader of its data): the reference loops'
    batches, llava-kit's tokenisation, images decoded every step, padded to the longest, shuffled with a fixed seed."""
    from torch.utils.data import DataLoader

    from llava_kit.config import config_from_dict
    from llava_kit.data.dataset import Collator
    from llava_kit.data.multimodal import build_dataset
    from llava_kit.model.build import build_llava

    cfg = config_from_dict(config)
    model, tokenizer = build_llava(cfg.model)
    dataset = build_dataset(cfg, model, tokenizer)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=Collator(tokenizer.pad_token_id))
    return model, loader


def reference_from(model):
    """transformers' LlavaForConditionalGeneration with the same weights as llava-kit's `model`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tower, projector, llm = model.vision_tower, model.multi_modal_projector, model.language_model
    config = LlavaConfig(vision_config=tower.vision_model.config, text_config=llm.config,
                         image_token_id=model.image_token_id, vision_feature_layer=tower.feature_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=tower.num_tokens)
    reference = LlavaForConditionalGeneration(config).eval()
    reference.model.vision_tower.load_state_dict(tower.vision_model.state_dict())
    reference.model.multi_modal_projector.linear_1.load_state_dict(projector[0].state_dict())
    reference.model.multi_modal_projector.linear_2.load_state_dict(projector[2].state_dict())
    reference.model.language_model.load_state_dict(llm.model.state_dict())
    reference.lm_head.load_state_dict(llm.lm_head.state_dict())
    reference.generation_config.pad_token_id = llm.config.pad_token_id
    return reference


def build_merged(root: Path) -> Path:
    """A merged model directory (`llava-kit merge`'s output) of the benchmark shapes, chatml-prompted, under `root`
    (once): what `llava-kit chat` and `llava-kit serve` load. One sft step with the LLM frozen: random weights."""
    merged = root / "merged"
    if (merged / "llava_kit.json").is_file():
        return merged
    # The Trainer (and DeepSpeed, on import) print to stdout: the benchmarks' stdout is for their ratio lines.
    with contextlib.redirect_stdout(sys.stderr):
        from llava_kit.config import config_from_dict
        from llava_kit.export.merge import merge_run
        from llava_kit.train.engine import train

        paths = build_workdir(root)
        cfg = stage1_config(paths, root / "merged-run", root / "merged-cache", max_steps=1)
        cfg["stage"] = "sft"
        cfg["model"]["trainable"] = {"llm": "frozen", "projector": "full"}
        cfg["data"]["template"] = "chatml"
        return merge_run(train(config_from_dict(cfg), overwrite=True), merged)
