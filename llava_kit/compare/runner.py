"""Projectors side by side: the same recipe (pretrain + sft, same data, steps and seed) for each one.

    llava-kit projectors --vision-width 1024 --grid 24 --llm-width 4096
    llava-kit compare-projectors configs/tiny/compare_projectors.yaml --projectors linear,mlp2x_gelu,resampler

A comparison config (YAML) has the keys of `CompareConfig` below: output_dir, projectors, projector_options,
strategies, shapes, pretrain, sft, eval. Everything is checked when it is loaded, the two stages' run-config keys too (their
cross-field checks run once each projector's config is complete), with every problem reported together.

Per projector it writes OUTPUT_DIR/runs/NAME/{pretrain,sft} and measures: parameters, visual tokens, sft step time,
training memory, final sft loss and held-out accuracy. With `strategies` (e.g. fixed and anyres) every projector runs
once per image strategy (OUTPUT_DIR/runs/STRATEGY/NAME/...), and the visual tokens are the mean per held-out image. `llava_kit.compare.report` writes the table (markdown and
CSV) and the plot (PNG) at the report path.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llava_kit.compare.results import ProjectorResult
from llava_kit.config import BENCHMARK_NAMES
from llava_kit.errors import ConfigError, PathNotFoundError, UsageError
from llava_kit.schema import Schema, check_data, deep_merge, did_you_mean, load_yaml_file

logger = logging.getLogger(__name__)

# Every design of the registry, one member of the mlp family: what `llava-kit projectors` lists.
LISTED_PROJECTORS = ("linear", "mlp2x_gelu", "identity", "pooler", "avgpool", "pixel_shuffle", "patch_merger", "ldp",
                     "ldpv2", "c_abstractor", "resampler", "perceiver", "tokenpacker", "qformer")


# ---------------------------------------------------------------------------------------------- listing


def parse_grid(text: str) -> tuple[int, int]:
    """`24` -> (24, 24); `27x27` or `16x24` -> (rows, cols)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise UsageError(f"--grid must be a side (24) or ROWSxCOLS (27x27), got {text!r}")
    return (values[0], values[-1])


def list_projectors(vision_width: int, llm_width: int, grid: tuple[int, int], has_cls: bool = False,
                    names: tuple[str, ...] = LISTED_PROJECTORS) -> list[dict]:
    """Each projector's visual-token and parameter count for these shapes (or why it refuses them).

    Built on the meta device: no memory is allocated, so 4096-wide projectors list instantly.
    """
    import torch

    from llava_kit.model.projectors import ProjectorError, build_projector, count_parameters

    rows = []
    for name in names:
        try:
            with torch.device("meta"):
                projector = build_projector(name, vision_width, llm_width, grid, has_cls=has_cls)
        except ProjectorError as err:
            rows.append({"projector": name, "visual_tokens": None, "parameters": None, "note": str(err)})
            continue
        rows.append({"projector": name, "visual_tokens": projector.num_output_tokens,
                     "parameters": count_parameters(projector), "tiles": tiles_text(projector), "note": ""})
    return rows


def tiles_text(projector) -> str:
    """How the projector takes AnyRes tiles (`Projector.tiles`), in a few words."""
    refusal = projector.tiles_refusal()
    if refusal:
        return f"refused: {refusal}"
    if projector.tiles == "grid":
        rows, cols = projector.token_grid
        return f"per tile, {rows}x{cols} grid"
    return "per tile, concatenated"


def format_listing(rows: list[dict]) -> str:
    """A plain-text table of `list_projectors` rows."""
    lines = [f"{'projector':<14} {'visual tokens':>13} {'parameters':>14}  AnyRes tiles"]
    for row in rows:
        if row["parameters"] is None:
            lines.append(f"{row['projector']:<14} {'-':>13} {'-':>14}  refused: {row['note']}")
        else:
            lines.append(f"{row['projector']:<14} {row['visual_tokens']:>13,} {row['parameters']:>14,}  "
                         f"{row['tiles']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- config


class EvalSettings(Schema):
    """The held-out questions every projector answers."""

    benchmark: Literal[BENCHMARK_NAMES] = "custom"
    """The benchmark they are scored with (`llava-kit eval --benchmark`); the report's accuracy column is its
    headline metric. Default custom: llava-kit's eval JSONL (the shapes task's)."""
    data: str = ""
    """The benchmark's local file (custom: eval JSONL {image, question, answer | kind+shape+color}); filled in by
    `shapes`."""
    image_root: str = ""
    """Directory the questions' image paths are relative to; filled in by `shapes`."""
    max_new_tokens: int = Field(24, ge=1)
    """Longest answer in tokens."""
    limit: int = Field(0, ge=0)
    """Score only the first N questions (0 = all)."""


class CompareConfig(Schema):
    """A comparison of projectors: one recipe, run for each."""

    output_dir: str = ""
    """Where the runs and the report go."""
    projectors: list[str] | None = None
    """The default list of projectors (`--projectors a,b,c` replaces it); none: every design `projectors` lists."""
    projector_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """{name: {option: value}}: options of a projector (e.g. resampler num_queries)."""
    strategies: dict[str, dict[str, Any]] | None = None
    """{name: run-config keys applied to both stages}: every projector runs once per image strategy, e.g. {fixed: {},
    anyres: {model: {vision: {image_strategy: anyres, grid_pinpoints: anyres_max_3}}, data: {max_seq_len: 1024}}};
    none: once, as the recipe says."""
    shapes: dict[str, Any] | None = None
    """DemoRecipe fields (llava_kit/demo/pipeline.py): prepare the synthetic shapes task (data, a tiny tower with its
    warm-up, a text-pretrained tiny LLM) once under OUTPUT_DIR/prepared, reused while the recipe is unchanged; model
    paths, data paths and eval are then filled in."""
    pretrain: dict[str, Any] = Field(default_factory=dict)
    """Run-config keys (as in `llava-kit train`) of the pretrain stage, applied on top of the demo's config when
    `shapes` is set; each projector's run gets its projector and output_dir."""
    sft: dict[str, Any] = Field(default_factory=dict)
    """Run-config keys of the sft stage, like `pretrain`; sft starts from the projector pretrain trained."""
    eval: EvalSettings = Field(default_factory=EvalSettings)
    """The held-out questions (filled in by `shapes`)."""


def _shapes_problems(shapes: dict) -> list[str]:
    """`shapes` keys that are no DemoRecipe field (its tiny model specs are fixed)."""
    from llava_kit.demo.pipeline import DemoRecipe

    valid = sorted({f.name for f in fields(DemoRecipe)} - {"vision", "llm"})
    unknown = sorted(str(k) for k in set(shapes) - set(valid))
    if not unknown:
        return []
    return [f"`shapes` has unknown key(s) {', '.join(unknown)}{did_you_mean(unknown[0], valid, cutoff=0.5)} "
            f"(valid: {', '.join(valid)})"]


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read and check a comparison YAML; ConfigError listing every problem (nearest valid keys named)."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"comparison config {str(path)!r} does not exist")
    data = load_yaml_file(path)
    data = {} if data is None else data
    compare, problems = check_data(CompareConfig, data)
    if isinstance(data, dict):
        # The stages' keys and types are checked now; the cross-field checks need the complete config of a projector.
        from llava_kit.config import RunConfig

        for stage in ("pretrain", "sft"):
            if isinstance(data.get(stage), dict):
                problems += check_data(RunConfig, data[stage], prefix=stage)[1]
        strategies = data.get("strategies")
        for name, overrides in strategies.items() if isinstance(strategies, dict) else []:
            if isinstance(overrides, dict):
                problems += check_data(RunConfig, overrides, prefix=f"strategies.{name}")[1]
        if isinstance(data.get("shapes"), dict):
            problems += _shapes_problems(data["shapes"])
        if not data.get("output_dir"):
            problems.append("`output_dir` is empty; set where the runs and the report go")
    if problems:
        raise ConfigError(problems, str(path))
    return compare


def prepare_shapes_task(shapes: dict, workdir: Path) -> dict:
    """Prepare (or reuse) the shapes data, warmed-up tiny tower and text-pretrained tiny LLM under `workdir`."""
    from llava_kit.demo.pipeline import DemoRecipe, prepare_shapes

    problems = _shapes_problems(shapes)
    if problems:
        raise ConfigError(problems, "comparison config")
    recipe = DemoRecipe(**shapes)
    stamp = workdir / "prepared.json"
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    if stamp.is_file() and json.loads(stamp.read_text())["recipe"] == wanted:
        logger.info("reusing the prepared shapes task in %s", workdir)
        return {k: Path(v) if isinstance(v, str) else {n: Path(p) for n, p in v.items()}
                for k, v in json.loads(stamp.read_text())["paths"].items()}
    timings: dict[str, float] = {}
    prepared = prepare_shapes(recipe, workdir, timings)
    paths = {k: str(v) if not isinstance(v, dict) else {n: str(p) for n, p in v.items()} for k, v in prepared.items()}
    stamp.write_text(json.dumps({"recipe": wanted, "paths": paths, "timings_s": timings}, indent=2))
    return prepared


def stage_configs(compare: CompareConfig, prepared: dict | None) -> tuple[dict, dict, EvalSettings]:
    """The base pretrain and sft run-config dicts and the eval settings, before a projector is chosen."""
    pretrain, sft, evaluation = compare.pretrain, compare.sft, compare.eval
    if prepared is not None:
        demo = {name: load_yaml_file(prepared["configs"][name]) for name in ("pretrain", "sft")}
        pretrain, sft = deep_merge(demo["pretrain"], pretrain), deep_merge(demo["sft"], sft)
        evaluation = evaluation.model_copy(update={"data": evaluation.data or str(prepared["eval"]),
                                                   "image_root": evaluation.image_root or str(prepared["images"])})
    for key in ("data", "image_root") if evaluation.benchmark == "custom" else ("data",):
        if not getattr(evaluation, key):
            raise ConfigError(f"`eval.{key}` is empty; set the held-out questions (JSONL) and their image root, "
                              "or use `shapes` to prepare the shapes task", "comparison config")
    return pretrain, sft, evaluation


def projector_run_configs(pretrain: dict, sft: dict, name: str, options: dict, runs_dir: Path,
                          with_pretrain: bool = True, check_paths: bool = True):
    """Validated RunConfigs of one projector's pretrain and sft (sft starts from the pretrained projector)."""
    from llava_kit.config import config_from_dict

    projector = {"model": {"projector": {"name": name, "options": options}}}
    pretrain_cfg = config_from_dict(deep_merge(pretrain, {
        **projector, "stage": "pretrain", "output_dir": str(runs_dir / name / "pretrain")}), f"pretrain ({name})",
        check_paths)
    sft_cfg = config_from_dict(deep_merge(sft, {
        "model": {**projector["model"], "init_from": pretrain_cfg.output_dir if with_pretrain else None},
        "stage": "sft", "output_dir": str(runs_dir / name / "sft")}), f"sft ({name})", check_paths=False)
    return pretrain_cfg, sft_cfg


def check_projectors(names: list[str], options: dict, cfg) -> None:
    """Build every projector (on the meta device: no memory) for the tower and LLM of `cfg`, with its image strategy;
    ProjectorError (or AnyResError) if one cannot take them."""
    import torch
    from transformers import AutoConfig

    from llava_kit.model.build import anyres_settings
    from llava_kit.model.projectors import build_projector
    from llava_kit.model.sources import resolve_model_path
    from llava_kit.model.vision import build_vision_tower

    v = cfg.model.vision
    tower = build_vision_tower(resolve_model_path(v.name_or_path), backend=v.backend, feature_layer=v.feature_layer,
                               select_strategy=v.select_strategy, pretrained=v.pretrained)
    has_cls = tower.has_cls and v.select_strategy == "full"
    llm_width = AutoConfig.from_pretrained(resolve_model_path(cfg.model.llm.name_or_path)).get_text_config().hidden_size
    for name in names:
        with torch.device("meta"):
            projector = build_projector(name, tower.width, llm_width, tower.grid, has_cls=has_cls,
                                        **options.get(name, {}))
        anyres_settings(v, tower, projector)


# ---------------------------------------------------------------------------------------------- measuring


def training_memory_bytes(cfg) -> tuple[int, int, int]:
    """(bytes, projector parameters, visual tokens) of one sft micro-batch of `cfg`'s model and data.

    Bytes = weights + (gradient + two AdamW states) per trainable weight + the tensors autograd saves for backward
    (counted once per storage, with saved_tensors_hooks). The same count on any device, and not disturbed by
    other processes, unlike a process's peak RSS.
    """
    import torch

    from llava_kit.data.dataset import Collator
    from llava_kit.data.multimodal import build_dataset
    from llava_kit.model.build import build_llava
    from llava_kit.model.projectors import count_parameters
    from llava_kit.model.trainable import apply_trainability
    from llava_kit.train.memory import saved_for_backward_bytes, trained_bytes

    model, tokenizer = build_llava(cfg.model, torch.float32)
    apply_trainability(model, cfg.model.trainable, cfg.model.lora)
    dataset = build_dataset(cfg, model, tokenizer)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(min(cfg.train.micro_batch_size,
                                                                             len(dataset)))])
    saved = saved_for_backward_bytes(model, batch)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + 3 * trained_bytes(model) + saved, count_parameters(model.multi_modal_projector), \
        model.tokens_per_image


def _sft_metrics(run_dir: Path, max_steps: int) -> tuple[float, float]:
    """(mean seconds per optimizer step, last logged loss) from a run's metrics.jsonl."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [h["loss"] for h in history if "loss" in h]
    runtime = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), float("nan"))
    return runtime / max(max_steps, 1), losses[-1] if losses else float("nan")


def with_strategy(stage: dict, overrides: dict) -> dict:
    """A stage's run-config dict with an image strategy's keys merged in."""
    return deep_merge(stage, overrides) if overrides else stage


def tokens_per_held_out_image(model, evaluation: EvalSettings) -> int:
    """Visual tokens per image: the projector's count, or (AnyRes) the mean over the held-out images' sizes."""
    if getattr(model, "anyres", None) is None:
        return model.tokens_per_image
    from llava_kit.benchmarks import get_benchmark
    from llava_kit.benchmarks.base import open_image

    image_root = Path(evaluation.image_root) if evaluation.image_root else None
    items = get_benchmark(evaluation.benchmark).read(Path(evaluation.data), image_root, evaluation.limit)
    sizes = []
    for source in {source for item in items for source in item.images}:
        with open_image(source) as image:
            sizes.append((image.height, image.width))
    return round(sum(model.image_token_counts([size])[0] for size in sizes) / max(len(sizes), 1))


def run_one(name: str, options: dict, pretrain: dict, sft: dict, evaluation: EvalSettings,
            runs_dir: Path, strategy: str = "") -> ProjectorResult:
    """Pretrain + sft + held-out eval of one projector; a projector without parameters skips pretraining."""
    from llava_kit.eval import run_benchmark
    from llava_kit.inference import GenerationService
    from llava_kit.loader import open_model_dir
    from llava_kit.train.engine import train

    pretrain_cfg, sft_cfg = projector_run_configs(pretrain, sft, name, options, runs_dir)
    memory, parameters, tokens = training_memory_bytes(sft_cfg)
    start = time.perf_counter()
    if parameters:
        train(pretrain_cfg, overwrite=True)  # the comparison owns its output_dir: a rerun replaces its runs
    else:
        logger.info("%s has no parameters: nothing to pretrain, sft trains the LLM alone", name)
        pretrain_cfg, sft_cfg = projector_run_configs(pretrain, sft, name, options, runs_dir, with_pretrain=False)
    sft_dir = train(sft_cfg, overwrite=True)
    train_seconds = time.perf_counter() - start
    step_time, final_loss = _sft_metrics(sft_dir, sft_cfg.train.max_steps)
    service = GenerationService.from_loaded(open_model_dir(sft_dir))
    tokens = tokens_per_held_out_image(service.model, evaluation)
    scored = run_benchmark(evaluation.benchmark, evaluation.data, evaluation.image_root or None, service=service,
                           limit=evaluation.limit, max_new_tokens=evaluation.max_new_tokens,
                           predictions_path=sft_dir / "eval_predictions.jsonl")
    headline = scored.benchmark.headline
    result = ProjectorResult(projector=name, parameters=parameters, visual_tokens=tokens,
                             step_time_ms=1000 * step_time, memory_mib=memory / 2**20, final_loss=final_loss,
                             accuracy=scored.headline,
                             accuracy_by_kind={c: m[headline] for c, m in scored.scores.by_category.items()},
                             train_seconds=train_seconds, metric=headline, strategy=strategy)
    logger.info("compare: %s%s -> %s %.2f (%d tokens, %s parameters, %.0f ms/step)", name,
                f" ({strategy})" if strategy else "", headline, result.accuracy, tokens, f"{parameters:,}",
                result.step_time_ms)
    return result


def compare_projectors(config_path: str | Path, projectors: list[str] | None = None,
                       report: str | Path | None = None) -> tuple[list[ProjectorResult], Path]:
    """Run the comparison a config describes; returns the rows and the markdown report's path."""
    from llava_kit.model.projectors import resolve_projector

    compare = load_compare_config(config_path)
    names = projectors or compare.projectors or list(LISTED_PROJECTORS)
    for name in names:
        resolve_projector(name)  # unknown names fail before anything runs
    options = compare.projector_options
    for name in options:
        resolve_projector(name)
    output_dir = Path(compare.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_shapes_task(compare.shapes, output_dir / "prepared") if compare.shapes else None
    pretrain, sft, evaluation = stage_configs(compare, prepared)
    strategies = compare.strategies or {"": {}}
    # Check every projector's configs and options up front: a mistake in the last one should not cost the first
    # ones' runs.
    for overrides in strategies.values():
        for name in names:
            _, sft_cfg = projector_run_configs(with_strategy(pretrain, overrides), with_strategy(sft, overrides), name,
                                               options.get(name, {}), output_dir / "runs")
        check_projectors(names, options, sft_cfg)
    start, load_before = time.perf_counter(), _load_average()
    results = [run_one(name, options.get(name, {}), with_strategy(pretrain, overrides), with_strategy(sft, overrides),
                       evaluation, output_dir / "runs" / strategy if strategy else output_dir / "runs", strategy)
               for strategy, overrides in strategies.items() for name in names]
    machine = {"seconds": time.perf_counter() - start, "load_before": load_before, "load_after": _load_average()}
    report = Path(report) if report else output_dir / "comparison.md"
    recipe = {"pretrain": stage_summary(pretrain), "sft": stage_summary(sft),
              "eval": held_out_count(evaluation), "benchmark": evaluation.benchmark}
    from llava_kit.compare.report import write_report

    write_report(results, report, config_path, prepared is not None, machine, recipe)
    return results, report


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): step times depend on what else runs."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def stage_summary(stage: dict) -> str:
    """`steps x micro-batch, lr` of a stage's train section, for the report."""
    t = stage.get("train", {})
    lr = t.get("learning_rate", "?")
    projector_lr = t.get("projector_learning_rate")
    return (f"{t.get('max_steps', '?')} steps x micro-batch {t.get('micro_batch_size', '?')}, lr {lr}"
            + (f" (projector {projector_lr})" if projector_lr and projector_lr != lr else ""))


def held_out_count(evaluation: EvalSettings) -> int:
    """How many held-out questions the comparison scores (after `limit`; MMBench: circular groups, MME: images)."""
    from llava_kit.benchmarks import get_benchmark

    benchmark = get_benchmark(evaluation.benchmark)
    items = benchmark.read(Path(evaluation.data), Path(evaluation.image_root) if evaluation.image_root else None,
                           evaluation.limit)
    groups = {item.record.get("group", item.record.get("pair", item.id)) for item in items}
    return len(groups)
