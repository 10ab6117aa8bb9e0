"""Packed multimodal batches: the same per-sample losses as padded ones, no attention across samples."""

from __future__ import annotations

import json

import pytest
import torch

from llava_kit.data.dataset import Collator
from llava_kit.data.encode import IGNORE_INDEX
from llava_kit.data.multimodal import build_dataset
from llava_kit.data.packing import PackedCollator, PackedLlavaDataset
from llava_kit.model.build import build_llava
from llava_kit.train.engine import train


@pytest.fixture
def model_and_data(make_config):
    cfg = make_config("packing", stage="sft", **{"data.feature_cache": "off"})
    torch.manual_seed(0)
    model, tokenizer = build_llava(cfg.model)
    model.eval()
    dataset = build_dataset(cfg, model, tokenizer)
    dataset.examples = dataset.examples[:3]
    return model, tokenizer, dataset


def only(labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    kept = torch.full_like(labels, IGNORE_INDEX)
    kept[:, start:end] = labels[:, start:end]
    return kept


def test_packed_and_padded_batches_give_the_same_per_sample_losses(model_and_data):
    model, tokenizer, dataset = model_and_data
    packed_dataset = PackedLlavaDataset(dataset, block_size=10**6)
    assert len(packed_dataset) == 1 and sorted(packed_dataset.blocks[0]) == [0, 1, 2]
    order = packed_dataset.blocks[0]
    packed = PackedCollator(tokenizer.pad_token_id)([packed_dataset[0]])
    padded = Collator(tokenizer.pad_token_id)([dataset[i] for i in order])
    assert "attention_mask" not in packed and packed["pixel_values"].shape[0] == padded["pixel_values"].shape[0]

    with torch.no_grad():
        start = 0
        for row, index in enumerate(order):
            n = len(dataset.examples[index].input_ids)
            assert packed["position_ids"][0, start].item() == 0  # positions restart at each sample
            packed_loss = model(**{**packed, "labels": only(packed["labels"], start, start + n)})["loss"]
            single = Collator(tokenizer.pad_token_id)([dataset[index]])
            padded_loss = model(**single)["loss"]
            torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-5)
            # and the padded batch row agrees too
            row_labels = torch.full_like(padded["labels"], IGNORE_INDEX)
            row_labels[row] = padded["labels"][row]
            torch.testing.assert_close(model(**{**padded, "labels": row_labels})["loss"], padded_loss,
                                       rtol=1e-4, atol=1e-5)
            start += n


def test_a_kv_cache_would_let_packed_samples_attend_across(model_and_data):
    """The trap the packed path avoids (transformers skips the packed mask when a cache is present)."""
    model, tokenizer, dataset = model_and_data
    packed_dataset = PackedLlavaDataset(dataset, block_size=10**6)
    packed = PackedCollator(tokenizer.pad_token_id)([packed_dataset[0]])
    with torch.no_grad():
        embeds = model.embed(packed["input_ids"], packed["pixel_values"])
        isolated = model.language_model(inputs_embeds=embeds, position_ids=packed["position_ids"],
                                        use_cache=False).logits
        leaky = model.language_model(inputs_embeds=embeds, position_ids=packed["position_ids"],
                                     use_cache=True).logits
    second = len(dataset.examples[packed_dataset.blocks[0][0]].input_ids)
    torch.testing.assert_close(isolated[:, :second], leaky[:, :second], rtol=1e-4, atol=1e-4)
    assert (isolated[:, second:] - leaky[:, second:]).abs().max() > 1e-3


def test_packed_multimodal_training_runs(make_config):
    run = train(make_config("packed-run", stage="sft", **{"data.packing": True, "train.max_steps": 3}))
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
