"""A short supervised pretraining of the demo's tiny random vision tower, before it is frozen.

A real LLaVA tower (CLIP, SigLIP) arrives pretrained: its patch features already say what is where.
A tiny random tower does not, and the projector + LLM then have to learn vision from scratch, which
on a CPU takes far longer than the demo's budget (shape questions stayed near 0.5-0.7 accuracy after
10 minutes). So the demo gives its tower a warm-up of its own, on the *training* split only: the
features of the layer LLaVA reads (`feature_layer`, CLS dropped) are max-pooled and a linear head
names the shape and colour. The head is then thrown away and the tower saved like any checkpoint.
The held-out images are never seen.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from llava_kit.data.images import load_image, prepare_image
from llava_kit.demo.shapes import COLORS, SHAPES
from llava_kit.model.vision import build_vision_tower

logger = logging.getLogger(__name__)


def labels_from_caption(caption: str) -> tuple[int, int]:
    """(shape index, colour index) named by a shapes caption such as "A red circle on a white background."."""
    shape = next(i for i, s in enumerate(SHAPES) if re.search(rf"\b{s}\b", caption))
    color = next(i for i, c in enumerate(COLORS) if re.search(rf"\b{c}\b", caption))
    return shape, color


def warm_up_tower(tower_dir: str | Path, images: list[Path], labels: list[tuple[int, int]], steps: int, lr: float,
                  batch_size: int, image_aspect: str = "resize", seed: int = 0) -> float:
    """Train the tower in `tower_dir` (in place) to name shape and colour; returns the last-100-step accuracy."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tower = build_vision_tower(str(tower_dir))
    # The images are small and few: preprocess them once, [n, 3, S, S].
    pixels = torch.cat([tower.preprocess([prepare_image(load_image(p), image_aspect, tower.image_mean)])
                        for p in tqdm(images, desc="warm-up: images", unit="img", dynamic_ncols=True)])
    shape_labels = torch.tensor([s for s, _ in labels])
    color_labels = torch.tensor([c for _, c in labels])
    head = nn.Sequential(nn.LayerNorm(tower.width), nn.Linear(tower.width, len(SHAPES) + len(COLORS)))
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    tower.train()
    recent = []
    for _ in tqdm(range(steps), desc="warm-up: tower", unit="step", dynamic_ncols=True):
        index = torch.tensor([rng.randrange(len(images)) for _ in range(batch_size)])
        features = tower.encode(pixels[index])  # [batch, n_patches, width]
        logits = head(features.amax(dim=1))  # max-pool: a shape is where its edges are, wherever that is
        shape_logits, color_logits = logits[:, : len(SHAPES)], logits[:, len(SHAPES):]
        loss = F.cross_entropy(shape_logits, shape_labels[index]) + F.cross_entropy(color_logits, color_labels[index])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        recent = (recent + [(shape_logits.argmax(-1) == shape_labels[index]).float().mean().item()])[-100:]
    tower.eval()
    tower.save_pretrained(tower_dir)
    accuracy = sum(recent) / max(len(recent), 1)
    logger.info("tower warm-up: %d steps, training shape accuracy (last 100 steps) %.2f", steps, accuracy)
    return accuracy
