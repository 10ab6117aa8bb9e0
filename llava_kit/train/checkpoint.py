"""What a run directory holds, and how a model comes back from it.

    RUN_DIR/config.yaml            the resolved config (everything needed to rebuild the base)
    RUN_DIR/projector.safetensors  the projector's weights
    RUN_DIR/projector.json         its spec and provenance (tower, layer, strategy, LLM, template)
    RUN_DIR/adapter/               peft LoRA adapter of the LLM        (LoRA runs)
    RUN_DIR/llm/                   the full LLM                        (full fine-tuning runs)
    RUN_DIR/vision/                the full vision tower               (tower trained)
    RUN_DIR/tokenizer/             the tokenizer with `<image>`
    RUN_DIR/metrics.jsonl, loss.png, data_report.json, checkpoint-N/ (for resume)

Only trained weights are written; frozen parts are rebuilt from the paths in config.yaml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_kit.config import RunConfig, load_saved_config
from llava_kit.model.llava import LlavaModel, causal_lm_of

logger = logging.getLogger(__name__)

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_SPEC = "projector.json"


def projector_spec(model: LlavaModel, cfg: RunConfig) -> dict:
    """The projector's constructor arguments plus what it was trained against."""
    tower = model.vision_tower
    return {
        "name": cfg.model.projector.name,
        "options": cfg.model.projector.options,
        "vision_width": tower.width,
        "llm_width": causal_lm_of(model.language_model).config.get_text_config().hidden_size,
        "grid": list(tower.grid),
        "has_cls": tower.has_cls and cfg.model.vision.select_strategy == "full",
        "num_output_tokens": model.tokens_per_image,
        "trained_with": {"vision": tower.describe(), "llm": cfg.model.llm.name_or_path,
                         "template": cfg.data.template, "stage": cfg.stage},
    }


def save_projector(model: LlavaModel, out_dir: Path, spec: dict) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.multi_modal_projector.state_dict().items()}
    save_file(state, str(out_dir / PROJECTOR_WEIGHTS))
    (out_dir / PROJECTOR_SPEC).write_text(json.dumps(spec, indent=2))


def load_projector(model: LlavaModel, source_dir: str | Path) -> None:
    """Load projector weights saved in `source_dir`, refusing a projector built for other shapes."""
    source_dir = Path(source_dir)
    weights, spec_path = source_dir / PROJECTOR_WEIGHTS, source_dir / PROJECTOR_SPEC
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; is {source_dir} a finished llava-kit run (pretrain or sft)?")
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    tower = model.vision_tower
    expected = {"vision_width": tower.width, "grid": list(tower.grid),
                "llm_width": causal_lm_of(model.language_model).config.get_text_config().hidden_size}
    mismatches = [f"{k}: saved {spec[k]}, this model {v}" for k, v in expected.items() if k in spec and spec[k] != v]
    if mismatches:
        raise ValueError(f"the projector in {source_dir} was trained for another vision tower or LLM "
                         f"({'; '.join(mismatches)}); use the same model.vision and model.llm as that run")
    projector = model.multi_modal_projector
    built = {"name": getattr(projector, "name", None), "options": getattr(projector, "options", None)}
    differs = [f"{k}: saved {spec[k]!r}, this model {v!r}" for k, v in built.items()
               if k in spec and v is not None and spec[k] != v]
    if differs:
        raise ValueError(f"the projector in {source_dir} is another design ({'; '.join(differs)}); set "
                         "model.projector to the saved name and options, or drop model.init_from")
    state = load_file(str(weights))
    try:
        projector.load_state_dict(state)
    except RuntimeError as err:  # e.g. weights edited by hand: say which run, not only which tensor
        raise ValueError(f"{weights} does not fit this model's projector: {err}") from None


def save_trained_weights(model: LlavaModel, tokenizer, cfg: RunConfig, out_dir: str | Path) -> None:
    """Write what this run trained (see the module docstring) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = cfg.model.trainable
    save_projector(model, out_dir, projector_spec(model, cfg))
    if trainable.llm == "lora":
        # The `<image>` row added to the embeddings is rebuilt deterministically (mean init) from the base,
        # so the adapter needs no copy of the embedding matrices.
        model.language_model.save_pretrained(out_dir / "adapter", save_embedding_layers=False)
    elif trainable.llm == "full":
        causal_lm_of(model.language_model).save_pretrained(out_dir / "llm")
    if trainable.vision == "full":
        model.vision_tower.save_pretrained(out_dir / "vision")
    tokenizer.save_pretrained(out_dir / "tokenizer")


def save_text_run(model, tokenizer, cfg: RunConfig, out_dir: str | Path) -> None:
    """A text run: `llm/` (a complete transformers model dir with its tokenizer) or `adapter/` + `tokenizer/`."""
    out_dir = Path(out_dir)
    if cfg.model.trainable.llm == "lora":
        model.save_pretrained(out_dir / "adapter")
        tokenizer.save_pretrained(out_dir / "tokenizer")
    else:
        model.save_pretrained(out_dir / "llm")
        tokenizer.save_pretrained(out_dir / "llm")


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlavaModel, object, RunConfig]:
    """Rebuild the model a run trained: base from config.yaml, then its projector, adapter, full weights."""
    from llava_kit.model.build import build_llava
    from llava_kit.model.vision import build_vision_tower

    run_dir = Path(run_dir)
    cfg = load_saved_config(run_dir)
    llm_dir = run_dir / "llm"
    model, tokenizer = build_llava(cfg.model, dtype, llm_path=str(llm_dir) if llm_dir.is_dir() else None,
                                   tokenizer_path=str(run_dir / "tokenizer"))
    if (run_dir / "vision").is_dir():
        v = cfg.model.vision
        model.vision_tower = build_vision_tower(str(run_dir / "vision"), feature_layer=v.feature_layer,
                                                select_strategy=v.select_strategy).to(dtype)
    load_projector(model, run_dir)
    if (run_dir / "adapter").is_dir():
        from peft import PeftModel

        model.language_model = PeftModel.from_pretrained(model.language_model, str(run_dir / "adapter"))
    model.eval()
    return model, tokenizer, cfg
