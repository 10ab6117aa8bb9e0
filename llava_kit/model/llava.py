"""The composite model: vision tower -> multi-modal projector -> causal LM.

Names follow transformers' `modeling_llava.py` (`vision_tower`, `multi_modal_projector`,
`language_model`, `get_image_features`, `get_placeholder_mask`), so exporting to the llava-hf
format is a renaming. Each `<image>` in `input_ids` has already been expanded by the tokenizer
step to `tokens_per_image` placeholder positions; the projector's output is scattered into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_kit.data.encode import IGNORE_INDEX


def causal_lm_of(language_model):
    """The plain transformers causal LM, whether or not peft wraps it."""
    return language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model


class LlavaModel(nn.Module):
    """Vision tower + projector + language model, trained and served as one module."""

    # Tells the HF Trainer that forward() takes `num_items_in_batch` (the supervised tokens of the whole
    # accumulated, all-process batch) and returns sum / num_items_in_batch, as transformers' causal LMs do.
    accepts_loss_kwargs = True

    def __init__(self, vision_tower: nn.Module, multi_modal_projector: nn.Module, language_model: nn.Module,
                 image_token_id: int):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.language_model = language_model
        self.image_token_id = image_token_id

    @property
    def tokens_per_image(self) -> int:
        return self.multi_modal_projector.num_output_tokens

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device  # the identity projector has no parameters

    def get_image_features(self, pixel_values: torch.Tensor | None = None,
                           vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """[n_images, 3, H, W] pixels, or the tower's output [n_images, n_patches, C] already computed (the
        frozen-feature cache) -> [n_images, tokens_per_image, llm_width]."""
        if vision_features is not None:
            features = vision_features.to(self.device)
        else:
            tower_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
            tower_dtype = next(self.vision_tower.parameters()).dtype
            # A frozen tower needs no autograd graph: skipping it saves the activations' memory.
            with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
                features = self.vision_tower.encode(pixel_values.to(tower_dtype))  # [n_images, n_patches, C]
        # A projector without parameters (identity) takes the features as they are.
        projector_dtype = next(self.multi_modal_projector.parameters(), features).dtype
        return self.multi_modal_projector(features.to(projector_dtype))

    def get_placeholder_mask(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Boolean mask [batch, seq] of the image placeholder positions; checks the counts agree."""
        mask = input_ids == self.image_token_id
        n_positions, n_features = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_positions != n_features:
            raise ValueError(f"image features and image tokens do not match: {n_positions} placeholder positions "
                             f"for {image_features.shape[0]} image(s) x {image_features.shape[1]} tokens")
        return mask

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholders: [batch, seq, d]."""
        embeddings = causal_lm_of(self.language_model).get_input_embeddings()
        inputs_embeds = embeddings(input_ids)
        images = vision_features if vision_features is not None else pixel_values
        if images is None or images.shape[0] == 0:
            if bool((input_ids == self.image_token_id).any()):
                raise ValueError("input_ids contain image placeholders but no pixel_values were given")
            return inputs_embeds
        image_features = self.get_image_features(pixel_values, vision_features).to(inputs_embeds.dtype)
        mask = self.get_placeholder_mask(input_ids, image_features)
        # masked_scatter fills the True positions in row-major order: images in batch order.
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                **kwargs):
        """With labels: {"loss"}; the LM head runs only where a label is set. Without: the LM's output.

        The loss is the mean over this batch's supervised tokens, or, when the Trainer passes
        `num_items_in_batch`, their sum divided by it (token-weighted across accumulation and processes).
        """
        inputs_embeds = self.embed(input_ids, pixel_values, vision_features)
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
        if logits.shape[0] == 0:  # a batch with nothing to learn: a zero loss that keeps the graph
            return {"loss": hidden.sum() * 0.0}
        if num_items_in_batch is None:
            return {"loss": F.cross_entropy(logits.float(), targets[keep])}
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / num_items_in_batch
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate from a prompt with images; returns only the new tokens [batch, new].

        `generate_kwargs` are those of `llava_kit.model.generation.generate` (max_new_tokens, do_sample,
        temperature, top_p, eos_token_id, pad_token_id, streamer, ...).
        """
        from llava_kit.model.generation import generate  # here: generation.py imports this module

        inputs_embeds = self.embed(input_ids, pixel_values)
        return generate(self.language_model, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        **generate_kwargs)
