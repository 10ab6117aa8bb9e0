"""Build the composite model from a config: tower, tokenizer (+`<image>`), LLM, projector.

The same functions build the model for training, for merging and for chat, from hub ids, local
directories or `tiny:` names, so a path that works in one works in all.

Remote code: a model repository can ship its own Python modules (`auto_map` in config.json). They run only when
the caller passes `trust_remote_code=True` (`model.llm.trust_remote_code` in a config, `--trust-remote-code` on
the commands that load models); otherwise such a model is refused with a message saying so.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from llava_kit.config import ModelConfig
from llava_kit.data.encode import add_image_token
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.model.llava import LlavaModel, is_composite_dir, load_composite_llm, load_composite_tower
from llava_kit.model.projectors import build_projector
from llava_kit.model.sources import resolve_model_path
from llava_kit.model.vision import build_vision_tower

logger = logging.getLogger(__name__)


def _looks_like_local_path(name: str) -> bool:
    """True for strings that can only be a filesystem path (hub ids are `name` or `org/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def check_remote_code(path: str, trust_remote_code: bool, what: str = "model") -> None:
    """Refuse a local model directory whose config.json needs its own Python code unless `trust_remote_code`.

    A config with `auto_map` whose `model_type` transformers does not know can only be built by running the
    directory's modules; one whose type transformers knows loads with transformers' own class either way.
    """
    config_file = os.path.join(path, "config.json")
    if trust_remote_code or not os.path.isfile(config_file):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads(open(config_file, encoding="utf-8").read())
    except (OSError, ValueError):
        return  # transformers reports a broken config itself
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"the {what} in {path} needs its own Python code (config.json has `auto_map` for model_type "
            f"{config.get('model_type')!r}), which llava-kit runs only when asked: pass --trust-remote-code (or set "
            "model.llm.trust_remote_code: true) if you trust the code in that directory")


def _raise_load_error(what: str, name_or_path: str, err: Exception) -> None:
    """A missing local path or an unreachable hub id as one clear error."""
    if _looks_like_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise PathNotFoundError(f"the {what} path {name_or_path!r} does not exist; give a local model directory or "
                                "a hub id") from None
    raise ModelLoadError(f"cannot load the {what} {name_or_path!r}: {err}. Without network access, download it "
                         f"elsewhere (`hf download {name_or_path} --local-dir DIR`) and pass DIR") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer (fast tokenizers only: labels need character offsets) and give it a pad token."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    check_remote_code(path, trust_remote_code, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # a missing directory, an unreachable hub id, a broken tokenizer file
        _raise_load_error("tokenizer", name_or_path, err)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} is a slow (Python) tokenizer; llava-kit needs a "
                             "fast one for character offsets (install `tokenizers`, or convert it with "
                             "AutoTokenizer(use_fast=True))")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and labels anyway
    return tokenizer


def resize_embeddings_with_mean(llm, vocab_size: int) -> None:
    """Grow the embeddings to `vocab_size`; new rows are the mean of the existing ones (llava-hf does the same).

    Deterministic (no sampling), so a LoRA run can rebuild the exact base from the base checkpoint.
    """
    old = llm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}.values():
            emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)


def load_llm(name_or_path: str, dtype: torch.dtype = torch.float32, quantization_config=None,
             trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Any transformers causal LM from a hub id or local directory (4-bit on this process's GPU with a
    bitsandbytes `quantization_config`, for QLoRA); `attn_implementation` None is transformers' default."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if is_composite_dir(path):  # a merged llava-kit model: its LLM
        return load_composite_llm(path, dtype, attn_implementation)
    check_remote_code(path, trust_remote_code, "LLM")
    extra = {}
    if quantization_config is not None:  # quantized weights are placed at load time, one GPU per process
        extra = {"quantization_config": quantization_config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        _raise_load_error("LLM", name_or_path, err)
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ModelLoadError(f"cannot load the LLM {name_or_path!r} with attn_implementation="
                             f"{attn_implementation!r}: {err}; set model.llm.attn_implementation=auto (or sdpa)") \
            from None


def build_llava(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                llm_path: str | None = None, tokenizer_path: str | None = None,
                quantization_config=None, attn_implementation: str | None = None,
                trust_remote_code: bool | None = None) -> tuple[LlavaModel, object]:
    """Build tower + projector (fresh) + LLM from `model_cfg`; returns (model, tokenizer with `<image>`).

    `attn_implementation` is the LLM's attention kernel (None: transformers' default); training resolves
    `model.llm.attn_implementation` into it (engine.choose_attn_implementation). `trust_remote_code` None takes
    the config's `model.llm.trust_remote_code`."""
    v = model_cfg.vision
    vision_path = resolve_model_path(v.name_or_path)
    if is_composite_dir(vision_path):  # a merged llava-kit model: its tower
        tower = load_composite_tower(vision_path, v.feature_layer, v.select_strategy)
    else:
        tower = build_vision_tower(vision_path, backend=v.backend, feature_layer=v.feature_layer,
                                   select_strategy=v.select_strategy, pretrained=v.pretrained)
    llm_location = llm_path or model_cfg.llm.name_or_path
    remote_code = model_cfg.llm.trust_remote_code if trust_remote_code is None else trust_remote_code
    tokenizer = load_tokenizer(tokenizer_path or model_cfg.llm.tokenizer or llm_location, remote_code)
    llm = load_llm(llm_location, dtype, quantization_config, remote_code, attn_implementation)
    image_token_id = add_image_token(tokenizer)
    resize_embeddings_with_mean(llm, len(tokenizer))
    has_cls = tower.has_cls and v.select_strategy == "full"
    projector = build_projector(model_cfg.projector.name, tower.width, llm.config.get_text_config().hidden_size,
                                tower.grid, has_cls=has_cls, **model_cfg.projector.options)
    anyres = anyres_settings(v, tower, projector)
    tower.to(dtype)
    projector.to(dtype)
    return LlavaModel.from_parts(tower, projector, llm, image_token_id, anyres), tokenizer


def anyres_settings(vision, tower, projector):
    """The AnyRes settings `model.vision` asks for with this tower and projector, or None (the fixed strategy);
    ProjectorError where the projector cannot take tiles, AnyResError where the settings cannot work."""
    if vision.image_strategy != "anyres":
        return None
    from llava_kit.model.anyres import AnyRes
    from llava_kit.model.projectors import ProjectorError

    refusal = projector.tiles_refusal()
    if refusal:
        raise ProjectorError(f"projector {projector.name!r} cannot take AnyRes tiles: {refusal}")
    return AnyRes.build(tower.image_size, vision.grid_pinpoints, projector.num_output_tokens, projector.token_grid,
                        vision.max_tokens_per_image, vision.max_image_tokens_per_sample)
