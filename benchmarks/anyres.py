"""AnyRes cost: training step time and memory per image as the tile grid grows, against the fixed strategy.

    python benchmarks/anyres.py [--repeats 5]

The shapes of llava_setup.py (CLIP 6 x 256 at 224 px, 16 px patches: 196 tokens per view; Llama 4 x 256 with a
32k vocabulary), batch 8, captions of 32 tokens, a stage-1 step: the projector (and AnyRes' image_newline) trained,
tower and LLM frozen, the tower's output read from the feature cache as llava-kit trains (so the step is projector +
unpad/pool + LLM forward and backward + AdamW). Each configuration's batch holds 8 images of one size, chosen to
select one grid exactly (rows x cols x 224 px); best of `--repeats`, interleaved.

Configurations: `fixed` (mlp2x_gelu, one view, 196 tokens); AnyRes mlp2x_gelu at grids 1x1 to 3x3 (pinpoints
(1x1),...,(3x3): 196 + 14 rows x (14 cols + 1) tokens); and the pooling projector avgpool (2x2: 49 tokens per view) at
AnyRes with max_tokens_per_image 196, the fixed strategy's count, at grids 2x2 and 3x3.

Prints `step_anyres_RxC_vs_fixed` and `memory_anyres_RxC_vs_fixed` (memory: weights' gradients and AdamW states +
the activations saved for backward, counted with autograd hooks, per image), and `step_pooled_2x2_vs_fixed` (target
<= 1.3: the pooling projector at the fixed strategy's token count) and `step_pooled_3x3_vs_fixed`. Absolute figures
go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_setup import BATCH, build_workdir  # noqa: E402

from llava_kit.config import ModelConfig  # noqa: E402
from llava_kit.data.encode import encode_messages  # noqa: E402
from llava_kit.model.build import build_llava  # noqa: E402
from llava_kit.train.memory import saved_for_backward_bytes, trained_bytes  # noqa: E402

GRIDS = [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]
TILE = 224
CAPTION = " ".join(["a red circle on the white background"] * 5)


def build(paths: dict, projector: str, anyres: bool, cap: int | None = None):
    cfg = ModelConfig()
    cfg.vision.name_or_path, cfg.llm.name_or_path, cfg.projector.name = str(paths["vision"]), str(paths["llm"]), \
        projector
    if anyres:
        cfg.vision.image_strategy, cfg.vision.grid_pinpoints, cfg.vision.max_tokens_per_image = \
            "anyres", "(1x1),...,(3x3)", cap
    torch.manual_seed(0)
    model, tokenizer = build_llava(cfg)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if model.image_newline is not None:
        model.image_newline.requires_grad_(True)
    return model.train(), tokenizer


def batch_for(model, tokenizer, grid: tuple[int, int]) -> dict:
    """8 images of one size (the grid's resolution), their cached tower features and a 32-token caption each."""
    import random

    from llava_kit.demo.shapes import draw_shape_image

    rng = random.Random(0)
    size = (grid[0] * TILE, grid[1] * TILE)
    images = [draw_shape_image(rng, "circle", "red", size[1], size[0]) for _ in range(BATCH)]
    views = [v for image in images for v in (model.anyres.views(image) if model.anyres else [image])]
    with torch.no_grad():
        features = model.vision_tower.encode(model.vision_tower.preprocess(views))  # the feature cache's content
    messages = [{"role": "user", "content": "<image>\nDescribe the image."}, {"role": "assistant", "content": CAPTION}]
    counts = model.image_token_counts([size]) if model.anyres else model.tokens_per_image
    enc = encode_messages(messages, tokenizer, "plain", model.image_token_id, counts, None, n_images=1)
    batch = {"input_ids": torch.tensor([enc.input_ids] * BATCH), "labels": torch.tensor([enc.labels] * BATCH),
             "vision_features": features}
    if model.anyres:
        batch["image_sizes"] = torch.tensor([size] * BATCH)
    return batch


def saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward in one step (each storage once), plus gradients and AdamW states."""
    saved = saved_for_backward_bytes(model, batch)
    model.zero_grad(set_to_none=True)
    return saved + 3 * trained_bytes(model)


def step_seconds(model, batch, optimizer) -> float:
    start = time.perf_counter()
    loss = model(**batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="anyres-bench-"))
    paths = build_workdir(root)

    runs = {}  # name: (model, batch, optimizer, tokens per image)
    fixed, tokenizer = build(paths, "mlp2x_gelu", anyres=False)
    runs["fixed"] = (fixed, batch_for(fixed, tokenizer, (1, 1)), fixed.tokens_per_image)
    tiled, _ = build(paths, "mlp2x_gelu", anyres=True)
    for grid in GRIDS:
        runs[f"anyres_{grid[0]}x{grid[1]}"] = (tiled, batch_for(tiled, tokenizer, grid),
                                               tiled.image_token_counts([(grid[0] * TILE, grid[1] * TILE)])[0])
    pooled, _ = build(paths, "avgpool", anyres=True, cap=fixed.tokens_per_image)
    for grid in ((2, 2), (3, 3)):
        runs[f"pooled_{grid[0]}x{grid[1]}"] = (pooled, batch_for(pooled, tokenizer, grid),
                                               pooled.image_token_counts([(grid[0] * TILE, grid[1] * TILE)])[0])
    optimizers = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for m, _, _ in runs.values()}
    for model, batch, _ in runs.values():  # warm-up: allocator, kernels, AdamW states
        step_seconds(model, batch, optimizers[id(model)])
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, (model, batch, _) in runs.items():
            best[name] = min(best[name], step_seconds(model, batch, optimizers[id(model)]))
    memory = {name: saved_bytes(model, batch) for name, (model, batch, _) in runs.items()}

    print(f"{'configuration':<14} {'views':>5} {'tokens/img':>10} {'step ms':>8} {'ms/img':>7} {'MiB/img':>8}",
          file=sys.stderr)
    for name, (_, batch, tokens) in runs.items():
        views = batch["vision_features"].shape[0] // BATCH
        print(f"{name:<14} {views:>5} {tokens:>10} {1000 * best[name]:>8.1f} {1000 * best[name] / BATCH:>7.1f} "
              f"{memory[name] / BATCH / 2**20:>8.2f}", file=sys.stderr)
    for name in runs:
        if name.startswith("anyres_"):
            print(f"step_{name}_vs_fixed: {best[name] / best['fixed']:.2f}")
            print(f"memory_{name}_vs_fixed: {memory[name] / memory['fixed']:.2f}")
    for name in runs:
        if name.startswith("pooled_"):
            print(f"step_{name}_vs_fixed: {best[name] / best['fixed']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
