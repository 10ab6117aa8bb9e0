"""One object per modality: everything that differs between text-only and multimodal models, chosen once.

    modality = modality_for_stage(cfg.stage)        # training: from the stage
    modality = loaded.modality                       # inference: from what the model directory holds

|                      | MULTIMODAL (pretrain, sft, dpo)                 | TEXT (text-pt, text-sft, text-dpo)        |
|----------------------|-------------------------------------------------|-------------------------------------------|
| model for training   | tower + projector + LLM (`LlavaModel`)          | the LLM alone (a transformers causal LM)  |
| training data        | LLaVA JSON, images checked, feature cache       | text / conversations, mixed, packed       |
| run directory        | projector + adapter / llm / vision + tokenizer  | adapter + tokenizer, or llm/              |
| merged directory     | a `LlavaModel` transformers directory           | a plain transformers LLM + its spec       |
| prompts              | chat template, `<image>` expanded per image     | chat template, or plain continuation      |

Callers (the engine, the loader, merge, the generation service) ask the modality object instead of checking the
stage or the model's attributes themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava_kit.config import PREFERENCE_STAGES, STAGE_MODALITY, RunConfig
from llava_kit.data.encode import NO_IMAGE_TOKEN, encode_messages
from llava_kit.errors import UsageError
from llava_kit.model.llava import LlavaModel
from llava_kit.store.specs import COMPLETION, InferenceSettings

logger = logging.getLogger(__name__)

DATA_REPORT = "data_report.json"
EVAL_DATA_REPORT = "eval_data_report.json"  # the held-out data's (data.eval_path)

class Modality:
    """The behaviour one modality gives its stages and models; see the module docstring."""

    name: str = ""
    has_images: bool = False

    # ---------------------------------------------------------------- training
    def build_for_training(self, cfg: RunConfig, precision: str, attention: str | None, checkpointing: bool):
        """(model, tokenizer) with trainability applied, as `cfg.model` says."""
        raise NotImplementedError

    def build_dataset(self, cfg: RunConfig, model, tokenizer, device: torch.device, report: str = DATA_REPORT):
        """The training dataset (its `.report` says what was kept and skipped; written to RUN_DIR/`report` when the
        data stops the run)."""
        raise NotImplementedError

    def build_eval_dataset(self, cfg: RunConfig, model, tokenizer, device: torch.device):
        """The held-out dataset of `data.eval_path`, read and encoded exactly as the training data is (the same
        builder: template, lengths, images, feature cache), with its own report (eval_data_report.json)."""
        held_out = cfg.model_copy(deep=True)
        held_out.data.path, held_out.data.datasets = cfg.data.eval_path, []
        return self.build_dataset(held_out, model, tokenizer, device, report=EVAL_DATA_REPORT)

    def language_model(self, model):
        """The causal LM inside `model` (for gradient checkpointing, generation)."""
        raise NotImplementedError

    def save_run(self, model, tokenizer, cfg: RunConfig, run_dir: Path, writer: bool = True) -> None:
        """Write what the run trained into its run directory (collective under ZeRO-3)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- directories
    def inference_settings(self, cfg: RunConfig) -> InferenceSettings:
        """How a model trained with `cfg` is prompted."""
        raise NotImplementedError

    def open_run(self, run_dir: Path, cfg: RunConfig, dtype: torch.dtype, trust_remote_code: bool):
        """(model, tokenizer) of a run directory: the base rebuilt from config.yaml plus what the run trained."""
        raise NotImplementedError

    def write_merged(self, model, tokenizer, settings: InferenceSettings, out_dir: Path, source: str,
                     stage: str) -> Path:
        """Fold any LoRA into the LLM and write a standalone model directory."""
        raise NotImplementedError

    # ---------------------------------------------------------------- prompts
    def encode_prompt(self, messages: list[dict], n_images: int, tokenizer, settings: InferenceSettings,
                      model, image_sizes: list | None = None) -> list[int]:
        """Token ids of a conversation ending where the answer starts (never truncated); `image_sizes` (each image's
        (height, width)) are needed where a model's token count per image depends on it (AnyRes)."""
        raise NotImplementedError

    def preprocess_images(self, images: list, model, settings: InferenceSettings) -> torch.Tensor | None:
        """RGB PIL images -> pixel values [n_views, 3, H, W] for the model's tower, one view per image (AnyRes: each
        image's base view and tiles, one image after the other); None without images."""
        raise NotImplementedError


class MultimodalModality(Modality):
    """pretrain, sft and dpo: a vision tower, a projector and an LLM."""

    name = "multimodal"
    has_images = True

    def build_for_training(self, cfg, precision, attention, checkpointing):
        from llava_kit.model.build import build_llava
        from llava_kit.model.trainable import apply_trainability, qlora_settings
        from llava_kit.store.projector_files import load_projector

        _, quantization = qlora_settings(cfg.model.trainable.llm, precision)
        model, tokenizer = build_llava(cfg.model, torch.float32, quantization_config=quantization,
                                       attn_implementation=attention)
        if quantization is not None:  # the 4-bit LLM sits on its GPU already; tower and projector join it
            from transformers.utils.quantization_config import QuantizationMethod

            device = next(model.language_model.parameters()).device
            model.vision_tower.to(device)
            model.multi_modal_projector.to(device)
            # the Trainer skips its own .to(device) for bitsandbytes models (4-bit weights must not be moved)
            model.quantization_method = QuantizationMethod.BITS_AND_BYTES
        if cfg.model.init_from:
            load_projector(model, cfg.model.init_from, template=cfg.data.template)
            logger.info("projector initialised from %s", cfg.model.init_from)
        apply_trainability(model, cfg.model.trainable, cfg.model.lora, checkpointing, cfg.model.freeze)
        return model, tokenizer

    def build_dataset(self, cfg, model, tokenizer, device, report=DATA_REPORT):
        from llava_kit.data.multimodal import attach_feature_cache, build_multimodal_dataset
        from llava_kit.data.preference import build_preference_dataset

        def preference_pairs():  # dpo: pairs whose images are encoded once per pair (feature-cached when frozen)
            tower = model.vision_tower
            images = {"image_aspect": cfg.data.image_aspect, "image_preprocess": tower.preprocess,
                      "image_mean": tower.image_mean}
            pairs = build_preference_dataset(cfg, tokenizer, model.image_token_id, model.tokens_per_image, images)
            attach_feature_cache(cfg, model, pairs, device)
            return pairs

        build = preference_pairs if cfg.stage in PREFERENCE_STAGES else \
            lambda: build_multimodal_dataset(cfg, model, tokenizer, device)
        dataset = _reporting(cfg, build, report)
        # images that fail to decode during training are added to the run's report (llava_kit/data/dataset.py)
        getattr(dataset, "dataset", dataset).report_path = Path(cfg.output_dir) / report
        return dataset

    def language_model(self, model):
        return model.language_model

    def save_run(self, model, tokenizer, cfg, run_dir, writer=True):
        from llava_kit.store.run_dir import save_multimodal_run

        save_multimodal_run(model, tokenizer, cfg, run_dir, writer=writer)

    def inference_settings(self, cfg):
        d = cfg.data
        return InferenceSettings(d.template, d.system_prompt, d.image_aspect, d.max_seq_len)

    def open_run(self, run_dir, cfg, dtype, trust_remote_code):
        from llava_kit.store.run_dir import open_multimodal_run

        return open_multimodal_run(run_dir, cfg, dtype, trust_remote_code)

    def write_merged(self, model, tokenizer, settings, out_dir, source, stage):
        from llava_kit.store.merged import write_merged
        from llava_kit.store.projector_files import read_projector_spec

        if hasattr(model.language_model, "merge_and_unload"):
            model.language_model = model.language_model.merge_and_unload()
        return write_merged(model, tokenizer, settings, out_dir, read_projector_spec(source), merged_from=source)

    def encode_prompt(self, messages, n_images, tokenizer, settings, model, image_sizes=None):
        counts = model.tokens_per_image
        if model.anyres is not None:  # each image's own count, from its size (and the sample's budget)
            if image_sizes is None or len(image_sizes) != n_images:
                raise UsageError("this model reads images at any resolution (AnyRes): encoding a prompt needs each "
                                 "image's (height, width)")
            counts = model.image_token_counts(image_sizes)
        return encode_messages(messages, tokenizer, settings.template, model.image_token_id, counts,
                               max_seq_len=None, n_images=n_images, system_prompt=settings.system_prompt,
                               add_generation_prompt=True).input_ids

    def preprocess_images(self, images, model, settings):
        from llava_kit.data.images import prepare_image

        if not images:
            return None
        tower = model.vision_tower
        if model.anyres is not None:  # the base view and the tiles of each image (data.image_aspect: fixed only)
            return tower.preprocess([view for image in images for view in model.anyres.views(image)])
        return tower.preprocess([prepare_image(image, settings.image_aspect, tower.image_mean) for image in images])


class TextModality(Modality):
    """text-pt, text-sft and text-dpo: the LLM alone."""

    name = "text"
    has_images = False

    def build_for_training(self, cfg, precision, attention, checkpointing):
        from llava_kit.model.build import load_llm, load_tokenizer
        from llava_kit.model.trainable import add_lora, apply_freeze, qlora_settings

        remote_code = cfg.model.llm.trust_remote_code
        tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.name_or_path, remote_code)
        mode = cfg.model.trainable.llm
        dtype, quantization = qlora_settings(mode, precision)
        llm = load_llm(cfg.model.llm.name_or_path, dtype, quantization, remote_code, attention)
        if mode in ("lora", "qlora"):
            llm = add_lora(llm, cfg.model.lora, quantized=mode == "qlora", gradient_checkpointing=checkpointing)
        elif mode == "freeze":
            llm.requires_grad_(False)
            logger.info("freeze tuning: training %s of the LLM", ", ".join(apply_freeze(llm, cfg.model.freeze)))
        else:
            llm.requires_grad_(True)
        trained = sum(p.numel() for p in llm.parameters() if p.requires_grad)
        logger.info("trainable language_model %s / %s (%s)", f"{trained:,}",
                    f"{sum(p.numel() for p in llm.parameters()):,}", mode)
        return llm, tokenizer

    def build_dataset(self, cfg, model, tokenizer, device, report=DATA_REPORT):
        from llava_kit.data.preference import build_preference_dataset
        from llava_kit.data.text import build_text_dataset

        if cfg.stage in PREFERENCE_STAGES:
            return _reporting(cfg, lambda: build_preference_dataset(cfg, tokenizer), report)
        return _reporting(cfg, lambda: build_text_dataset(cfg.data, cfg.stage, tokenizer, seed=cfg.seed), report)

    def language_model(self, model):
        return model

    def save_run(self, model, tokenizer, cfg, run_dir, writer=True):
        from llava_kit.store.run_dir import save_text_run

        save_text_run(model, tokenizer, cfg, run_dir, writer=writer)

    def inference_settings(self, cfg):
        """A text-sft (text-dpo) model is prompted with its chat template; a text-pt model continues plain text."""
        template = COMPLETION if cfg.stage == "text-pt" else cfg.data.template
        return InferenceSettings(template, cfg.data.system_prompt, "pad", cfg.data.max_seq_len)

    def open_run(self, run_dir, cfg, dtype, trust_remote_code):
        from llava_kit.store.run_dir import open_text_run

        return open_text_run(run_dir, cfg, dtype, trust_remote_code)

    def write_merged(self, model, tokenizer, settings, out_dir, source, stage):
        from llava_kit.store.merged import write_merged_text
        from llava_kit.store.specs import TextModelSpec

        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        spec = TextModelSpec(stage=stage, inference=settings, merged_from=source)
        return write_merged_text(model, tokenizer, spec, out_dir)

    def encode_prompt(self, messages, n_images, tokenizer, settings, model, image_sizes=None):
        if n_images:
            raise UsageError("this is a text-only model (no vision tower): it cannot look at images; drop the "
                             "image, or use it as model.llm of a pretrain run to give it eyes")
        if settings.template == COMPLETION:  # a text-pt model continues the last message as plain text
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            return bos + tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        return encode_messages(messages, tokenizer, settings.template, NO_IMAGE_TOKEN, 0, max_seq_len=None,
                               system_prompt=settings.system_prompt, add_generation_prompt=True).input_ids

    def preprocess_images(self, images, model, settings):
        if images:
            raise UsageError("this is a text-only model (no vision tower): it cannot look at images; drop the "
                             "image, or use it as model.llm of a pretrain run to give it eyes")
        return None


def _reporting(cfg: RunConfig, build, report_name: str = DATA_REPORT):
    """Build a dataset; when the data stops the run (nothing usable, too many over-long records), log the skip
    reasons by count and write the run's report (data_report.json, or eval_data_report.json for the held-out data)
    first, so the reasons are never lost."""
    from llava_kit.errors import DataError

    try:
        return build()
    except DataError as err:
        report = getattr(err, "report", None)
        if report is not None:
            report.log()
            report.write(Path(cfg.output_dir) / report_name)
        raise


MULTIMODAL = MultimodalModality()
TEXT = TextModality()
MODALITIES = {m.name: m for m in (MULTIMODAL, TEXT)}


def modality_for_stage(stage: str) -> Modality:
    """The modality of a training stage (config.STAGE_MODALITY is the one table saying which is which)."""
    return MODALITIES[STAGE_MODALITY[stage]]


def modality_of_model(model) -> Modality:
    """The modality of a loaded model: a `LlavaModel` is multimodal, a plain causal LM is text."""
    return MULTIMODAL if isinstance(model, LlavaModel) else TEXT


