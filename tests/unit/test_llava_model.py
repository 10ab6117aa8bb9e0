"""The composite model: any causal LM family, loss at labelled positions equals the full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from llava_kit.config import ModelConfig
from llava_kit.data.encode import IGNORE_INDEX
from llava_kit.model.build import build_llava

FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256},
    "gemma": {"head_dim": 16},
}


def save_tiny_llm(family, out_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = FAMILIES[family]
    base = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}
    config = AutoConfig.for_model(family, **(extra if family == "gpt2" else {**base, **extra}))
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_any_causal_lm_family(family, tiny_dirs, tmp_path):
    llm_dir = save_tiny_llm(family, tmp_path / family, tiny_dirs["llm"])
    cfg = ModelConfig()
    cfg.vision.name_or_path = str(tiny_dirs["vision"])
    cfg.llm.name_or_path = str(llm_dir)
    model, tokenizer = build_llava(cfg)
    n_img = model.tokens_per_image
    assert n_img == 64  # 64 px / 8 px patches, CLS dropped

    # two samples, the first with two images, the second with one; labels on a few text positions
    text = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    image = [model.image_token_id] * n_img
    rows = [image + text + image + text, image + text + text]
    width = max(map(len, rows))
    input_ids = torch.full((2, width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
    labels = torch.where((input_ids != model.image_token_id) & (attention_mask == 1), input_ids, IGNORE_INDEX)
    pixel_values = torch.randn(3, 3, 64, 64)

    with torch.no_grad():
        ours = model(input_ids, attention_mask, pixel_values, labels)["loss"]
        logits = model(input_ids, attention_mask, pixel_values).logits  # full-vocabulary reference
        reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                    ignore_index=IGNORE_INDEX)
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)
    # the Trainer's token-weighted form: the sum over this batch's tokens / the global token count
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        weighted = model(input_ids, attention_mask, pixel_values, labels, num_items_in_batch=torch.tensor(2 * n))
    assert torch.allclose(weighted["loss"], reference / 2, atol=1e-5)

    # the image really reaches the LLM: other pixels, other logits at the text positions
    with torch.no_grad():
        other = model(input_ids, attention_mask, pixel_values + 1.0).logits
    assert not torch.allclose(logits, other)


def test_image_token_row_is_the_mean_of_the_old_rows(tiny_dirs):
    from llava_kit.model.build import load_llm

    cfg = ModelConfig()
    cfg.vision.name_or_path = str(tiny_dirs["vision"])
    cfg.llm.name_or_path = str(tiny_dirs["llm"])
    model, tokenizer = build_llava(cfg)
    base = load_llm(str(tiny_dirs["llm"])).get_input_embeddings().weight
    grown = model.language_model.get_input_embeddings().weight
    assert grown.shape[0] == base.shape[0] + 1 == len(tokenizer)
    assert torch.allclose(grown[-1], base.mean(0)) and torch.equal(grown[:-1], base)


def test_placeholder_count_mismatch_is_a_clear_error(tiny_dirs):
    cfg = ModelConfig()
    cfg.vision.name_or_path = str(tiny_dirs["vision"])
    cfg.llm.name_or_path = str(tiny_dirs["llm"])
    model, _ = build_llava(cfg)
    input_ids = torch.tensor([[model.image_token_id] * 10])
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model(input_ids, pixel_values=torch.randn(1, 3, 64, 64))
