"""Export to transformers' llava and llava-next formats (what transformers, vLLM and SGLang load).

    llava-kit export MODEL_DIR --format hf-llava -o OUT_DIR          # the fixed strategy
    llava-kit export MODEL_DIR --format hf-llava-next -o OUT_DIR     # AnyRes (model.vision.image_strategy: anyres)

MODEL_DIR is a merged model or a run directory (LoRA is folded in). OUT_DIR then loads without llava-kit:

    model = LlavaForConditionalGeneration.from_pretrained(OUT_DIR)   # or LlavaNextForConditionalGeneration
    processor = AutoProcessor.from_pretrained(OUT_DIR)     # image processor, tokenizer, chat template

hf-llava-next holds AnyRes as transformers' llava-next computes it: the grid pinpoints (`image_grid_pinpoints` in
the config and the LlavaNextImageProcessor), the learned `image_newline`, the same unpadding and token counts
(llava_kit/model/anyres.py is tested against transformers' functions). It cannot hold a token cap
(`max_tokens_per_image`, `max_image_tokens_per_sample`: transformers has no pooling) or a projector whose output is
not the patch grid; both are refused with the reason.

What the format can express: a transformers CLIP or SigLIP tower (one feature layer), a projector of the form
Linear -> activation -> Linear (`mlp2x_gelu`; `linear` and `mlp1x_gelu` exactly, as Linear -> identity ->
an identity Linear), any causal LM family transformers knows. Everything else is refused with the reason.

Select strategy: llava-hf's "default" drops the first token, "full" keeps all. llava-kit's "patch" drops the CLS
token *where there is one*: on CLIP it is "default", on SigLIP (no CLS) it is "full".
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava_kit.data.jinja_templates import jinja_template
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import ExportError, UsageError
from llava_kit.model.llava import LlavaModel, causal_lm_of
from llava_kit.model.projectors import LinearProjector, MlpGeluProjector

logger = logging.getLogger(__name__)

FORMATS = ("hf-llava", "hf-llava-next")


def projector_layers(projector) -> tuple[str, torch.nn.Linear | None, torch.nn.Linear | None]:
    """(projector_hidden_act, first Linear or None, second Linear or None) of a projector llava-hf can express.

    For `linear` / `mlp1x_gelu` the second layer is None: the export writes an identity there. Raises ExportError
    for any other projector.
    """
    name = getattr(projector, "name", type(projector).__name__)
    if type(projector) is MlpGeluProjector and projector.depth == 2:
        return "gelu", projector[0], projector[2]
    if type(projector) is MlpGeluProjector and projector.depth == 1:
        return "linear", projector[0], None
    if type(projector) is LinearProjector:
        return "linear", None, None
    raise ExportError(
        f"projector {name!r} cannot be written in the hf-llava format: transformers' LlavaMultiModalProjector is "
        "exactly Linear -> activation -> Linear on every token (no token pooling, resampling, extra layers or "
        f"other structure). Train with projector mlp2x_gelu (or linear) to export to hf-llava, or keep this model "
        "in llava-kit's own format (`llava-kit merge`) and serve it with `llava-kit serve`.")


def hf_select_strategy(tower) -> str:
    """llava-hf's vision_feature_select_strategy for our tower ("default" drops the first token, "full" keeps all)."""
    if tower.select_strategy == "patch" and tower.has_cls:
        return "default"
    return "full"  # SigLIP (no CLS) with "patch", or any tower with "full"


def check_exportable(model: LlavaModel, fmt: str = "hf-llava") -> None:
    """Raise ExportError unless the model's tower, projector and image strategy have an exact equivalent in `fmt`."""
    tower = model.vision_tower
    if tower.backend != "transformers":
        raise ExportError(
            f"the vision tower is an {tower.backend} model ({tower.name_or_path}); the {fmt} format holds a "
            "transformers vision model. Use a transformers CLIP or SigLIP checkpoint as model.vision to export, or "
            "keep llava-kit's format (`llava-kit merge`, `llava-kit serve`)")
    projector_layers(model.multi_modal_projector)
    anyres = getattr(model, "anyres", None)
    if fmt == "hf-llava" and anyres is not None:
        raise ExportError("this model reads images at any resolution (model.vision.image_strategy: anyres); "
                          "transformers' LlavaForConditionalGeneration reads one view per image. Export it with "
                          "--format hf-llava-next (LlavaNextForConditionalGeneration)")
    if fmt == "hf-llava-next":
        if anyres is None:
            raise ExportError("LlavaNextForConditionalGeneration tiles every image, and this model was trained at the "
                              "fixed strategy (one view per image): its answers would change. Export it with "
                              "--format hf-llava, or train with model.vision.image_strategy: anyres")
        if anyres.max_tokens_per_image is not None or anyres.max_image_tokens_per_sample is not None:
            raise ExportError("this model caps image tokens (max_tokens_per_image / max_image_tokens_per_sample) by "
                              "pooling tile features bilinearly, which transformers' llava-next does not do: images "
                              "over the cap would get other tokens. Train without a cap to export to hf-llava-next, "
                              "or keep llava-kit's format (`llava-kit merge`, `llava-kit serve`)")


def _projector_state(projector, llm_width: int) -> tuple[str, dict]:
    """projector_hidden_act and the state dict of LlavaMultiModalProjector (linear_1, linear_2)."""
    act, first, second = projector_layers(projector)
    if first is None:  # LinearProjector: its own weight and bias
        weight_1, bias_1 = projector.weight, projector.bias
    else:
        weight_1, bias_1 = first.weight, first.bias
    if second is None:  # y = I x + 0 is exact in floating point: the output is the first layer's, unchanged
        weight_2 = torch.eye(llm_width, dtype=weight_1.dtype)
        bias_2 = torch.zeros(llm_width, dtype=weight_1.dtype)
    else:
        weight_2, bias_2 = second.weight, second.bias
    state = {"linear_1.weight": weight_1, "linear_1.bias": bias_1, "linear_2.weight": weight_2,
             "linear_2.bias": bias_2}
    return act, {k: v.detach().cpu().contiguous() for k, v in state.items()}


def build_processor(model: LlavaModel, tokenizer, settings):
    """A LlavaProcessor doing llava-kit's image preparation and chat template."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    tower = model.vision_tower
    source = tower.image_processor
    side = tower.image_size
    image_processor = LlavaImageProcessor(
        do_pad=settings.image_aspect == "pad", size={"height": side, "width": side}, do_center_crop=False,
        crop_size={"height": side, "width": side}, image_mean=list(source.image_mean),
        image_std=list(source.image_std), resample=source.resample, do_rescale=source.do_rescale,
        rescale_factor=source.rescale_factor, do_normalize=source.do_normalize)
    marker = {"template": settings.template, "system_prompt": settings.system_prompt,
              "image_aspect": settings.image_aspect, "max_seq_len": settings.max_seq_len}
    chat_template = jinja_template(settings.template, tokenizer, settings.system_prompt, marker)
    tokenizer.chat_template = chat_template
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=tower.vision_model.config.patch_size,
                          vision_feature_select_strategy=hf_select_strategy(tower), chat_template=chat_template,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1 if tower.has_cls else 0)


def end_of_turn_token(tokenizer, template: str) -> str | None:
    """The template's end-of-turn marker when it is a single token other than EOS (chatml's `<|im_end|>`), else
    None (the turn ends with EOS itself, as in vicuna_v1 and plain, or with several tokens)."""
    from llava_kit.inference.service import stop_token_ids

    others = [i for i in stop_token_ids(tokenizer, template) if i != tokenizer.eos_token_id]
    return tokenizer.convert_ids_to_tokens(others[0]) if len(others) == 1 else None


def _end_turns_with_eos(tokenizer, settings) -> None:
    """Make the template's end-of-turn token the tokenizer's EOS, so tools that stop at `tokenizer.eos_token_id`
    (lmms-eval's llava_hf: `generate(eos_token_id=tokenizer.eos_token_id)`) stop where an answer ends instead of
    running on into another turn. Left alone when the chat template itself refers to EOS and would change."""
    token = end_of_turn_token(tokenizer, settings.template)
    if token is None:
        return
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    before = tokenizer.apply_chat_template(probe, tokenize=False)
    eos = tokenizer.eos_token
    tokenizer.eos_token = token
    if tokenizer.apply_chat_template(probe, tokenize=False) != before:
        tokenizer.eos_token = eos
        logger.warning("the chat template uses the EOS token, so the export keeps EOS %r; tools that stop at "
                       "tokenizer.eos_token_id will not stop at %r (generation_config.json lists both)", eos, token)


def build_next_processor(model: LlavaModel, tokenizer, settings):
    """A LlavaNextProcessor tiling as llava-kit does (pinpoints, base view, black padding) with its chat template."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tower = model.vision_tower
    source = tower.image_processor
    side = tower.image_size
    image_processor = LlavaNextImageProcessor(
        size={"height": side, "width": side}, crop_size={"height": side, "width": side}, do_center_crop=False,
        image_grid_pinpoints=[list(p) for p in model.anyres.pinpoints], image_mean=list(source.image_mean),
        image_std=list(source.image_std), resample=source.resample, do_rescale=source.do_rescale,
        rescale_factor=source.rescale_factor, do_normalize=source.do_normalize, do_pad=True)
    marker = {"template": settings.template, "system_prompt": settings.system_prompt,
              "image_aspect": settings.image_aspect, "max_seq_len": settings.max_seq_len}
    chat_template = jinja_template(settings.template, tokenizer, settings.system_prompt, marker)
    tokenizer.chat_template = chat_template
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=tower.vision_model.config.patch_size,
                              vision_feature_select_strategy=hf_select_strategy(tower), chat_template=chat_template,
                              image_token=IMAGE_TOKEN, num_additional_image_tokens=1 if tower.has_cls else 0)


def to_hf_llava_next(model: LlavaModel, tokenizer, settings, out_dir: str | Path) -> Path:
    """Write an AnyRes `model` (LoRA already folded in) as a transformers llava-next directory
    (LlavaNextForConditionalGeneration + LlavaNextProcessor), as `to_hf_llava` does for llava."""
    return to_hf_llava(model, tokenizer, settings, out_dir, fmt="hf-llava-next")


def to_hf_llava(model: LlavaModel, tokenizer, settings, out_dir: str | Path, fmt: str = "hf-llava") -> Path:
    """Write `model` (LoRA already folded in) as a llava-hf directory with processor and generation config.

    The exported tokenizer's EOS is the template's end-of-turn token where that is one token (`<|im_end|>` for
    chatml); generation_config.json's eos_token_id lists every stop token (EOS and end-of-turn), as
    `llava-kit chat` stops. `tokenizer` itself is left as it was.
    """
    import copy

    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from llava_kit.inference.service import stop_token_ids

    check_exportable(model, fmt)
    is_next = fmt == "hf-llava-next"
    config_class, model_class = ((LlavaNextConfig, LlavaNextForConditionalGeneration) if is_next
                                 else (LlavaConfig, LlavaForConditionalGeneration))
    extra = {"image_grid_pinpoints": [list(p) for p in model.anyres.pinpoints]} if is_next else {}
    tower, llm = model.vision_tower, causal_lm_of(model.language_model)
    text_config = llm.config.get_text_config()
    act, projector_state = _projector_state(model.multi_modal_projector, text_config.hidden_size)
    dtype = next(llm.parameters()).dtype
    config = config_class(
        vision_config=tower.vision_model.config.to_dict(), text_config=text_config.to_dict(),
        image_token_id=model.image_token_id, image_seq_length=model.tokens_per_image,
        projector_hidden_act=act, vision_feature_select_strategy=hf_select_strategy(tower),
        vision_feature_layer=tower.feature_layer, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)), **extra)
    config.dtype = dtype
    # Built on the meta device (no memory, no random init), then every weight is assigned from our model.
    try:
        with torch.device("meta"):
            hf = model_class(config)
    except (AttributeError, KeyError, ValueError) as err:
        raise ExportError(
            f"transformers' {model_class.__name__} cannot hold this {text_config.model_type} LLM ({err}); "
            "e.g. its weight tying expects the input embeddings at `embed_tokens`, which GPT-2-style LLMs with tied "
            "embeddings lack. Keep llava-kit's format (`llava-kit merge`, `llava-kit serve`) for this model") from None
    hf.model.vision_tower.load_state_dict(tower.vision_model.state_dict(), strict=True, assign=True)
    hf.model.multi_modal_projector.load_state_dict(projector_state, strict=True, assign=True)
    decoder = getattr(llm, llm.base_model_prefix)
    hf.model.language_model.load_state_dict(decoder.state_dict(), strict=True, assign=True)
    hf.lm_head.load_state_dict(llm.get_output_embeddings().state_dict(), strict=True, assign=True)
    if is_next:
        hf.model.image_newline = torch.nn.Parameter(model.image_newline.detach().to("cpu", copy=True))
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = stop_token_ids(tokenizer, settings.template)
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    tokenizer = copy.deepcopy(tokenizer)  # the export's EOS differs; the caller's tokenizer stays as it is
    # the chat template first: it writes EOS literally
    processor = (build_next_processor if is_next else build_processor)(model, tokenizer, settings)
    _end_turns_with_eos(tokenizer, settings)
    processor.save_pretrained(out_dir)
    return out_dir


def export_model(model_dir: str | Path, out_dir: str | Path, fmt: str = "hf-llava",
                 trust_remote_code: bool = False) -> Path:
    """Export a merged model or run directory to `fmt` ("hf-llava", or "hf-llava-next" for AnyRes models)."""
    from llava_kit.loader import open_model_dir

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    loaded = open_model_dir(model_dir, trust_remote_code=trust_remote_code)
    if not loaded.modality.has_images:
        raise ExportError(f"{model_dir} is a text-only model; hf-llava holds vision-language models. A merged text "
                          "run is already a transformers model directory: load it with AutoModelForCausalLM")
    model, tokenizer, settings = loaded.model, loaded.tokenizer, loaded.settings
    check_exportable(model, fmt)  # before folding LoRA: fail fast
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    out = to_hf_llava(model, tokenizer, settings, out_dir, fmt)
    logger.info("exported %s to %s (%s: %s + AutoProcessor)", model_dir, out, fmt,
                "LlavaNextForConditionalGeneration" if fmt == "hf-llava-next" else "LlavaForConditionalGeneration")
    return out
