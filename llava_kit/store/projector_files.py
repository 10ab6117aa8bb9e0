"""A projector on disk: `projector.safetensors` + `projector.json` (its spec and provenance), written and checked.

    save_projector(model, run_dir, projector_spec(model, cfg))
    load_projector(model, run_dir, template="chatml")      # refuses a projector trained for another base

The provenance is what a projector depends on: the tower (its weights, feature layer and select strategy), the LLM
(its family and embeddings) and the chat template. Loading it onto a model that differs is refused with what
differs and how to fix it, instead of training or chatting with features the LLM was never taught.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_kit.config import RunConfig
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.model.llava import LlavaModel, causal_lm_of
from llava_kit.model.weights import read_prefixed_weights, whole_state_dict
from llava_kit.store.specs import (
    MERGED_SPEC,
    PROJECTOR_SPEC,
    MergedSpec,
    ProjectorSpec,
    Provenance,
    read_spec,
    write_spec,
)

logger = logging.getLogger(__name__)

PROJECTOR_WEIGHTS = "projector.safetensors"
NEWLINE = "image_newline"
"""AnyRes: the composite's learned row end, trained with the projector and saved beside its weights under this name."""


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


def describe_projector(model: LlavaModel, llm_source: str | None, template: str | None, stage: str,
                       keep: bool = True) -> ProjectorSpec:
    """The projector's constructor arguments plus what it was trained against (checked by `load_projector`).

    Collective under ZeRO-3 (see `base_identity`)."""
    tower, projector = model.vision_tower, model.multi_modal_projector
    return ProjectorSpec(
        name=getattr(projector, "name", None), options=dict(getattr(projector, "options", {})),
        vision_width=tower.width, llm_width=causal_lm_of(model.language_model).config.get_text_config().hidden_size,
        grid=list(tower.grid), has_cls=projector.has_cls, num_output_tokens=model.tokens_per_image,
        image_strategy=model.anyres.to_dict() if model.anyres is not None else None,
        trained_with=Provenance(vision=tower.describe(), llm=llm_source, template=template, stage=stage,
                                identity=base_identity(model, keep)))


def projector_spec(model: LlavaModel, cfg: RunConfig, keep: bool = True) -> ProjectorSpec:
    """`describe_projector` for the run `cfg` (its LLM, template and stage)."""
    return describe_projector(model, cfg.model.llm.name_or_path, cfg.data.template, cfg.stage, keep)


def provenance_mismatches(spec: ProjectorSpec, model: LlavaModel, template: str | None = None) -> list[str]:
    """How `model` (and `template`, when given) differs from what the projector in `spec` was trained with.

    A projector from a `plain`-template pretrain run may start a run with any template (LLaVA's recipe); a projector
    trained with a chat template refuses another one. What a spec does not record (older runs) is not checked.
    """
    trained = spec.trained_with
    problems = []
    vision = trained.vision
    for key, label in (("feature_layer", "vision feature layer"), ("select_strategy", "vision select strategy")):
        value = getattr(model.vision_tower, key)
        if key in vision and vision[key] != value:
            problems.append(f"{label}: trained with {vision[key]}, this model has {value} "
                            f"(set model.vision.{key}={vision[key]})")
    saved = trained.identity
    current = base_identity(model) if saved else None
    if saved and current:
        checks = [("vision_weights", "vision tower weights",
                   f"use the tower it was trained with ({vision.get('name_or_path')})"),
                  ("llm_model_type", "LLM family", f"use the LLM it was trained with ({trained.llm})"),
                  ("llm_embeddings", "LLM (its embedding weights differ)",
                   f"use the LLM it was trained with ({trained.llm})")]
        for key, label, fix in checks:
            if key in saved and saved[key] != current[key]:
                problems.append(f"{label}: trained with {saved[key]}, this model has {current[key]} ({fix})")
    if template is not None and trained.template not in (None, "plain", template):
        problems.append(f"template: trained with {trained.template!r}, this run uses {template!r} (set "
                        f"data.template={trained.template}, or start from a pretrain run's projector)")
    return problems


def save_projector(model: LlavaModel, out_dir: Path, spec: ProjectorSpec, state: dict | None = None) -> None:
    """Write the projector's weights (`state`, default: the model's own) and its spec."""
    state = whole_state_dict(model.multi_modal_projector) if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out_dir) / PROJECTOR_WEIGHTS))
    write_spec(spec, Path(out_dir) / PROJECTOR_SPEC)


def read_projector_spec(source_dir: str | Path) -> ProjectorSpec:
    """The spec of the projector saved in a run directory (projector.json) or a merged directory (llava_kit.json)."""
    source_dir = Path(source_dir)
    if not (source_dir / PROJECTOR_SPEC).is_file() and (source_dir / MERGED_SPEC).is_file():
        return read_spec(source_dir / MERGED_SPEC, MergedSpec).projector
    return read_spec(source_dir / PROJECTOR_SPEC, ProjectorSpec)


def read_saved_projector(source_dir: str | Path) -> tuple[ProjectorSpec, dict[str, torch.Tensor]]:
    """(spec, weights) of the projector in a run directory or a merged directory (either layout)."""
    source_dir = Path(source_dir)
    if (source_dir / PROJECTOR_WEIGHTS).is_file():  # a run directory, or a merged directory of version 1
        return read_projector_spec(source_dir), load_file(str(source_dir / PROJECTOR_WEIGHTS))
    if (source_dir / MERGED_SPEC).is_file():  # a merged model: the projector's tensors inside model.safetensors
        state = read_prefixed_weights(source_dir, "multi_modal_projector.")
        newline = read_prefixed_weights(source_dir, NEWLINE).get("")  # the tensor named exactly image_newline
        if newline is not None:
            state[NEWLINE] = newline
        return read_projector_spec(source_dir), state
    raise PathNotFoundError(f"{source_dir / PROJECTOR_WEIGHTS} is missing; is {source_dir} a finished llava-kit run "
                            "(pretrain or sft) or a merged model?")


def load_projector(model: LlavaModel, source_dir: str | Path, template: str | None = None) -> None:
    """Load projector weights saved in `source_dir`, refusing a projector trained for another base.

    Checked: shapes (tower width, grid, LLM width), and from `trained_with` the tower's weights, feature layer and
    select strategy, the LLM's family and embeddings, and (when `template` is given) the chat template.
    """
    source_dir = Path(source_dir)
    spec, state = read_saved_projector(source_dir)
    tower = model.vision_tower
    expected = {"vision_width": tower.width, "grid": list(tower.grid),
                "llm_width": causal_lm_of(model.language_model).config.get_text_config().hidden_size}
    mismatches = [f"{k}: saved {getattr(spec, k)}, this model {v}" for k, v in expected.items()
                  if getattr(spec, k) != v]
    mismatches += provenance_mismatches(spec, model, template)
    if mismatches:
        raise ModelLoadError(f"the projector in {source_dir} was trained for another base; "
                             f"{'; '.join(mismatches)}. Use the same model.vision, model.llm and template as that "
                             "run, or train a new projector (stage pretrain)")
    projector = model.multi_modal_projector
    newline = state.pop(NEWLINE, None)
    built = {"name": getattr(projector, "name", None), "options": getattr(projector, "options", None)}
    differs = [f"{k}: saved {getattr(spec, k)!r}, this model {v!r}" for k, v in built.items()
               if v is not None and getattr(spec, k) != v]
    if differs:
        raise ModelLoadError(f"the projector in {source_dir} is another design ({'; '.join(differs)}); set "
                             "model.projector to the saved name and options, or drop model.init_from")
    try:
        projector.load_state_dict(state)
    except RuntimeError as err:  # e.g. weights edited by hand: say which run, not only which tensor
        raise ModelLoadError(f"the projector weights in {source_dir} do not fit this model's projector: {err}") \
            from None
    _load_newline(model, newline, source_dir)


def _load_newline(model: LlavaModel, newline: torch.Tensor | None, source_dir: Path) -> None:
    """AnyRes: the saved image_newline, or (a projector trained at the fixed strategy, LLaVA-NeXT's pretrain) the
    model's fresh one, trained from here on."""
    if model.image_newline is None:
        if newline is not None:
            logger.info("%s holds an AnyRes image_newline; this model reads images at the fixed strategy and has none",
                        source_dir)
        return
    if newline is None:
        logger.info("the projector in %s was trained without AnyRes: image_newline starts fresh (normal, std "
                    "1/sqrt(d)) and is trained with the projector", source_dir)
        return
    if newline.shape != model.image_newline.shape:
        raise ModelLoadError(f"the image_newline in {source_dir} has shape {list(newline.shape)}, this model's "
                             f"{list(model.image_newline.shape)}")
    with torch.no_grad():
        model.image_newline.copy_(newline)
