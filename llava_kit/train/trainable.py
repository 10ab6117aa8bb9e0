"""Trainability as data: frozen / lora / full per component, applied in one place and logged."""

from __future__ import annotations

import logging

from llava_kit.config import LoraConfig, TrainableConfig
from llava_kit.model.llava import LlavaModel

logger = logging.getLogger(__name__)


def peft_lora_config(lora: LoraConfig, task_type: str | None = "CAUSAL_LM"):
    """The peft LoraConfig for our LoRA settings (`all-linear` excludes the LM head in peft)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type)


def apply_trainability(model: LlavaModel, trainable: TrainableConfig, lora: LoraConfig) -> None:
    """Freeze everything, then unfreeze or add LoRA per component as `trainable` says."""
    from peft import get_peft_model

    model.requires_grad_(False)
    if trainable.projector == "full":
        model.multi_modal_projector.requires_grad_(True)
    if trainable.llm == "full":
        model.language_model.requires_grad_(True)
    elif trainable.llm == "lora":
        model.language_model = get_peft_model(model.language_model, peft_lora_config(lora))
    if trainable.vision == "full":
        model.vision_tower.requires_grad_(True)
    log_trainable(model)


def parameter_table(model: LlavaModel) -> dict[str, tuple[int, int]]:
    """{component: (trainable, total)} parameter counts."""
    table = {}
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        params = list(getattr(model, name).parameters())
        table[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return table


def log_trainable(model: LlavaModel) -> None:
    for name, (trained, total) in parameter_table(model).items():
        logger.info("trainable %-22s %12s / %-12s (%.2f%%)", name, f"{trained:,}", f"{total:,}",
                    100.0 * trained / max(total, 1))
