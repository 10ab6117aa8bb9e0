"""The one way to open a model directory: `open_model_dir(path) -> LoadedModel`.

    loaded = open_model_dir("runs/sft")           # chat, serve, eval, export and merge all start here
    loaded.model, loaded.tokenizer, loaded.settings, loaded.modality, loaded.kind

Every kind of directory llava-kit reads or writes is recognised here, and nowhere else:

| kind            | recognised by                                    | what it holds                                |
|-----------------|--------------------------------------------------|----------------------------------------------|
| run             | config.yaml                                      | a run of any stage (base rebuilt + trained)  |
| merged          | llava_kit.json                                   | a merged multimodal model (`LlavaModel`)     |
| hf-llava        | config.json, model_type "llava"                  | transformers' LlavaForConditionalGeneration  |
| hf-llava-next   | config.json, model_type "llava_next"             | transformers' LlavaNextForConditionalGeneration (AnyRes) |
| original-llava  | config.json with mm_projector_type/mm_vision_tower | an original LLaVA checkpoint (import only) |
| llm             | config.json of a causal LM                       | a merged text run, or any transformers LLM   |

`tiny:llm` and other scheme names (llava_kit.model.sources) resolve to their directories first. Code in a model
directory runs only with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_kit.config import load_saved_config
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.modality import Modality, modality_for_stage, modality_of_model
from llava_kit.model.llava import MODEL_TYPE
from llava_kit.model.sources import resolve_model_path
from llava_kit.store.specs import MERGED_SPEC, InferenceSettings

DIRECTORY_KINDS = {
    "run": "a run directory written by `llava-kit train` (config.yaml)",
    "merged": f"a merged model written by `llava-kit merge` or `llava-kit import` ({MERGED_SPEC})",
    "hf-llava": "a transformers llava directory (config.json, model_type llava), e.g. `llava-kit export`'s output",
    "hf-llava-next": "a transformers llava-next directory (config.json, model_type llava_next), e.g. "
                     "llava-hf/llava-v1.6-mistral-7b-hf or `llava-kit export --format hf-llava-next`'s output",
    "original-llava": "an original LLaVA checkpoint (config.json with mm_projector_type); open it after "
                      "`llava-kit import`",
    "llm": "a transformers causal LM directory (a merged text run, or any LLM)",
}


class UnknownModelDirError(ModelLoadError, FileNotFoundError):
    """A directory that is none of the kinds llava-kit opens (also a FileNotFoundError)."""


@dataclass
class LoadedModel:
    """A model ready for inference, whatever directory it came from."""

    model: torch.nn.Module
    """A `LlavaModel` (multimodal), or a transformers causal LM (text); in eval mode."""
    tokenizer: object
    settings: InferenceSettings
    """How prompts and images are prepared (template, system prompt, image aspect)."""
    modality: Modality
    kind: str
    """One of DIRECTORY_KINDS."""
    path: Path


def directory_kind(path: Path) -> str | None:
    """The kind of model directory `path` is (a key of DIRECTORY_KINDS), or None."""
    if (path / "config.yaml").is_file():
        return "run"
    if (path / MERGED_SPEC).is_file():
        return "merged"
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config_file} is not valid JSON ({err}); the directory is damaged") from None
    if config.get("model_type") == MODEL_TYPE:
        raise ModelLoadError(f"{path} holds a llava-kit model (config.json) but no {MERGED_SPEC}, which says how "
                             "it is prompted; write it with `llava-kit merge`, or load it with "
                             "LlavaModel.from_pretrained")
    if config.get("model_type") == "llava" and "vision_config" in config:
        return "hf-llava"
    if config.get("model_type") == "llava_next" and "vision_config" in config:
        return "hf-llava-next"
    if "mm_projector_type" in config or "mm_vision_tower" in config:
        return "original-llava"
    return "llm"


def open_model_dir(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   vision: str | None = None, allow_original_llava: bool = False) -> LoadedModel:
    """Open any model directory llava-kit reads (see the module docstring) for inference.

    An original LLaVA checkpoint names its tower by hub id and has no `<image>` token; it is opened only for
    `llava-kit import` (`allow_original_llava`), with `vision` a local copy of its tower, and otherwise refused
    with the import command that converts it.
    """
    path = Path(resolve_model_path(str(path)))
    if not path.exists():
        raise PathNotFoundError(f"model directory {str(path)!r} does not exist; give the output of `llava-kit "
                                "train`, `llava-kit merge`, `llava-kit import` or a transformers model directory")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a file; a model is a directory ({', '.join(DIRECTORY_KINDS)})")
    kind = directory_kind(path)
    if kind is None:
        kinds = "\n".join(f"  - {name}: {what}" for name, what in DIRECTORY_KINDS.items())
        raise UnknownModelDirError(f"{path} is neither a merged model nor any other model directory llava-kit "
                                   f"opens; it opens:\n{kinds}")
    if kind == "run":
        cfg = load_saved_config(path)
        modality = modality_for_stage(cfg.stage)
        if cfg.model.llm.trust_remote_code and not trust_remote_code:
            raise ModelLoadError(f"{path} was trained with model.llm.trust_remote_code (its LLM runs its own "
                                 "Python code); pass --trust-remote-code if you trust that code")
        model, tokenizer = modality.open_run(path, cfg, dtype, trust_remote_code)
        return LoadedModel(model, tokenizer, modality.inference_settings(cfg), modality, kind, path)
    if kind == "original-llava" and not allow_original_llava:
        raise ModelLoadError(f"{path} is an original LLaVA checkpoint; convert it first with `llava-kit import "
                             f"{path} -o OUT_DIR [--vision TOWER_DIR]` and use OUT_DIR")
    if vision is not None and kind != "original-llava":
        raise ModelLoadError(f"--vision applies to original LLaVA checkpoints; {path} is {DIRECTORY_KINDS[kind]}, "
                             "which carries its tower")
    model, tokenizer, settings = _open_inference_dir(path, kind, dtype, trust_remote_code, vision)
    return LoadedModel(model, tokenizer, settings, modality_of_model(model), kind, path)


def _open_inference_dir(path: Path, kind: str, dtype: torch.dtype, trust_remote_code: bool, vision: str | None):
    from llava_kit.store import foreign, merged

    if kind == "merged":
        return merged.open_merged(path, dtype)
    if kind in ("hf-llava", "hf-llava-next"):
        return foreign.load_hf_llava(path, dtype)
    if kind == "original-llava":
        return foreign.load_original_llava(path, vision, dtype)
    return merged.open_text_model(path, dtype, trust_remote_code)
