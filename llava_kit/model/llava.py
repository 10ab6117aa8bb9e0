"""The composite model: vision tower -> multi-modal projector -> causal LM, as a transformers `PreTrainedModel`.

    model = LlavaModel.from_parts(tower, projector, llm, image_token_id)      # training: pretrained parts
    model.save_pretrained(out_dir)                                           # config.json + model.safetensors
    model = LlavaModel.from_pretrained(out_dir)                              # or AutoModel.from_pretrained

Names follow transformers' `modeling_llava.py` (`vision_tower`, `multi_modal_projector`, `language_model`,
`get_image_features`, `get_placeholder_mask`), so exporting to the llava-hf format is a renaming. Each `<image>`
in `input_ids` has already been expanded by the tokenizer step to `tokens_per_image` placeholder positions; the
projector's output is scattered into them.

With `model.vision.image_strategy: anyres` (llava_kit/model/anyres.py) an image is several views (its base view,
then its tiles) and its token count depends on its size, as in transformers' `modeling_llava_next.py`:
`pixel_values` [n_views, 3, H, W] holds every image's views one image after the other, `image_sizes` [n_images, 2]
their (height, width), from which each image's tile grid, views and tokens follow; `image_newline` (a learned
[llm_width] vector, trained with the projector) ends each row of an image's tile map.

`LlavaKitConfig` (model_type "llava_kit") holds what rebuilds the architecture without any other file: the
tower's description (`VisionTower.to_config()`: a transformers vision config and image-processor settings, or an
open_clip architecture), the projector's constructor arguments, the LLM's config as `text_config` and the image
token id. How the model is prompted and what it was trained with live beside it in llava_kit.json
(llava_kit/store/merged.py).
Importing `llava_kit.model` registers both classes with transformers' Auto classes (no remote code), so
`AutoModel.from_pretrained(merged_dir)` works once llava_kit is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec

from llava_kit.data.encode import IGNORE_INDEX

MODEL_TYPE = "llava_kit"
FORMAT_VERSION = 1
"""Version of the composite's config.json layout (`llava_kit_format`); readers refuse newer ones."""


def causal_lm_of(language_model):
    """The plain transformers causal LM, whether or not peft wraps it."""
    return language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model


@strict
class LlavaKitConfig(PreTrainedConfig):
    """Configuration of `LlavaModel`: the three parts' architectures plus the image token and prompting settings."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    """The causal LM's config (any family transformers knows)."""
    vision: dict | None = None
    """The vision tower's architecture and preprocessing (`VisionTower.to_config()`)."""
    projector: dict | None = None
    """The projector's constructor arguments: name, options, vision_width, llm_width, grid, has_cls."""
    image_token_id: int = -1
    """Id of `<image>` in the tokenizer; each one is expanded to the projector's token count."""
    image_strategy: dict | None = None
    """None: the fixed strategy (one view per image). AnyRes: `AnyRes.to_dict()` (tile size, pinpoints, caps)."""
    llava_kit_format: int = FORMAT_VERSION
    """Layout version of this config; a newer one is refused by older llava-kit with a clear message."""
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The LLM ties its own embeddings (or not); the composite adds no tying of its own.
        self.tie_word_embeddings = False


class LlavaModel(PreTrainedModel):
    """Vision tower + projector + language model, trained and served as one module."""

    config_class = LlavaKitConfig
    config: LlavaKitConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    # Tells the HF Trainer that forward() takes `num_items_in_batch` (the supervised tokens of the whole
    # accumulated, all-process batch) and returns sum / num_items_in_batch, as transformers' causal LMs do.
    accepts_loss_kwargs = True

    def __init__(self, config: LlavaKitConfig, vision_tower: nn.Module | None = None,
                 multi_modal_projector: nn.Module | None = None, language_model: nn.Module | None = None):
        """Build the three parts from `config` (random weights: `from_pretrained` loads them), or take them given.

        Parts given are pretrained modules (`from_parts`): they are marked initialised, so the weight
        initialisation that `post_init` runs never touches them.
        """
        from llava_kit.model.projectors import build_projector
        from llava_kit.model.vision import vision_tower_from_config

        super().__init__(config)
        given = [m for m in (vision_tower, multi_modal_projector, language_model) if m is not None]
        for part in given:
            for module in part.modules():
                module._is_hf_initialized = True
        self.vision_tower = vision_tower if vision_tower is not None else vision_tower_from_config(config.vision)
        if multi_modal_projector is None:
            p = config.projector
            multi_modal_projector = build_projector(p["name"], p["vision_width"], p["llm_width"], tuple(p["grid"]),
                                                    has_cls=p["has_cls"], **p.get("options", {}))
        self.multi_modal_projector = multi_modal_projector
        self.anyres = self._anyres_of(config.image_strategy, multi_modal_projector)
        if self.anyres is not None and self.anyres.token_grid is not None:
            # transformers' LlavaNextModel's init: normal, std 1 / sqrt(d) (a trained checkpoint replaces it)
            width = multi_modal_projector.llm_width
            self.image_newline = nn.Parameter(torch.randn(width) / width ** 0.5)
        else:
            self.register_parameter("image_newline", None)
        self.language_model = language_model if language_model is not None else \
            AutoModelForCausalLM.from_config(config.text_config)
        self._no_split_modules = list(getattr(causal_lm_of(self.language_model), "_no_split_modules", None) or [])
        self.post_init()

    @staticmethod
    def _anyres_of(image_strategy: dict | None, projector):
        """The AnyRes settings of a config's `image_strategy` (None: fixed), refused where the projector cannot
        take tiles."""
        if image_strategy is None:
            return None
        from llava_kit.model.anyres import AnyRes
        from llava_kit.model.projectors import ProjectorError

        refusal = projector.tiles_refusal()
        if refusal:
            raise ProjectorError(f"projector {getattr(projector, 'name', type(projector).__name__)!r} cannot take "
                                 f"AnyRes tiles: {refusal}")
        return AnyRes.from_dict(image_strategy)

    @classmethod
    def from_parts(cls, vision_tower: nn.Module, multi_modal_projector: nn.Module, language_model: nn.Module,
                   image_token_id: int, anyres=None) -> LlavaModel:
        """The composite of pretrained parts (a tower, a projector, a causal LM), without copying any weight;
        `anyres` (llava_kit.model.anyres.AnyRes) reads images as tiles, None at the tower's one input size."""
        projector = multi_modal_projector
        # The LLM's own config object is the composite's text_config (one truth: resizing the embeddings updates
        # both). Building a config resets its sub-configs' attention kernel, so the LLM's choice is put back.
        text_config = causal_lm_of(language_model).config.get_text_config()
        attention = text_config._attn_implementation
        config = LlavaKitConfig(
            text_config=text_config, vision=vision_tower.to_config(),
            projector={"name": getattr(projector, "name", None), "options": dict(getattr(projector, "options", {})),
                       "vision_width": projector.vision_width, "llm_width": projector.llm_width,
                       "grid": list(projector.grid), "has_cls": projector.has_cls},
            image_token_id=image_token_id, image_strategy=anyres.to_dict() if anyres is not None else None)
        text_config._attn_implementation_internal = attention
        return cls(config, vision_tower, multi_modal_projector, language_model)

    def _init_weights(self, module: nn.Module) -> None:
        """Only what a checkpoint does not hold: fixed buffers (e.g. the resampler's sin-cos positions).

        Tower and LLM initialise themselves (transformers dispatches to their own `_init_weights`); projectors
        initialise their parameters in their constructors.
        """
        if hasattr(module, "init_buffers"):
            module.init_buffers()

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @image_token_id.setter
    def image_token_id(self, value: int) -> None:
        self.config.image_token_id = value

    @property
    def tokens_per_image(self) -> int:
        """Tokens of one view: of every image under the fixed strategy; AnyRes: see `image_token_counts`."""
        return self.multi_modal_projector.num_output_tokens

    def image_token_counts(self, image_sizes) -> list[int]:
        """The token count of each image of one sample, from their (height, width): known before any pixel is read."""
        if self.anyres is None:
            return [self.tokens_per_image] * len(image_sizes)
        return self.anyres.sample_tokens([tuple(size) for size in image_sizes])

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device  # the identity projector has no parameters

    def get_input_embeddings(self) -> nn.Module:
        return causal_lm_of(self.language_model).get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        causal_lm_of(self.language_model).set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return causal_lm_of(self.language_model).get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return causal_lm_of(self.language_model).get_decoder()

    def get_image_features(self, pixel_values: torch.Tensor | None = None,
                           vision_features: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                           image_token_caps: torch.Tensor | None = None) -> torch.Tensor:
        """[n_views, 3, H, W] pixels, or the tower's output [n_views, n_patches, C] already computed (the
        frozen-feature cache) -> [n_images, tokens_per_image, llm_width] (fixed: one view per image), or under AnyRes
        every image's tokens one image after the other, [total image tokens, llm_width] (see `pack_image_features`).
        """
        if vision_features is None:
            vision_features = self.encode_images(pixel_values)
        projected = self.project_features(vision_features)  # [n_views, tokens_per_image, d]
        if self.anyres is None:
            return projected
        return self.pack_image_features(projected, image_sizes, image_token_caps)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's output [n_views, n_patches, C] of [n_views, 3, H, W] pixels."""
        tower_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        tower_dtype = next(self.vision_tower.parameters()).dtype
        # A frozen tower needs no autograd graph: skipping it saves the activations' memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
            return self.vision_tower.encode(pixel_values.to(tower_dtype))

    def project_features(self, vision_features: torch.Tensor, projector: nn.Module | None = None) -> torch.Tensor:
        """Tower features [n_views, n_patches, C] -> [n_views, tokens_per_image, llm_width] through the projector
        (or `projector`, e.g. the preference stages' frozen reference copy)."""
        projector = projector if projector is not None else self.multi_modal_projector
        features = vision_features.to(self.device)
        # A projector without parameters (identity) takes the features as they are.
        projector_dtype = next(projector.parameters(), features).dtype
        return projector(features.to(projector_dtype))

    def pack_image_features(self, projected: torch.Tensor, image_sizes: torch.Tensor | None,
                            image_token_caps: torch.Tensor | None = None) -> torch.Tensor:
        """AnyRes: the projected views [n_views, tokens_per_image, d] of images of `image_sizes` [n_images, 2]
        (height, width) -> their tokens [total, d]: each image's base view, then its tile map (unpadded, pooled
        under its cap from `image_token_caps` [n_images] (0: the model's own), a newline per row)."""
        if image_sizes is None:
            raise ValueError("an AnyRes model needs image_sizes [n_images, 2] (height, width) with its pixel values: "
                             "each image's tiles and token count follow from its size")
        sizes = image_sizes.tolist()
        caps = image_token_caps.tolist() if image_token_caps is not None else [0] * len(sizes)
        layouts = [self.anyres.layout(size, cap) for size, cap in zip(sizes, caps, strict=True)]
        if sum(layout.views for layout in layouts) != projected.shape[0]:
            raise ValueError(f"image features and image sizes do not match: {projected.shape[0]} views for "
                             f"{len(sizes)} image(s) of sizes {sizes}, which have "
                             f"{sum(layout.views for layout in layouts)}")
        views = projected.split([layout.views for layout in layouts])
        packed = [self.anyres.pack(v, layout, self.image_newline) for v, layout in zip(views, layouts, strict=True)]
        return torch.cat(packed)  # [sum of the images' tokens, d]

    def get_placeholder_mask(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Boolean mask [batch, seq] of the image placeholder positions; checks the counts agree."""
        mask = input_ids == self.image_token_id
        n_positions, n_features = int(mask.sum()), image_features.numel() // image_features.shape[-1]
        if n_positions != n_features:
            what = (f"{image_features.shape[0]} image(s) x {image_features.shape[1]} tokens"
                    if image_features.dim() == 3 else f"{n_features} image tokens")
            raise ValueError(f"image features and image tokens do not match: {n_positions} placeholder positions "
                             f"for {what}")
        return mask

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              vision_features: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
              image_token_caps: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholders: [batch, seq, d].

        The images come as pixels, tower features, or `image_features` already projected (`get_image_features`'
        output: computed once and reused, as the preference stages do for the two rows of a pair)."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        images = next((x for x in (image_features, vision_features, pixel_values) if x is not None), None)
        if images is None or images.shape[0] == 0:
            if bool((input_ids == self.image_token_id).any()):
                raise ValueError("input_ids contain image placeholders but no pixel_values were given")
            return inputs_embeds
        if image_features is None:
            image_features = self.get_image_features(pixel_values, vision_features, image_sizes, image_token_caps)
        image_features = image_features.to(inputs_embeds.dtype)
        mask = self.get_placeholder_mask(input_ids, image_features)
        # masked_scatter fills the True positions in row-major order: images in batch order.
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, image_token_caps: torch.Tensor | None = None,
                paired_rows: bool = False, return_logps: bool = False, **kwargs):
        """With labels: {"loss"}; the LM head runs only where a label is set. Without: the LM's output.

        The loss is the mean over this batch's supervised tokens, or, when the Trainer passes
        `num_items_in_batch`, their sum divided by it (token-weighted across accumulation and processes).

        The preference stages (llava_kit/train/preference.py) pass `paired_rows`: the batch is 2B rows, B chosen
        conversations then the B rejected ones, and the images are the B pairs' (each encoded once, its features
        used for both rows); and `return_logps`: instead of the loss, {"logps": [rows] the log-probabilities of the
        labelled tokens summed per row, "n_tokens": [rows] their count, "vision_features": the tower's output,
        detached, for the reference pass to reuse}.
        """
        image_features = None
        if paired_rows and (pixel_values is not None or vision_features is not None):
            if vision_features is None:
                vision_features = self.encode_images(pixel_values)  # once per pair
            image_features = self.get_image_features(None, vision_features, image_sizes, image_token_caps)
            image_features = torch.cat([image_features, image_features])  # chosen rows, then rejected rows
        inputs_embeds = self.embed(input_ids, pixel_values, vision_features, image_sizes, image_token_caps,
                                   image_features=image_features)
        if labels is None:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        lm = causal_lm_of(self.language_model)
        # use_cache=False: training needs no KV cache (and a cache would disable packed-sequence masking).
        kwargs["use_cache"] = False
        hidden = lm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  **kwargs).last_hidden_state
        # Position t predicts token t+1. Only labelled positions need logits: with a 32k vocabulary the
        # full [batch, seq, vocab] tensor would dominate the step, mostly over unlabelled image tokens.
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # [batch, seq-1]
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # [n_labelled, vocab]
        if return_logps:
            logps, n_tokens = answer_logps(logits, targets, keep)
            features = vision_features.detach() if vision_features is not None else None
            return {"logps": logps + hidden.sum() * 0.0, "n_tokens": n_tokens, "vision_features": features}
        if logits.shape[0] == 0:  # a batch with nothing to learn: a zero loss that keeps the graph
            return {"loss": hidden.sum() * 0.0}
        if num_items_in_batch is None:
            return {"loss": F.cross_entropy(logits.float(), targets[keep])}
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / num_items_in_batch
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                 image_token_caps: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate from a prompt with images; returns only the new tokens [batch, new].

        `generate_kwargs` are those of `llava_kit.model.generation.generate` (max_new_tokens, do_sample,
        temperature, top_p, eos_token_id, pad_token_id, streamer, ...).
        """
        from llava_kit.model.generation import generate  # here: generation.py imports this module

        inputs_embeds = self.embed(input_ids, pixel_values, image_sizes=image_sizes, image_token_caps=image_token_caps)
        return generate(self.language_model, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        **generate_kwargs)


def answer_logps(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the log-probabilities of the labelled tokens summed, and their count.

    `logits` [n_labelled, vocab] are those of the positions where `keep` [rows, seq] is True (row-major order),
    `targets` [rows, seq] the next tokens. Returns ([rows] float32 sums, [rows] counts)."""
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero(as_tuple=True)[0]
    sums = torch.zeros(keep.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)
    return sums, keep.sum(dim=1)


def is_composite_dir(path) -> bool:
    """True for a directory holding a saved `LlavaModel` (config.json with model_type "llava_kit")."""
    import json
    import os

    config_file = os.path.join(str(path), "config.json")
    if not os.path.isfile(config_file):
        return False
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_composite_llm(path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The causal LM inside a saved `LlavaModel` directory (only its weights are read), with its generation config:
    a merged model's LLM can start a new run (`model.llm.name_or_path: MERGED_DIR`)."""
    from transformers import GenerationConfig

    from llava_kit.model.weights import read_prefixed_weights

    config = LlavaKitConfig.from_pretrained(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    llm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]  # the Auto class needs a path; the class not
    llm = llm_class.from_pretrained(None, config=config.text_config, dtype=dtype,
                                    state_dict=read_prefixed_weights(path, "language_model."), **extra)
    try:
        llm.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # no generation_config.json: the defaults from the config
    return llm


def load_composite_tower(path, feature_layer, select_strategy: str):
    """The vision tower inside a saved `LlavaModel` directory (only its weights are read), with this run's layer
    choice: a merged model's tower can start a new run (`model.vision.name_or_path: MERGED_DIR`)."""
    from llava_kit.model.vision import vision_tower_from_config
    from llava_kit.model.weights import read_prefixed_weights

    config = LlavaKitConfig.from_pretrained(path)
    tower = vision_tower_from_config({**config.vision, "feature_layer": feature_layer,
                                      "select_strategy": select_strategy})
    tower.load_state_dict(read_prefixed_weights(path, "vision_tower."), strict=True)
    return tower.eval()


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` know model_type "llava_kit" (idempotent)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, LlavaKitConfig)
    AutoModel.register(LlavaKitConfig, LlavaModel)
    AutoModelForImageTextToText.register(LlavaKitConfig, LlavaModel)
