"""Build the composite model from a config: tower, tokenizer (+`<image>`), LLM, projector.

The same functions build the model for training, for merging and for chat, from hub ids, local
directories or `tiny:` names, so a path that works in one works in all.
"""

from __future__ import annotations

import logging

import torch

from llava_kit.config import ModelConfig
from llava_kit.data.encode import add_image_token
from llava_kit.errors import ModelLoadError
from llava_kit.model.llava import LlavaModel
from llava_kit.model.projectors import build_projector
from llava_kit.model.tiny import resolve_model_path
from llava_kit.model.vision import build_vision_tower

logger = logging.getLogger(__name__)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer (fast tokenizers only: labels need character offsets) and give it a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as err:  # a missing directory, a mistyped hub id, no network: the user's to fix
        raise ModelLoadError(f"cannot load the tokenizer {name_or_path!r}: {err}; give a local model directory, a hub "
                             "id (owner/name) or tiny:llm (model.llm.name_or_path, or model.llm.tokenizer)") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} is a slow (Python) tokenizer; llava-kit needs a fast "
                         "one for character offsets (install `tokenizers`, or convert it with AutoTokenizer(use_fast=True))")
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
    import os

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    extra = {}
    if quantization_config is not None:  # quantized weights are placed at load time, one GPU per process
        extra = {"quantization_config": quantization_config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        raise ModelLoadError(f"cannot load the LLM {name_or_path!r}: {err}") from None
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ModelLoadError(f"cannot load the LLM {name_or_path!r} with attn_implementation={attn_implementation!r}: "
                         f"{err}; set model.llm.attn_implementation=auto (or sdpa)") from None


def build_llava(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                llm_path: str | None = None, tokenizer_path: str | None = None,
                quantization_config=None, attn_implementation: str | None = None) -> tuple[LlavaModel, object]:
    """Build tower + projector (fresh) + LLM from `model_cfg`; returns (model, tokenizer with `<image>`).

    `attn_implementation` is the LLM's attention kernel (None: transformers' default); training resolves
    `model.llm.attn_implementation` into it (engine.choose_attn_implementation)."""
    v = model_cfg.vision
    tower = build_vision_tower(resolve_model_path(v.name_or_path), backend=v.backend, feature_layer=v.feature_layer,
                               select_strategy=v.select_strategy, pretrained=v.pretrained)
    llm_location = llm_path or model_cfg.llm.name_or_path
    remote_code = model_cfg.llm.trust_remote_code
    tokenizer = load_tokenizer(tokenizer_path or model_cfg.llm.tokenizer or llm_location, remote_code)
    llm = load_llm(llm_location, dtype, quantization_config, remote_code, attn_implementation)
    image_token_id = add_image_token(tokenizer)
    resize_embeddings_with_mean(llm, len(tokenizer))
    has_cls = tower.has_cls and v.select_strategy == "full"
    projector = build_projector(model_cfg.projector.name, tower.width, llm.config.get_text_config().hidden_size,
                                tower.grid, has_cls=has_cls, **model_cfg.projector.options)
    tower.to(dtype)
    projector.to(dtype)
    return LlavaModel(tower, projector, llm, image_token_id), tokenizer
