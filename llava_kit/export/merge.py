"""Merge a run into one standalone model directory, and load models for inference.

    llava-kit merge RUN_DIR -o OUT_DIR

OUT_DIR never refers to the base model paths again:

    OUT_DIR/llava_kit.json          composite spec: projector, template, image handling
    OUT_DIR/vision/                 the vision tower with its image processor
    OUT_DIR/llm/                    the causal LM with LoRA folded in (safetensors) and the tokenizer
    OUT_DIR/projector.safetensors   the projector
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.model.llava import LlavaModel
from llava_kit.train.checkpoint import PROJECTOR_WEIGHTS, load_run, projector_spec, save_projector

logger = logging.getLogger(__name__)

MERGED_SPEC = "llava_kit.json"
TEXT_SPEC = "llava_kit_text.json"
COMPLETION = "completion"  # inference "template" of text-pt models: the prompt is continued as plain text
FORMAT_VERSION = 1


@dataclass
class InferenceSettings:
    """How prompts and images are prepared for a model (taken from its training config)."""

    template: str
    system_prompt: str | None
    image_aspect: str
    max_seq_len: int


def text_inference_settings(cfg) -> InferenceSettings:
    """How to prompt a text run's LLM: its chat template (text-sft), or plain continuation (text-pt)."""
    template = cfg.data.template if cfg.stage == "text-sft" else COMPLETION
    return InferenceSettings(template, cfg.data.system_prompt, "pad", cfg.data.max_seq_len)


def load_text_run(run_dir: Path, cfg, dtype: torch.dtype = torch.float32):
    """The LLM a text run trained (LoRA folded in) and its tokenizer."""
    from llava_kit.model.build import load_llm, load_tokenizer

    remote_code = cfg.model.llm.trust_remote_code
    if (run_dir / "llm").is_dir():
        return load_llm(str(run_dir / "llm"), dtype, None, remote_code), load_tokenizer(str(run_dir / "llm"), remote_code)
    if not (run_dir / "adapter").is_dir():
        raise ModelLoadError(f"{run_dir} has neither llm/ nor adapter/; did its `llava-kit train` finish?")
    from peft import PeftModel

    base = load_llm(cfg.model.llm.name_or_path, dtype, None, remote_code)
    llm = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return llm.merge_and_unload(), load_tokenizer(str(run_dir / "tokenizer"), remote_code)


def merge_text_run(run_dir: Path, cfg, out_dir: Path) -> Path:
    """A text run merges into a plain transformers model directory (LoRA folded in, onto the unquantised base
    for QLoRA runs), plus `llava_kit_text.json` saying which chat template it was trained with."""
    llm, tokenizer = load_text_run(run_dir, cfg)
    llm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {"format": "llava-kit-text", "version": FORMAT_VERSION, "stage": cfg.stage,
            "inference": vars(text_inference_settings(cfg)), "merged_from": str(run_dir.resolve())}
    (out_dir / TEXT_SPEC).write_text(json.dumps(meta, indent=2))
    logger.info("merged text run %s into %s (a plain transformers model directory)", run_dir, out_dir)
    return out_dir


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the run's LoRA into its LLM and write a standalone model directory."""
    from llava_kit.config import TEXT_STAGES, load_saved_config

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    saved = load_saved_config(run_dir)
    if saved.stage in TEXT_STAGES:
        return merge_text_run(run_dir, saved, out_dir)
    model, tokenizer, cfg = load_run(run_dir)
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    settings = InferenceSettings(cfg.data.template, cfg.data.system_prompt, cfg.data.image_aspect, cfg.data.max_seq_len)
    write_merged(model, tokenizer, settings, out_dir, source=str(run_dir.resolve()), spec=projector_spec(model, cfg))
    logger.info("merged %s into %s", run_dir, out_dir)
    return out_dir


def write_merged(model: LlavaModel, tokenizer, settings: InferenceSettings, out_dir: str | Path, source: str,
                 spec: dict | None = None, stage: str = "imported", projector_name: str | None = None,
                 llm_source: str | None = None) -> Path:
    """Write `model` (no LoRA left) as a merged model directory; `spec` defaults to one built from the model."""
    from llava_kit.train.checkpoint import base_identity

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.vision_tower.save_pretrained(out_dir / "vision")
    model.language_model.save_pretrained(out_dir / "llm")
    tokenizer.save_pretrained(out_dir / "llm")
    if spec is None:
        tower, projector = model.vision_tower, model.multi_modal_projector
        spec = {"name": projector_name, "options": {}, "vision_width": tower.width,
                "llm_width": projector.llm_width, "grid": list(tower.grid), "has_cls": projector.has_cls,
                "num_output_tokens": model.tokens_per_image,
                "trained_with": {"vision": tower.describe(), "llm": llm_source, "template": settings.template,
                                 "stage": stage, "identity": base_identity(model)}}
    save_projector(model, out_dir, spec)
    meta = {"format": "llava-kit", "version": FORMAT_VERSION, "image_token": IMAGE_TOKEN,
            "projector": spec, "inference": vars(settings), "merged_from": source}
    (out_dir / MERGED_SPEC).write_text(json.dumps(meta, indent=2))
    return out_dir


def load_merged(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlavaModel, object, InferenceSettings]:
    """Load a directory written by `merge_run`."""
    from llava_kit.model.build import load_llm, load_tokenizer
    from llava_kit.model.projectors import build_projector
    from llava_kit.model.vision import build_vision_tower

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / MERGED_SPEC).read_text())
    spec = meta["projector"]
    tower = build_vision_tower(str(model_dir / "vision"),
                               feature_layer=spec["trained_with"]["vision"]["feature_layer"],
                               select_strategy=spec["trained_with"]["vision"]["select_strategy"])
    tokenizer = load_tokenizer(str(model_dir / "llm"))
    llm = load_llm(str(model_dir / "llm"), dtype)
    projector = build_projector(spec["name"], spec["vision_width"], spec["llm_width"], tuple(spec["grid"]),
                                has_cls=spec["has_cls"], **spec["options"])
    projector.load_state_dict(load_file(str(model_dir / PROJECTOR_WEIGHTS)))
    model = LlavaModel(tower.to(dtype), projector.to(dtype), llm, tokenizer.convert_tokens_to_ids(meta["image_token"]))
    return model.eval(), tokenizer, InferenceSettings(**meta["inference"])


def load_text_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM directory for text chat; prompts as its llava_kit_text.json says, else with the
    tokenizer's own chat template, else as plain continuation."""
    from llava_kit.model.build import load_llm, load_tokenizer

    # a directory holding its own modeling code (auto_map, e.g. a merged InternLM2) is local code the user made
    remote_code = "auto_map" in json.loads((model_dir / "config.json").read_text())
    tokenizer, llm = load_tokenizer(str(model_dir), remote_code), load_llm(str(model_dir), dtype, None, remote_code)
    if (model_dir / TEXT_SPEC).is_file():
        settings = InferenceSettings(**json.loads((model_dir / TEXT_SPEC).read_text())["inference"])
    else:
        template = "tokenizer" if getattr(tokenizer, "chat_template", None) else COMPLETION
        settings = InferenceSettings(template, None, "pad", 4096)
    return llm.eval(), tokenizer, settings


def load_for_inference(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a merged model directory, a run directory or a transformers LLM directory (text chat);
    returns (model, tokenizer, InferenceSettings)."""
    from llava_kit.model.tiny import resolve_model_path

    model_dir = Path(resolve_model_path(str(model_dir)))  # `tiny:llm` chats too (the untrained baseline)
    if (model_dir / MERGED_SPEC).is_file():
        return load_merged(model_dir, dtype)
    from llava_kit.export.import_llava import checkpoint_kind, load_checkpoint

    kind = checkpoint_kind(model_dir)
    if kind == "hf-llava":
        return load_checkpoint(model_dir, dtype=dtype)
    if kind == "original-llava":
        raise ModelLoadError(f"{model_dir} is an original LLaVA checkpoint; convert it first with `llava-kit import "
                         f"{model_dir} -o OUT_DIR [--vision TOWER_DIR]` and use OUT_DIR")
    if (model_dir / "config.json").is_file():  # a plain transformers LLM: a merged text run, or any causal LM
        return load_text_model(model_dir, dtype)
    if (model_dir / "config.yaml").is_file():
        from llava_kit.config import TEXT_STAGES, load_saved_config

        saved = load_saved_config(model_dir)
        if saved.stage in TEXT_STAGES:
            llm, tokenizer = load_text_run(model_dir, saved, dtype)
            return llm.eval(), tokenizer, text_inference_settings(saved)
        model, tokenizer, cfg = load_run(model_dir, dtype)
        return model, tokenizer, InferenceSettings(cfg.data.template, cfg.data.system_prompt,
                                                   cfg.data.image_aspect, cfg.data.max_seq_len)
    raise PathNotFoundError(f"{model_dir} is neither a merged model ({MERGED_SPEC}), a run directory (config.yaml), "
                            "a llava-hf directory nor a transformers LLM (config.json); give the output of "
                            "`llava-kit merge`, `llava-kit train` or `llava-kit import`")

