"""The demo: synthetic shapes -> tiny models -> text-pt -> pretrain -> sft -> merge -> eval, offline, on a CPU.

    llava-kit demo [--workdir demo_workdir]

Every stage runs through the code a user runs: the configs are written into WORKDIR/configs and
trained with the same `train()` as `llava-kit train`, merged with `llava-kit merge`'s function and
scored with `llava-kit eval`'s (answers come from the chat code path). Steps:

1. data      WORKDIR/data: train images with captions (pretrain.json) and QA (sft.json), eval.jsonl
2. models    WORKDIR/models: a tiny random CLIP vision tower and a tiny random Llama + BPE tokenizer
3. warm-up   the tiny tower gets a short supervised pretraining on the train split (tower_warmup.py
             says why: it stands in for CLIP's pretraining), then stays frozen
4. text-pt   the tiny LLM learns the training captions as plain text (stage `text-pt`), standing in
             for a real LLM's language pretraining; without it projector-only training has nothing to
             steer (its loss stays at ~5.6)
5. pretrain  projector only (tower and LLM frozen), `plain` template: image -> caption
6. sft       projector + the full tiny LLM, `chatml` template: the three questions per image
7. merge     WORKDIR/merged, a standalone model for `llava-kit chat`
8. eval      held-out images, each question in a fresh conversation (batched greedy generation: the
             same answers as one by one); prints accuracy per question kind and, last, `accuracy: X.XX`
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from llava_kit.testing.tiny import TinyLLMSpec, TinyVisionSpec

logger = logging.getLogger(__name__)


@dataclass
class DemoRecipe:
    """Every number of the demo. Chosen by measurement: see docs/demo.md."""

    n_train: int = 6000
    n_eval: int = 100
    """Held-out images; each is asked the three questions."""
    vision: TinyVisionSpec = field(default_factory=lambda: TinyVisionSpec(
        image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=512))
    llm: TinyLLMSpec = field(default_factory=lambda: TinyLLMSpec(
        vocab_size=600, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=320, max_position_embeddings=512))
    image_aspect: str = "resize"
    warmup_steps: int = 800
    warmup_lr: float = 2e-3
    warmup_batch_size: int = 64
    text_pt_steps: int = 200
    text_pt_lr: float = 1e-3
    text_pt_batch_size: int = 32
    pretrain_steps: int = 200
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 32
    sft_steps: int = 1400
    sft_lr: float = 1e-3
    sft_projector_lr: float = 1e-3
    sft_batch_size: int = 16
    seed: int = 0
    aspect: tuple[float, float] | None = None
    """The task's canvases: None, the demo's own (sides 96-256 px drawn apart); (low, high), the long side low..high
    times the short one, wide or tall (the high-resolution task, docs/high-resolution.md). The tower's warm-up, which
    stands in for its pretraining, always sees the demo's own images."""
    min_side: int = 96
    max_side: int = 256
    """The task's canvas sides (or short sides with `aspect`) are drawn from min_side..max_side pixels."""
    size_fraction: tuple[float, float] = (0.3, 0.6)
    """The shape's diameter as a fraction of the canvas's short side: (0.3, 0.6) the demo's; small values with large
    canvases make the small-shapes task (`small`), where the fixed strategy's 32 px squash leaves a shape a few
    pixels wide."""
    equal_area: bool = False
    """Draw the four shapes with the same area (`ShapeSize.equal_area`): only their outline tells them apart."""
    projector: str = "mlp2x_gelu"
    projector_options: dict = field(default_factory=dict)
    image_strategy: str = "fixed"
    """model.vision.image_strategy of pretrain and sft (`anyres`: `grid_pinpoints`, `max_tokens_per_image`)."""
    grid_pinpoints: str | None = None
    max_tokens_per_image: int | None = None

    @classmethod
    def quick(cls) -> DemoRecipe:
        """A few steps of everything: checks the pipeline end to end in about a minute (accuracy stays low)."""
        return cls(n_train=96, n_eval=8, warmup_steps=10, text_pt_steps=5, pretrain_steps=5, sft_steps=10)

    def shortened(self) -> DemoRecipe:
        """This recipe with `quick()`'s data sizes and step counts (its task, models and strategy kept)."""
        quick = asdict(DemoRecipe.quick())
        return dataclasses.replace(self, **{k: quick[k] for k in ("n_train", "n_eval", "warmup_steps",
                                                                  "text_pt_steps", "pretrain_steps", "sft_steps")})

    @classmethod
    def wide(cls, quick: bool = False) -> DemoRecipe:
        """`llava-kit demo --task wide`: shapes on canvases 2:1 to 3:1, read by AnyRes (the image's tiles on a 32 px
        tower) through the 2x2-pooling avgpool projector; docs/high-resolution.md has the measurements."""
        recipe = cls(n_train=3000, n_eval=100, aspect=(2.0, 3.0), projector="avgpool", image_strategy="anyres",
                     grid_pinpoints="anyres_max_3", sft_steps=600)
        return recipe.shortened() if quick else recipe

    @classmethod
    def small(cls, quick: bool = False) -> DemoRecipe:
        """`llava-kit demo --task small`: a shape of the area of a circle 6-10% of a 256-320 px canvas across (the four
        shapes of equal area), read by AnyRes at up to 4x4 tiles (each tile shows the shape about as large as the
        tower's warm-up saw shapes; squashed whole into 32 px it is 2-3 px wide) through the 2x2-pooling avgpool
        projector; docs/high-resolution.md has the measurements."""
        recipe = cls(n_train=3000, n_eval=100, min_side=256, max_side=320, size_fraction=(0.06, 0.10),
                     equal_area=True, projector="avgpool", image_strategy="anyres", grid_pinpoints="anyres_max_16",
                     sft_steps=1500, sft_lr=2e-3, sft_projector_lr=2e-3)
        return recipe.shortened() if quick else recipe

    def vision_settings(self) -> dict:
        """The model.vision keys of the image strategy (none for the fixed one: the configs stay as they were)."""
        if self.image_strategy == "fixed":
            return {}
        return {"image_strategy": self.image_strategy, "grid_pinpoints": self.grid_pinpoints,
                "max_tokens_per_image": self.max_tokens_per_image}


def write_configs(recipe: DemoRecipe, workdir: Path, data: dict, models: dict) -> dict[str, Path]:
    """Write the configs the demo trains with (users can rerun them with `llava-kit train`)."""
    common_train = {"lr_scheduler": "cosine", "lr_warmup_ratio": 0.05, "logging_steps": 50, "save_steps": 100000,
                     "save_total_limit": 1, "report_to": "none", "use_cpu": True, "weight_decay": 0.0}
    text_pt = {
        "stage": "text-pt", "output_dir": str(workdir / "runs" / "text-pt"), "seed": recipe.seed,
        "model": {"llm": {"name_or_path": str(models["llm"])}, "trainable": {"llm": "full"}},
        "data": {"path": str(data["captions"]), "max_seq_len": 64, "packing": False},  # the recipe docs/demo.md measured
        "train": {**common_train, "micro_batch_size": recipe.text_pt_batch_size, "max_steps": recipe.text_pt_steps,
                  "learning_rate": recipe.text_pt_lr},
    }
    # pretrain and sft use the text-pretrained LLM: a plain transformers model directory
    common_model = {"vision": {"name_or_path": str(models["vision"]), "feature_layer": -2, "select_strategy": "patch",
                               **recipe.vision_settings()},
                    "llm": {"name_or_path": str(workdir / "runs" / "text-pt" / "llm")},
                    "projector": {"name": recipe.projector, **({"options": dict(recipe.projector_options)}
                                                               if recipe.projector_options else {})}}
    # AnyRes images take more tokens (a wide image's tiles): room for the longest at the default pinpoints
    max_seq_len = 256 if recipe.image_strategy == "fixed" else 1024
    data_common = {"image_root": str(data["images"]), "image_aspect": recipe.image_aspect, "max_seq_len": max_seq_len}
    pretrain = {
        "stage": "pretrain", "output_dir": str(workdir / "runs" / "pretrain"), "seed": recipe.seed,
        "model": common_model,
        "data": {**data_common, "path": str(data["pretrain"]), "template": "plain"},
        "train": {**common_train, "micro_batch_size": recipe.pretrain_batch_size, "max_steps": recipe.pretrain_steps,
                  "learning_rate": recipe.pretrain_lr},
    }
    sft = {
        "stage": "sft", "output_dir": str(workdir / "runs" / "sft"), "seed": recipe.seed,
        "model": {**common_model, "init_from": pretrain["output_dir"],
                  "trainable": {"vision": "frozen", "projector": "full", "llm": "full"}},
        "data": {**data_common, "path": str(data["sft"]), "template": "chatml", "system_prompt": ""},
        "train": {**common_train, "micro_batch_size": recipe.sft_batch_size, "max_steps": recipe.sft_steps,
                  "learning_rate": recipe.sft_lr, "projector_learning_rate": recipe.sft_projector_lr},
    }
    paths = {}
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    for name, cfg in (("text-pt", text_pt), ("pretrain", pretrain), ("sft", sft)):
        paths[name] = workdir / "configs" / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def write_caption_corpus(pretrain_json: Path, out: Path) -> Path:
    """The training captions as a text-pt corpus (JSONL `text`): the LLM learns the words before the images."""
    records = json.loads(pretrain_json.read_text())
    out.write_text("".join(json.dumps({"text": r["conversations"][1]["value"]}) + "\n" for r in records))
    return out


def _stage(name: str, timings: dict):
    """Context manager that logs a stage banner and records its duration."""
    from contextlib import contextmanager

    @contextmanager
    def timed():
        logger.info("=== demo: %s ===", name)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start
        logger.info("=== demo: %s done in %.0f s ===", name, timings[name])

    return timed()


def prepare_shapes(recipe: DemoRecipe, workdir: str | Path, timings: dict | None = None) -> dict:
    """Steps 1-4 of the demo (data, tiny models, tower warm-up, text-pt) in `workdir`, and the demo's configs.

    Returns the paths: `images`, `pretrain`, `sft`, `eval`, `captions` (data), `vision` (the warmed-up tower),
    `llm` (the text-pretrained LLM) and `configs` ({text-pt, pretrain, sft} YAML files). `llava-kit
    compare-projectors` reuses it to prepare the models every projector is compared on.
    """
    import torch

    from llava_kit.config import load_config
    from llava_kit.demo.shapes import ShapeSize, write_shapes_dataset
    from llava_kit.demo.tower_warmup import labels_from_caption, warm_up_tower
    from llava_kit.testing.tiny import init_tiny
    from llava_kit.train.engine import train

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {} if timings is None else timings
    torch.manual_seed(recipe.seed)
    with _stage("data", timings):
        aspect = tuple(recipe.aspect) if recipe.aspect else None
        size = ShapeSize(*recipe.size_fraction, equal_area=recipe.equal_area)
        own_images = aspect is None and size == ShapeSize() and (recipe.min_side, recipe.max_side) == (
            DemoRecipe.min_side, DemoRecipe.max_side)
        data = write_shapes_dataset(workdir / "data", recipe.n_train, recipe.n_eval, seed=recipe.seed,
                                    min_side=recipe.min_side, max_side=recipe.max_side, aspect=aspect, size=size)
        # the warm-up stands in for the tower's pretraining: on the demo's own images whatever the task's canvases
        warmup_data = data if own_images else write_shapes_dataset(workdir / "warmup_data", recipe.n_train, 0,
                                                                   seed=recipe.seed)
    with _stage("models", timings):
        models = init_tiny(workdir / "models", recipe.vision, recipe.llm, seed=recipe.seed)
    with _stage("tower warm-up", timings):
        logger.info("a real tower arrives pretrained; this tiny random one gets a short supervised warm-up on the "
                    "training images (shape/colour), then stays frozen; held-out images are never used "
                    "(docs/demo.md)")
        records = json.loads(Path(warmup_data["pretrain"]).read_text())
        images = [Path(warmup_data["images"]) / r["image"] for r in records]
        labels = [labels_from_caption(r["conversations"][1]["value"]) for r in records]
        warm_up_tower(models["vision"], images, labels, recipe.warmup_steps, recipe.warmup_lr,
                      recipe.warmup_batch_size, recipe.image_aspect, recipe.seed)
    data["captions"] = write_caption_corpus(Path(data["pretrain"]), workdir / "data" / "captions.jsonl")
    configs = write_configs(recipe, workdir, data, models)
    with _stage("text-pt", timings):
        logger.info("the tiny random LLM first learns the training captions as plain text, standing in for a "
                    "real LLM's language pretraining")
        text_pt_dir = train(load_config(configs["text-pt"]), overwrite=True)  # the demo owns its workdir
    return {**data, "vision": models["vision"], "llm": text_pt_dir / "llm", "configs": configs}


def run_demo(workdir: str | Path = "demo_workdir", quick: bool = False, recipe: DemoRecipe | None = None,
             results=None, task: str = "shapes") -> int:
    """Run the whole demo; prints the eval report (last line `accuracy: X.XX`) to `results` (stdout).

    `task`: "shapes" (the demo), "wide" (shapes on 2:1 to 3:1 canvases read by AnyRes: `DemoRecipe.wide`) or
    "small" (small shapes on large canvases read by AnyRes: `DemoRecipe.small`)."""
    from llava_kit.config import load_config
    from llava_kit.eval import evaluate, format_report, read_eval_records
    from llava_kit.export.merge import merge_run
    from llava_kit.inference import GenerationService
    from llava_kit.loader import open_model_dir
    from llava_kit.train.engine import train

    if recipe is None:
        tasks = {"wide": DemoRecipe.wide, "small": DemoRecipe.small}
        recipe = tasks[task](quick) if task in tasks else (DemoRecipe.quick() if quick else DemoRecipe())
    workdir = Path(workdir).resolve()
    timings: dict[str, float] = {}
    logger.info("demo in %s (%s recipe)", workdir, "quick" if quick else "full")
    prepared = prepare_shapes(recipe, workdir, timings)
    configs = prepared["configs"]
    with _stage("pretrain", timings):
        train(load_config(configs["pretrain"]), overwrite=True)
    with _stage("sft", timings):
        sft_dir = train(load_config(configs["sft"]), overwrite=True)
    with _stage("merge", timings):
        merged = merge_run(sft_dir, workdir / "merged")
    with _stage("eval", timings):
        service = GenerationService.from_loaded(open_model_dir(merged))
        eval_records = read_eval_records(prepared["eval"])
        accuracy = evaluate(service, eval_records, prepared["images"], max_new_tokens=24,
                            predictions_path=workdir / "eval_predictions.jsonl", scorer="shapes")
    summary = {"accuracy": accuracy, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "recipe": asdict(recipe)}
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo finished in %.0f s: %s", sum(timings.values()),
                ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    logger.info("chat with it: llava-kit chat --model %s --image %s", merged,
                Path(prepared["images"]) / eval_records[0]["image"])
    print(format_report(accuracy), file=results or sys.stdout)
    return 0
