"""Where a resolution task's information is: probes of a frozen tower's features, fixed view against AnyRes views.

    .venv/bin/python scripts/probe_views.py --tower runs/compare-small/prepared/models/vision \\
        --min-side 256 --max-side 320 --size 0.06 0.10 --equal-area --grid-pinpoints anyres_max_16

Draws a fresh shapes dataset (1,600 training and 400 held-out canvases by default), encodes every canvas with the
tower as each strategy sees it (fixed: the canvas squashed into the tower's input; AnyRes: the base view and its
tiles), pools the patch features over every view and token (max or mean) and fits a logistic-regression probe of the
shape. A third probe reads the tokens as the LLM does, in the simplest form: the patch map of every view pooled 2x2
(the avgpool projector's tokens, average or max), learned queries with a softmax over the tokens, and a linear read of
what they gather. Printed: held-out shape accuracy per strategy and pooling (chance 0.25). A high max-pooled accuracy
with a low mean-pooled one says the shape is in a few tokens of many: what the LLM's attention then has to find; the
attention probe says how well a softmax-weighted mean can find and read it (docs/high-resolution.md).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from llava_kit.demo.shapes import SHAPES, ShapeSize, write_shapes_dataset
from llava_kit.model.anyres import AnyRes
from llava_kit.model.projector_pooling import AvgPoolProjector
from llava_kit.model.vision import build_vision_tower


def encode(tower, anyres: AnyRes, data: dict, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled features {strategy-pooling: [n, width]}, the 2x2-pooled tokens of every view
    {strategy-{average,max}2x2-tokens: [n, tokens, width]} (zero-padded to the longest canvas) and shape labels [n]
    of one split."""
    if split == "eval":
        records = {r["image"]: r["shape"] for r in map(json.loads, Path(data["eval"]).read_text().splitlines())}
    else:
        records = {r["image"]: next(s for s in SHAPES if f" {s} " in r["conversations"][1]["value"])
                   for r in json.loads(Path(data["pretrain"]).read_text())}
    features: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "fixed-max", "fixed-mean", "anyres-max", "anyres-mean",
        *(f"{strategy}-{mode}2x2-tokens" for mode in AvgPoolProjector.POOL_MODES for strategy in ("fixed", "anyres")))}
    for image_path in tqdm(records, desc=f"probe: {split}", unit="img"):
        views = anyres.views(Image.open(Path(data["images"]) / image_path).convert("RGB"))
        with torch.no_grad():
            tokens = tower.encode(tower.preprocess(views))  # [views, patches, width]; views[0] is the whole canvas
        features["fixed-max"].append(tokens[0].amax(0))
        features["fixed-mean"].append(tokens[0].mean(0))
        features["anyres-max"].append(tokens.amax((0, 1)))
        features["anyres-mean"].append(tokens.mean((0, 1)))
        side = math.isqrt(tokens.shape[1])
        patch_map = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)  # [views, width, side, side]
        for mode, pool in AvgPoolProjector.POOL_MODES.items():  # the avgpool projector's own pooling, stride 2
            pooled = pool(patch_map, math.ceil(side / 2)).flatten(2).transpose(1, 2)  # [views, tokens per view, width]
            features[f"fixed-{mode}2x2-tokens"].append(pooled[0])
            features[f"anyres-{mode}2x2-tokens"].append(pooled.reshape(-1, pooled.shape[-1]))
    labels = torch.tensor([SHAPES.index(shape) for shape in records.values()])
    return {name: pad_sequence(rows, batch_first=True) if name.endswith("tokens") else torch.stack(rows)
            for name, rows in features.items()}, labels


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   steps: int = 500) -> float:
    """Held-out accuracy of a logistic regression (standardised features, a little L2) fitted on `train`."""
    mean, std = train.mean(0), train.std(0) + 1e-5
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(train.shape[1], len(SHAPES), requires_grad=True)
    bias = torch.zeros(len(SHAPES), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(train @ weight + bias, train_labels) + 1e-3 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ((test @ weight + bias).argmax(1) == test_labels).float().mean().item()


def attention_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                             test_labels: torch.Tensor, queries: int = 4, steps: int = 1500) -> float:
    """Held-out accuracy of learned attention pooling (`queries` softmaxes over the tokens [n, tokens, width]) and a
    linear read of the gathered features, fitted on `train`. Padding tokens are zero and masked out."""
    flat = train[train.abs().sum(-1) > 0]
    mean, std = flat.mean(0), flat.std(0) + 1e-5
    torch.manual_seed(0)
    score = torch.nn.Linear(train.shape[-1], queries)
    read = torch.nn.Linear(train.shape[-1] * queries, len(SHAPES))
    optimizer = torch.optim.Adam([*score.parameters(), *read.parameters()], lr=3e-3)

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        padding = tokens.abs().sum(-1, keepdim=True) == 0  # [n, tokens, 1]
        tokens = (tokens - mean) / std
        weights = score(tokens).masked_fill(padding, float("-inf")).softmax(1)  # [n, tokens, queries]
        return read(torch.einsum("ntq,ntc->nqc", weights, tokens).flatten(1))

    for _ in range(steps):
        batch = torch.randint(0, len(train), (64,))
        loss = F.cross_entropy(logits(train[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (logits(test).argmax(1) == test_labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", required=True, help="a vision tower directory (e.g. a comparison's prepared tower)")
    parser.add_argument("--grid-pinpoints", default="anyres_max_16")
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--aspect", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    parser.add_argument("--size", type=float, nargs=2, default=(0.06, 0.10), metavar=("LOW", "HIGH"),
                        help="the shape's diameter as a fraction of the short side")
    parser.add_argument("--equal-area", action="store_true")
    parser.add_argument("--n-train", type=int, default=1600)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tower = build_vision_tower(args.tower).eval()
    # the projector's numbers do not matter to the views (AnyRes.views only tiles the image)
    anyres = AnyRes.build(tower.image_size, args.grid_pinpoints, view_tokens=1, token_grid=(1, 1))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_dataset(tmp, args.n_train, args.n_eval, seed=args.seed, min_side=args.min_side,
                                    max_side=args.max_side, aspect=tuple(args.aspect) if args.aspect else None,
                                    size=ShapeSize(*args.size, equal_area=args.equal_area))
        train, train_labels = encode(tower, anyres, data, "train")
        test, test_labels = encode(tower, anyres, data, "eval")
    print("held-out shape accuracy of each probe (chance 0.25):")
    for name in train:
        probe = attention_probe_accuracy if name.endswith("tokens") else probe_accuracy
        label = name.replace("-tokens", ": attention")
        print(f"  {label:29s} {probe(train[name], train_labels, test[name], test_labels):.3f}")


if __name__ == "__main__":
    main()
