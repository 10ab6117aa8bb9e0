"""Trainability as data: frozen / lora / full per component, applied in one place and logged."""

from __future__ import annotations

import logging

from llava_kit.config import LoraConfig, TrainableConfig
from llava_kit.errors import UsageError
from llava_kit.model.llava import LlavaModel

logger = logging.getLogger(__name__)


def peft_lora_config(lora: LoraConfig, task_type: str | None = "CAUSAL_LM"):
    """The peft LoraConfig for our LoRA settings (`all-linear` excludes the LM head in peft; rsLoRA and DoRA
    are peft's own implementations)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                          task_type=task_type)


def check_qlora_available() -> None:
    """Raise a ValueError that says what is missing when QLoRA (4-bit base + LoRA) cannot run here."""
    import importlib.util

    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible to torch)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise UsageError("model.trainable.llm=qlora loads the LLM in 4 bits, which needs " + " and ".join(missing)
                         + "; on this machine use model.trainable.llm=lora (the same adapter on an unquantised base)")


def qlora_quantization_config(compute_dtype):
    """4-bit NF4 with double quantization (the QLoRA paper's settings); matmuls run in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def compute_dtype(precision: str):
    """The torch dtype of a precision name: bf16, fp16, else float32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def qlora_settings(llm_mode: str, precision: str):
    """(load dtype, bitsandbytes config) for QLoRA (`llm_mode` qlora), (fp32, None) otherwise; refuses QLoRA where
    it cannot run."""
    import torch

    if llm_mode != "qlora":
        return torch.float32, None
    check_qlora_available()
    dtype = compute_dtype(precision) if precision != "fp32" else torch.bfloat16
    return dtype, qlora_quantization_config(dtype)


def add_lora(llm, lora: LoraConfig, quantized: bool = False, gradient_checkpointing: bool = False):
    """Wrap a causal LM with a peft LoRA adapter; a 4-bit base is first prepared for k-bit training."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:  # norms and embeddings to fp32, input grads on, so the adapters train stably over a 4-bit base
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(llm, peft_lora_config(lora))


def apply_trainability(model: LlavaModel, trainable: TrainableConfig, lora: LoraConfig,
                       gradient_checkpointing: bool = False) -> None:
    """Freeze everything, then unfreeze or add LoRA per component as `trainable` says."""
    model.requires_grad_(False)
    if trainable.projector == "full":
        model.multi_modal_projector.requires_grad_(True)
        if model.image_newline is not None:  # AnyRes: the row end is trained with the projector (LLaVA-NeXT)
            model.image_newline.requires_grad_(True)
    if trainable.llm == "full":
        model.language_model.requires_grad_(True)
    elif trainable.llm in ("lora", "qlora"):
        model.language_model = add_lora(model.language_model, lora, quantized=trainable.llm == "qlora",
                                        gradient_checkpointing=gradient_checkpointing)
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
