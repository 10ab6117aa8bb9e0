"""Checkpoints made elsewhere, opened as llava-kit models: the llava-hf layout and the original LLaVA layout.

- llava-hf (`config.json` with model_type "llava", e.g. llava-hf/llava-1.5-7b-hf or `llava-kit export`'s output):
  the transformers CLIP/SigLIP tower, `multi_modal_projector.linear_1/2` (-> mlp2x_gelu, or linear when
  written as Linear -> identity -> identity Linear), the language model and lm_head, the tokenizer and, when the
  export was llava-kit's, its inference settings (template, system prompt, image aspect).
- llava-hf llava-next (`config.json` with model_type "llava_next", e.g. llava-hf/llava-v1.6-mistral-7b-hf or
  `llava-kit export --format hf-llava-next`): the same parts, plus AnyRes from `image_grid_pinpoints` and the learned
  `image_newline`; the tower then reads one view at a time with the LlavaNextImageProcessor's normalisation.
- original LLaVA (`config.json` with `mm_projector_type`, weights with `model.mm_projector.*`): the LLM is the
  checkpoint minus the multimodal keys, the projector is `mm_projector` (same `0/2` keys as ours), the tower is
  `mm_vision_tower` (a hub id; pass `vision=DIR` for a local copy). `<image>` is added to the tokenizer with a
  mean-initialised embedding row, template vicuna_v1 (LLaVA-1.5's).

`llava_kit.loader.open_model_dir` calls these; `llava-kit import` (export/import_llava.py) writes the result as
a merged llava-kit directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llava_kit.data.jinja_templates import settings_from_template
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.model.llava import LlavaModel
from llava_kit.store.specs import InferenceSettings

logger = logging.getLogger(__name__)

ORIGINAL_LLM_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2", "llava": "llama"}


class CheckpointImportError(ModelLoadError):
    """A checkpoint llava-kit cannot import as asked; the message says why."""


def _config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise PathNotFoundError(f"{path} has no config.json: not a llava-hf or original LLaVA checkpoint")
    return json.loads(file.read_text())


def checkpoint_kind(path: str | Path) -> str | None:
    """"hf-llava", "hf-llava-next", "original-llava" or None (not a LLaVA checkpoint directory)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    if config.get("model_type") == "llava" and "vision_config" in config:
        return "hf-llava"
    if config.get("model_type") == "llava_next" and "vision_config" in config:
        return "hf-llava-next"
    if "mm_projector_type" in config or "mm_vision_tower" in config:
        return "original-llava"
    return None


def _tower_processor(path: str, vision_model, model_type: str, tiles: bool = False):
    """The tower's image processor (whole image to its square input); `tiles`: a llava-next checkpoint, whose own
    processor tiles, so the tower's is the family's processor with that one's normalisation."""
    from llava_kit.model.vision import TRANSFORMERS_FAMILIES, _load_square_processor, _pil_variant

    _, processor_class, has_cls = TRANSFORMERS_FAMILIES[model_type]
    if tiles:
        saved_file = Path(path) / "preprocessor_config.json"
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
        side = vision_model.config.image_size
        kept = {k: saved[k] for k in ("image_mean", "image_std", "resample", "do_rescale", "rescale_factor",
                                      "do_normalize", "do_convert_rgb") if k in saved}
        processor = _pil_variant(processor_class).from_dict({**kept, "size": {"height": side, "width": side},
                                                             "do_center_crop": False})
        return processor, has_cls
    processor = _load_square_processor(path, processor_class, vision_model.config.image_size)
    if getattr(processor, "do_pad", False):
        processor.do_pad = False  # llava-kit pads to square itself (settings.image_aspect)
    return processor, has_cls


def _projector_from_hf(config, projector_module, vision_width: int, llm_width: int, grid, has_cls: bool):
    """Our projector with the weights of LlavaMultiModalProjector, or CheckpointImportError when it is not one of ours."""
    from llava_kit.model.projectors import build_projector

    state = {k: v.detach().clone() for k, v in projector_module.state_dict().items()}
    for name in ("linear_1", "linear_2"):  # no bias == a zero bias, exactly
        state.setdefault(f"{name}.bias", torch.zeros(state[f"{name}.weight"].shape[0]))
    act = config.projector_hidden_act
    if act == "gelu":
        projector = build_projector("mlp2x_gelu", vision_width, llm_width, grid, has_cls=has_cls)
        projector.load_state_dict({"0.weight": state["linear_1.weight"], "0.bias": state["linear_1.bias"],
                                   "2.weight": state["linear_2.weight"], "2.bias": state["linear_2.bias"]})
        return projector
    identity = torch.eye(llm_width, dtype=state["linear_2.weight"].dtype)
    if act == "linear" and torch.equal(state["linear_2.weight"], identity) and not state["linear_2.bias"].any():
        projector = build_projector("linear", vision_width, llm_width, grid, has_cls=has_cls)
        projector.load_state_dict({"weight": state["linear_1.weight"], "bias": state["linear_1.bias"]})
        return projector
    raise CheckpointImportError(f"projector_hidden_act={act!r} with these weights has no llava-kit equivalent; "
                       "llava-kit imports gelu (mlp2x_gelu) and linear with an identity second layer (linear)")


def _causal_lm_around(text_config, decoder, lm_head):
    """A causal LM of the text config's family that reuses `decoder` and `lm_head` (no copy)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    setattr(llm, llm.base_model_prefix, decoder)
    llm.set_output_embeddings(lm_head)
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointImportError(f"the {text_config.model_type} causal LM has weights outside its decoder and lm_head "
                           f"({', '.join(left[:4])}); import of this family is not supported")
    return llm


def load_hf_llava(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a llava-hf directory (llava or llava-next) as (LlavaModel, tokenizer, InferenceSettings)."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from llava_kit.model.build import load_tokenizer
    from llava_kit.model.vision import TRANSFORMERS_FAMILIES, TransformersVisionTower

    path = Path(path)
    is_next = checkpoint_kind(path) == "hf-llava-next"
    model_class = LlavaNextForConditionalGeneration if is_next else LlavaForConditionalGeneration
    hf = model_class.from_pretrained(path, dtype=dtype)
    config = hf.config
    vision_type = config.vision_config.model_type
    if vision_type not in TRANSFORMERS_FAMILIES:
        raise CheckpointImportError(f"{path}: vision tower {vision_type!r} is not supported (CLIP and SigLIP are)")
    if not isinstance(config.vision_feature_layer, int):
        raise CheckpointImportError(f"{path}: several vision feature layers {config.vision_feature_layer} (concatenated) "
                           "are not supported; llava-kit uses one layer")
    vision_model = hf.model.vision_tower
    image_processor, has_cls = _tower_processor(str(path), vision_model, vision_type, tiles=is_next)
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and not has_cls:
        raise CheckpointImportError(f"{path}: select strategy 'default' drops the first token of a {vision_type} tower, "
                           "which has no CLS token (a patch would be lost); llava-kit cannot express that")
    select_strategy = "patch" if strategy == "default" else ("patch" if not has_cls else "full")
    tower = TransformersVisionTower(vision_model, image_processor, name_or_path=str(path), has_cls=has_cls,
                                    feature_layer=config.vision_feature_layer, select_strategy=select_strategy)
    text_config = config.text_config
    projector = _projector_from_hf(config, hf.model.multi_modal_projector, tower.width, text_config.hidden_size,
                                   tower.grid, tower.has_cls and select_strategy == "full")
    llm = _causal_lm_around(text_config, hf.model.language_model, hf.lm_head)
    llm.generation_config = hf.generation_config
    tokenizer = load_tokenizer(str(path))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != config.image_token_id:
        raise CheckpointImportError(f"{path}: the tokenizer's {IMAGE_TOKEN!r} is id {image_token_id}, the config's "
                           f"image_token_id is {config.image_token_id}; llava-kit needs them to agree")
    anyres = _anyres_of(path, config, tower, projector) if is_next else None
    model = LlavaModel.from_parts(tower.to(dtype), projector.to(dtype), llm, image_token_id, anyres).eval()
    if is_next:
        with torch.no_grad():
            model.image_newline.copy_(hf.model.image_newline)
    if model.tokens_per_image != config.image_seq_length:
        logger.warning("%s: image_seq_length %d in config.json, the tower and strategy give %d (used)", path,
                       config.image_seq_length, model.tokens_per_image)
    return model, tokenizer, InferenceSettings(**_settings(path, tokenizer, text_config))


def _anyres_of(path: Path, config, tower, projector):
    """AnyRes of a llava-next checkpoint: its pinpoints on the tower's tiles, the projector's patch grid per view."""
    from llava_kit.model.anyres import AnyRes, AnyResError

    if tower.has_cls and tower.select_strategy == "full":
        raise CheckpointImportError(f"{path}: select strategy 'full' keeps a CLS token per tile, which llava-next "
                                    "cannot lay out on the image's grid either")
    try:
        return AnyRes.build(tower.image_size, config.image_grid_pinpoints, projector.num_output_tokens,
                            projector.token_grid)
    except AnyResError as err:
        raise CheckpointImportError(f"{path}: image_grid_pinpoints {config.image_grid_pinpoints}: {err}") from None


def _settings(path: Path, tokenizer, text_config) -> dict:
    """Inference settings: from a llava-kit export's template marker, else the checkpoint's own template."""
    template = getattr(tokenizer, "chat_template", None)
    jinja = path / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text()
        tokenizer.chat_template = template
    marked = settings_from_template(template)
    if marked:
        return marked
    do_pad = json.loads((path / "preprocessor_config.json").read_text()).get("do_pad", False) \
        if (path / "preprocessor_config.json").is_file() else False
    if not template:
        raise CheckpointImportError(f"{path} has no chat template; llava-kit needs one to prompt the model")
    logger.info("%s: using the checkpoint's own chat template (template `tokenizer`)", path)
    return {"template": "tokenizer", "system_prompt": None, "image_aspect": "pad" if do_pad else "resize",
            "max_seq_len": getattr(text_config, "max_position_embeddings", 2048)}


def _original_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an original LLaVA checkpoint (safetensors or PyTorch .bin shards)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise PathNotFoundError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def load_original_llava(path: str | Path, vision: str | None = None, dtype: torch.dtype = torch.float32):
    """Load an original LLaVA checkpoint (haotian-liu/LLaVA layout) as (LlavaModel, tokenizer, InferenceSettings).

    `vision` replaces the config's `mm_vision_tower` (a hub id) with a local directory of the same tower.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from llava_kit.data.encode import add_image_token
    from llava_kit.model.build import load_tokenizer, resize_embeddings_with_mean
    from llava_kit.model.projectors import build_projector
    from llava_kit.model.vision import build_vision_tower

    path = Path(path)
    config = _config(path)
    family = ORIGINAL_LLM_TYPES.get(config.get("model_type", "llava"))
    if family is None:
        raise CheckpointImportError(f"{path}: model_type {config.get('model_type')!r} is not a known LLaVA LLM; "
                                    f"known: {', '.join(ORIGINAL_LLM_TYPES)}")
    tower_source = vision or config.get("mm_vision_tower")
    if not tower_source:
        raise CheckpointImportError(f"{path}: config.json names no mm_vision_tower; pass --vision DIR")
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointImportError(f"{path}: mm_vision_select_feature={select_feature!r} is not supported")
    tower = build_vision_tower(tower_source, feature_layer=config.get("mm_vision_select_layer", -2),
                               select_strategy="patch" if select_feature == "patch" else "full")
    if select_feature == "patch" and not tower.has_cls:
        raise CheckpointImportError(f"{path}: LLaVA's 'patch' drops the first token, but {tower_source} has no CLS "
                                    "token; llava-kit cannot express that")

    state = _original_state(path)
    projector_state = {k[len("model.mm_projector."):]: v for k, v in state.items()
                       if k.startswith("model.mm_projector.")}
    if not projector_state:
        raise CheckpointImportError(f"{path}: no model.mm_projector.* weights in the checkpoint")
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    text_fields = {k: v for k, v in config.items()
                   if not k.startswith("mm_") and k not in ("model_type", "architectures", "auto_map", "_name_or_path")}
    text_config = AutoConfig.for_model(family, **text_fields)
    llm = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    missing = [k for k in missing if not (k.startswith("lm_head.") and text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointImportError(f"{path}: the LLM weights do not match a {family} model "
                                    f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    if text_config.tie_word_embeddings:
        llm.tie_weights()
    tokenizer = load_tokenizer(str(path))
    image_token_id = add_image_token(tokenizer)  # original LLaVA has no <image> token (it uses index -200)
    resize_embeddings_with_mean(llm, len(tokenizer))
    has_cls = tower.has_cls and select_feature == "cls_patch"
    projector = build_projector(config.get("mm_projector_type", "linear"), tower.width, text_config.hidden_size,
                                tower.grid, has_cls=has_cls)
    projector.load_state_dict(projector_state)
    model = LlavaModel.from_parts(tower.to(dtype), projector.to(dtype), llm.to(dtype), image_token_id).eval()
    settings = InferenceSettings("vicuna_v1", None, "pad" if config.get("image_aspect_ratio") == "pad" else "resize",
                                 int(config.get("tokenizer_model_max_length") or 2048))
    return model, tokenizer, settings


def load_checkpoint(path: str | Path, vision: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a llava-hf or original LLaVA directory as (LlavaModel, tokenizer, InferenceSettings)."""
    kind = checkpoint_kind(path)
    if kind in ("hf-llava", "hf-llava-next"):
        if vision:
            raise CheckpointImportError("--vision applies to original LLaVA checkpoints; a llava-hf directory "
                                        "carries its tower")
        return load_hf_llava(path, dtype)
    if kind == "original-llava":
        return load_original_llava(path, vision, dtype)
    raise CheckpointImportError(f"{path} is neither a llava-hf directory (config.json model_type 'llava' or "
                                "'llava_next') nor an original LLaVA checkpoint (config.json with mm_projector_type)")
