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

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_kit.config import RunConfig, load_saved_config
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.model.llava import LlavaModel, causal_lm_of
from llava_kit.train.distributed import trained_names, whole_state_dict

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_SPEC = "projector.json"


def weights_fingerprint(tensors) -> str:
    """sha256 (first 16 hex digits) of named tensors' names, shapes and float32 values: same weights, same print."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{list(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


def base_identity(model: LlavaModel, keep: bool = True) -> dict | None:
    """What a projector depends on: the tower's weights and layer choice, the LLM's architecture and embeddings.

    The LLM is identified by its config and its input embeddings (not every weight: hashing a 7B model on each
    load would take tens of seconds); LoRA leaves the embeddings alone, full fine-tuning changes them.
    Collective under ZeRO-3 (the weights are gathered whole); a process with `keep=False` gets None.
    """
    tower = model.vision_tower
    llm = causal_lm_of(model.language_model)
    tower_state = whole_state_dict(tower, keep=keep)
    embeddings = whole_state_dict(llm.get_input_embeddings(), keep=keep)
    if not keep:
        return None
    return {
        "vision_weights": weights_fingerprint(tower_state.items()),
        "llm_model_type": llm.config.get_text_config().model_type,
        "llm_embeddings": weights_fingerprint([("embeddings", embeddings["weight"])]),
    }


def projector_spec(model: LlavaModel, cfg: RunConfig, keep: bool = True) -> dict:
    """The projector's constructor arguments plus what it was trained against (checked by `load_projector`).

    Collective under ZeRO-3 (see `base_identity`)."""
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
                         "template": cfg.data.template, "stage": cfg.stage, "identity": base_identity(model, keep)},
    }


def provenance_mismatches(spec: dict, model: LlavaModel, template: str | None = None) -> list[str]:
    """How `model` (and `template`, when given) differs from what the projector in `spec` was trained with.

    A projector from a `plain`-template pretrain run may start a run with any template (LLaVA's recipe); a projector
    trained with a chat template refuses another one. What a spec does not record (older runs) is not checked.
    """
    trained = spec.get("trained_with", {})
    problems = []
    vision = trained.get("vision", {})
    for key, label in (("feature_layer", "vision feature layer"), ("select_strategy", "vision select strategy")):
        value = getattr(model.vision_tower, key)
        if key in vision and vision[key] != value:
            problems.append(f"{label}: trained with {vision[key]}, this model has {value} "
                            f"(set model.vision.{key}={vision[key]})")
    saved = trained.get("identity")
    current = base_identity(model) if saved else None
    if saved and current:
        checks = [("vision_weights", "vision tower weights", f"use the tower it was trained with ({vision.get('name_or_path')})"),
                  ("llm_model_type", "LLM family", f"use the LLM it was trained with ({trained.get('llm')})"),
                  ("llm_embeddings", "LLM (its embedding weights differ)",
                   f"use the LLM it was trained with ({trained.get('llm')})")]
        for key, label, fix in checks:
            if key in saved and saved[key] != current[key]:
                problems.append(f"{label}: trained with {saved[key]}, this model has {current[key]} ({fix})")
    saved_template = trained.get("template")
    if template is not None and saved_template not in (None, "plain", template):
        problems.append(f"template: trained with {saved_template!r}, this run uses {template!r} (set "
                        f"data.template={saved_template}, or start from a pretrain run's projector)")
    return problems


def save_projector(model: LlavaModel, out_dir: Path, spec: dict, state: dict | None = None) -> None:
    """Write the projector's weights (`state`, default: the model's own) and its spec."""
    state = whole_state_dict(model.multi_modal_projector) if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / PROJECTOR_WEIGHTS))
    (out_dir / PROJECTOR_SPEC).write_text(json.dumps(spec, indent=2))


def load_projector(model: LlavaModel, source_dir: str | Path, template: str | None = None) -> None:
    """Load projector weights saved in `source_dir`, refusing a projector trained for another base.

    Checked: shapes (tower width, grid, LLM width), and from `trained_with` the tower's weights, feature layer and
    select strategy, the LLM's family and embeddings, and (when `template` is given) the chat template.
    """
    source_dir = Path(source_dir)
    weights, spec_path = source_dir / PROJECTOR_WEIGHTS, source_dir / PROJECTOR_SPEC
    if not weights.is_file():
        raise PathNotFoundError(f"{weights} is missing; is {source_dir} a finished llava-kit run (pretrain or sft)?")
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    tower = model.vision_tower
    expected = {"vision_width": tower.width, "grid": list(tower.grid),
                "llm_width": causal_lm_of(model.language_model).config.get_text_config().hidden_size}
    mismatches = [f"{k}: saved {spec[k]}, this model {v}" for k, v in expected.items() if k in spec and spec[k] != v]
    mismatches += provenance_mismatches(spec, model, template)
    if mismatches:
        raise ModelLoadError(f"the projector in {source_dir} was trained for another base; "
                         f"{'; '.join(mismatches)}. Use the same model.vision, model.llm and template as that run, "
                         "or train a new projector (stage pretrain)")
    projector = model.multi_modal_projector
    built = {"name": getattr(projector, "name", None), "options": getattr(projector, "options", None)}
    differs = [f"{k}: saved {spec[k]!r}, this model {v!r}" for k, v in built.items()
               if k in spec and v is not None and spec[k] != v]
    if differs:
        raise ModelLoadError(f"the projector in {source_dir} is another design ({'; '.join(differs)}); set "
                         "model.projector to the saved name and options, or drop model.init_from")
    state = load_file(str(weights))
    try:
        projector.load_state_dict(state)
    except RuntimeError as err:  # e.g. weights edited by hand: say which run, not only which tensor
        raise ModelLoadError(f"{weights} does not fit this model's projector: {err}") from None


def save_trained_weights(model: LlavaModel, tokenizer, cfg: RunConfig, out_dir: str | Path,
                         writer: bool = True) -> None:
    """Write what this run trained (see the module docstring) into `out_dir`.

    Under DeepSpeed ZeRO-3 every process must call this: each weight is gathered whole in turn (collectively),
    and only the `writer` (rank 0) keeps the copies and writes them.
    """
    trainable = cfg.model.trainable
    spec = projector_spec(model, cfg, keep=writer)
    projector = whole_state_dict(model.multi_modal_projector, keep=writer)
    adapter = llm = vision = None
    if trainable.llm in ("lora", "qlora"):
        adapter = whole_state_dict(model.language_model, only=trained_names(model.language_model), keep=writer)
    elif trainable.llm == "full":
        llm = whole_state_dict(causal_lm_of(model.language_model), keep=writer)
    if trainable.vision == "full":
        vision = whole_state_dict(model.vision_tower, keep=writer)
    if not writer:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_projector(model, out_dir, spec, projector)
    if adapter is not None:
        # The `<image>` row added to the embeddings is rebuilt deterministically (mean init) from the base,
        # so the adapter needs no copy of the embedding matrices.
        model.language_model.save_pretrained(out_dir / "adapter", state_dict=adapter, save_embedding_layers=False)
    if llm is not None:
        causal_lm_of(model.language_model).save_pretrained(out_dir / "llm", state_dict=llm)
    if vision is not None:
        model.vision_tower.save_pretrained(out_dir / "vision", state_dict=vision)
    tokenizer.save_pretrained(out_dir / "tokenizer")


def save_text_run(model, tokenizer, cfg: RunConfig, out_dir: str | Path, writer: bool = True) -> None:
    """A text run: `llm/` (a complete transformers model dir with its tokenizer) or `adapter/` + `tokenizer/`.

    Collective under ZeRO-3, like `save_trained_weights`; only the `writer` writes."""
    out_dir = Path(out_dir)
    if cfg.model.trainable.llm in ("lora", "qlora"):
        adapter = whole_state_dict(model, only=trained_names(model), keep=writer)
        if writer:
            model.save_pretrained(out_dir / "adapter", state_dict=adapter)
            tokenizer.save_pretrained(out_dir / "tokenizer")
    else:
        llm = whole_state_dict(model, keep=writer)
        if writer:
            model.save_pretrained(out_dir / "llm", state_dict=llm)
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
