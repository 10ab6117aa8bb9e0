"""Trainability as data: frozen / lora / full per component, applied in one place and logged."""

from __future__ import annotations

import logging

from llava_kit.config import LORA_INITS, FreezeConfig, LoraConfig, TrainableConfig
from llava_kit.errors import ConfigError, UsageError
from llava_kit.model.llava import LlavaModel, causal_lm_of

logger = logging.getLogger(__name__)


def peft_lora_config(lora: LoraConfig, task_type: str | None = "CAUSAL_LM"):
    """The peft LoraConfig for our LoRA settings (`all-linear` excludes the LM head in peft; rsLoRA, DoRA and the
    PiSSA / OLoRA / LoftQ initialisations are peft's own implementations)."""
    from peft import LoftQConfig
    from peft import LoraConfig as PeftLoraConfig

    extra = {"loftq_config": LoftQConfig(loftq_bits=4)} if lora.init == "loftq" else {}
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                          init_lora_weights=LORA_INITS[lora.init], task_type=task_type, **extra)


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


def apply_freeze(llm, freeze: FreezeConfig) -> list[str]:
    """Freeze tuning: train the last `train_layers` decoder layers of a causal LM (the first ones when negative) and
    the modules `train_modules` name (exact paths in the causal LM); everything else stays as it is (frozen).
    Returns the paths trained, for the log."""
    lm = causal_lm_of(llm)
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"`model.trainable.llm: freeze` trains decoder layers, but {type(lm).__name__} has no "
                          "`layers` list in its decoder; name modules in `model.freeze.train_modules` and set "
                          "`model.freeze.train_layers: 0`")
    n = freeze.train_layers
    if abs(n) > len(layers):
        raise ConfigError(f"`model.freeze.train_layers` is {n} but the LLM has {len(layers)} decoder layers")
    indices = list(range(len(layers)))[-n:] if n > 0 else list(range(len(layers)))[:-n] if n < 0 else []
    for i in indices:
        layers[i].requires_grad_(True)
    trained = [f"layers {indices[0]}-{indices[-1]}"] if indices else []
    names = dict(lm.named_modules())
    for path in freeze.train_modules:
        if path not in names:
            top = sorted({name.split(".layers.")[0] for name in names if name and ".layers." not in name})[:12]
            raise ConfigError(f"`model.freeze.train_modules`: the LLM has no module {path!r} (exact paths, e.g. "
                              f"{', '.join(top)})")
        names[path].requires_grad_(True)
        trained.append(path)
    return trained


def apply_trainability(model: LlavaModel, trainable: TrainableConfig, lora: LoraConfig,
                       gradient_checkpointing: bool = False, freeze: FreezeConfig | None = None) -> None:
    """Freeze everything, then unfreeze or add LoRA per component as `trainable` says."""
    model.requires_grad_(False)
    if trainable.projector == "full":
        model.multi_modal_projector.requires_grad_(True)
        if model.image_newline is not None:  # AnyRes: the row end is trained with the projector (LLaVA-NeXT)
            model.image_newline.requires_grad_(True)
    if trainable.llm == "full":
        model.language_model.requires_grad_(True)
    elif trainable.llm == "freeze":
        logger.info("freeze tuning: training %s of the LLM", ", ".join(apply_freeze(model.language_model,
                                                                                   freeze or FreezeConfig())))
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
