"""A merged model: one standalone directory that needs no base-model paths any more.

    MERGED_DIR/config.json              LlavaKitConfig: the architecture (text_config, vision, projector, image token)
    MERGED_DIR/model.safetensors        every weight: tower, projector, LLM (LoRA folded in)
    MERGED_DIR/generation_config.json   the LLM's decoding defaults
    MERGED_DIR/tokenizer*.json ...      the tokenizer, with `<image>` and the training template as its chat template
    MERGED_DIR/llava_kit.json           MergedSpec (version 2): how it is prompted, its projector's provenance

It is a transformers model directory: `LlavaModel.from_pretrained(MERGED_DIR)` (or `AutoModel.from_pretrained`
after `import llava_kit.model`) loads it, and its parts start new runs: `model.vision.name_or_path`,
`model.llm.name_or_path` and `model.init_from` may all be MERGED_DIR. A merged text run is a plain transformers
LLM directory plus `llava_kit_text.json`. Merged directories of version 1 (`vision/`, `llm/`,
`projector.safetensors` beside llava_kit.json) still open.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from llava_kit.data.jinja_templates import jinja_template
from llava_kit.errors import ModelLoadError
from llava_kit.model.llava import LlavaModel, causal_lm_of
from llava_kit.store.projector_files import PROJECTOR_WEIGHTS
from llava_kit.store.specs import (
    MERGED_SPEC,
    TEXT_SPEC,
    InferenceSettings,
    MergedSpec,
    ProjectorSpec,
    TextModelSpec,
    read_spec,
    write_spec,
)


def _check_builtin_llm(llm) -> None:
    """A merged composite rebuilds its LLM from the config alone, so the LLM must be a transformers family."""
    module = type(causal_lm_of(llm)).__module__
    if not module.startswith("transformers."):
        raise ModelLoadError(
            f"the LLM is {type(causal_lm_of(llm)).__name__} from its repository's own code ({module}); a merged "
            "multimodal model holds transformers' own classes only. Use the run directory with --trust-remote-code "
            "instead of merging, or an LLM family transformers supports natively")


def write_merged(model: LlavaModel, tokenizer, settings: InferenceSettings, out_dir: str | Path,
                 projector: ProjectorSpec, merged_from: str | None = None) -> Path:
    """Write `model` (no LoRA left) as a merged model directory (see the module docstring)."""
    _check_builtin_llm(model.language_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    causal_lm_of(model.language_model).generation_config.save_pretrained(out_dir)
    # The tokenizer carries the training template as Jinja, so transformers' apply_chat_template prompts it right.
    own_template = tokenizer.chat_template
    try:
        tokenizer.chat_template = jinja_template(settings.template, tokenizer, settings.system_prompt,
                                                 settings.to_dict())
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.chat_template = own_template
    write_spec(MergedSpec(version=MergedSpec.LATEST, projector=projector, inference=settings, merged_from=merged_from),
               out_dir / MERGED_SPEC)
    return out_dir


def read_merged_spec(path: Path) -> MergedSpec:
    """A merged directory's llava_kit.json."""
    return read_spec(path / MERGED_SPEC, MergedSpec)


def open_merged(path: Path, dtype: torch.dtype = torch.float32) -> tuple[LlavaModel, object, InferenceSettings]:
    """A merged multimodal directory (either layout version)."""
    from transformers import GenerationConfig

    from llava_kit.model.build import load_tokenizer

    spec = read_merged_spec(path)
    if spec.version == 1:
        return _open_merged_v1(path, spec, dtype)
    model = LlavaModel.from_pretrained(path, dtype=dtype)
    if (path / "generation_config.json").is_file():
        causal_lm_of(model.language_model).generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), load_tokenizer(str(path)), spec.inference


def _open_merged_v1(path: Path, spec: MergedSpec, dtype: torch.dtype):
    """Version 1: llava_kit.json + vision/ + llm/ + projector.safetensors."""
    from llava_kit.model.build import load_llm, load_tokenizer
    from llava_kit.model.projectors import build_projector
    from llava_kit.model.vision import build_vision_tower

    p = spec.projector
    vision = p.trained_with.vision
    tower = build_vision_tower(str(path / "vision"), feature_layer=vision["feature_layer"],
                               select_strategy=vision["select_strategy"])
    tokenizer = load_tokenizer(str(path / "llm"))
    llm = load_llm(str(path / "llm"), dtype)
    projector = build_projector(p.name, p.vision_width, p.llm_width, tuple(p.grid), has_cls=p.has_cls, **p.options)
    projector.load_state_dict(load_file(str(path / PROJECTOR_WEIGHTS)))
    model = LlavaModel.from_parts(tower.to(dtype), projector.to(dtype), llm,
                                  tokenizer.convert_tokens_to_ids(spec.image_token))
    return model.eval(), tokenizer, spec.inference


def write_merged_text(llm, tokenizer, spec: TextModelSpec, out_dir: str | Path) -> Path:
    """A merged text run: a plain transformers model directory plus llava_kit_text.json."""
    out_dir = Path(out_dir)
    llm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_spec(spec, out_dir / TEXT_SPEC)
    return out_dir


def open_text_model(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A transformers causal LM directory for text chat; prompted as its llava_kit_text.json says, else with the
    tokenizer's own chat template, else as plain continuation."""
    from llava_kit.model.build import load_llm, load_tokenizer
    from llava_kit.store.specs import COMPLETION

    tokenizer = load_tokenizer(str(path), trust_remote_code)
    llm = load_llm(str(path), dtype, None, trust_remote_code)
    if (path / TEXT_SPEC).is_file():
        settings = read_spec(path / TEXT_SPEC, TextModelSpec).inference
    else:
        template = "tokenizer" if getattr(tokenizer, "chat_template", None) else COMPLETION
        settings = InferenceSettings(template, None, "pad", 4096)
    return llm.eval(), tokenizer, settings
