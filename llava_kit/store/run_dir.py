"""What a run directory holds, written at the end of a run and read back by `llava_kit.loader`.

    RUN_DIR/config.yaml            the resolved config (everything needed to rebuild the base)
    RUN_DIR/projector.safetensors  the projector's weights          (multimodal runs; AnyRes: + image_newline)
    RUN_DIR/projector.json         its spec and provenance          (multimodal runs)
    RUN_DIR/adapter/               peft LoRA adapter of the LLM     (LoRA / QLoRA runs)
    RUN_DIR/llm/                   the full LLM                     (full fine-tuning runs; text runs: + tokenizer)
    RUN_DIR/vision/                the full vision tower            (tower trained)
    RUN_DIR/tokenizer/             the tokenizer (with `<image>` in multimodal runs)
    RUN_DIR/metrics.jsonl, loss.png, data_report.json, checkpoint-N/ (for resume)

Only trained weights are written; frozen parts are rebuilt from the paths in config.yaml.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llava_kit.config import BASE_CHANGING_INITS, RunConfig
from llava_kit.errors import ModelLoadError
from llava_kit.model.llava import LlavaModel, causal_lm_of
from llava_kit.model.weights import trained_names, whole_state_dict
from llava_kit.store.projector_files import NEWLINE, load_projector, projector_spec, save_projector

RUN_CONFIG = "config.yaml"


def save_multimodal_run(model: LlavaModel, tokenizer, cfg: RunConfig, out_dir: str | Path,
                        writer: bool = True) -> None:
    """Write what a pretrain / sft run trained (see the module docstring) into `out_dir`.

    Under DeepSpeed ZeRO-3 every process must call this: each weight is gathered whole in turn (collectively),
    and only the `writer` (rank 0) keeps the copies and writes them.
    """
    trainable = cfg.model.trainable
    spec = projector_spec(model, cfg, keep=writer)
    projector = whole_state_dict(model.multi_modal_projector, keep=writer)
    projector.update(whole_state_dict(model, only={NEWLINE}, keep=writer))  # AnyRes: trained with the projector
    adapter = llm = vision = None
    if trainable.llm in ("lora", "qlora") and cfg.model.lora.init in BASE_CHANGING_INITS:
        llm = folded_llm_state(model.language_model)
    elif trainable.llm in ("lora", "qlora"):
        adapter = whole_state_dict(model.language_model, only=trained_names(model.language_model), keep=writer)
    elif trainable.llm in ("full", "freeze"):
        llm = whole_state_dict(causal_lm_of(model.language_model), keep=writer)
    if trainable.vision == "full":
        vision = whole_state_dict(model.vision_tower, keep=writer)
    if not writer:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_projector(model, out_dir, spec, projector)
    if adapter is not None:
        # The `<image>` row added to the embeddings is rebuilt deterministically (mean init) from the base,
        # so the adapter needs no copy of the embedding matrices.
        model.language_model.save_pretrained(out_dir / "adapter", state_dict=adapter, save_embedding_layers=False)
    if llm is not None:
        causal_lm_of(model.language_model).save_pretrained(out_dir / "llm", state_dict=llm)
    if vision is not None:
        model.vision_tower.save_pretrained(out_dir / "vision", state_dict=vision)
    tokenizer.save_pretrained(out_dir / "tokenizer")


def folded_llm_state(peft_llm) -> dict[str, torch.Tensor]:
    """The LLM's weights with its LoRA folded in, from a copy (the live model keeps its adapter): what a run whose
    `model.lora.init` changed the base (pissa, olora, loftq) saves, since its adapter alone does not fit the original
    base."""
    import copy

    return {k: v.detach().cpu() for k, v in copy.deepcopy(peft_llm).merge_and_unload().state_dict().items()}


def save_text_run(model, tokenizer, cfg: RunConfig, out_dir: str | Path, writer: bool = True) -> None:
    """A text run: `llm/` (a complete transformers model dir with its tokenizer) or `adapter/` + `tokenizer/`.

    Collective under ZeRO-3, like `save_multimodal_run`; only the `writer` writes."""
    out_dir = Path(out_dir)
    if cfg.model.trainable.llm in ("lora", "qlora") and cfg.model.lora.init in BASE_CHANGING_INITS:
        if writer:
            causal_lm_of(model).save_pretrained(out_dir / "llm", state_dict=folded_llm_state(model))
            tokenizer.save_pretrained(out_dir / "llm")
    elif cfg.model.trainable.llm in ("lora", "qlora"):
        adapter = whole_state_dict(model, only=trained_names(model), keep=writer)
        if writer:
            model.save_pretrained(out_dir / "adapter", state_dict=adapter)
            tokenizer.save_pretrained(out_dir / "tokenizer")
    else:
        llm = whole_state_dict(model, keep=writer)
        if writer:
            model.save_pretrained(out_dir / "llm", state_dict=llm)
            tokenizer.save_pretrained(out_dir / "llm")


def open_multimodal_run(run_dir: Path, cfg: RunConfig, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> tuple[LlavaModel, object]:
    """Rebuild the model a pretrain / sft run trained: base from config.yaml, then its projector, adapter and
    fully trained parts. LoRA stays a peft adapter (merge folds it in)."""
    from llava_kit.model.build import build_llava
    from llava_kit.model.vision import build_vision_tower

    llm_dir = run_dir / "llm"
    model, tokenizer = build_llava(cfg.model, dtype, llm_path=str(llm_dir) if llm_dir.is_dir() else None,
                                   tokenizer_path=str(run_dir / "tokenizer"), trust_remote_code=trust_remote_code)
    if (run_dir / "vision").is_dir():
        v = cfg.model.vision
        model.vision_tower = build_vision_tower(str(run_dir / "vision"), feature_layer=v.feature_layer,
                                                select_strategy=v.select_strategy).to(dtype)
        model.config.vision = model.vision_tower.to_config()
    load_projector(model, run_dir)
    if (run_dir / "adapter").is_dir():
        from peft import PeftModel

        model.language_model = PeftModel.from_pretrained(model.language_model, str(run_dir / "adapter"))
    return model.eval(), tokenizer


def open_text_run(run_dir: Path, cfg: RunConfig, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False):
    """The LLM a text run trained (LoRA folded in) and its tokenizer."""
    from llava_kit.model.build import load_llm, load_tokenizer

    if (run_dir / "llm").is_dir():
        path = str(run_dir / "llm")
        return load_llm(path, dtype, None, trust_remote_code), load_tokenizer(path, trust_remote_code)
    if not (run_dir / "adapter").is_dir():
        raise ModelLoadError(f"{run_dir} has neither llm/ nor adapter/; did its `llava-kit train` finish?")
    from peft import PeftModel

    base = load_llm(cfg.model.llm.name_or_path, dtype, None, trust_remote_code)
    llm = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return llm.merge_and_unload().eval(), load_tokenizer(str(run_dir / "tokenizer"), trust_remote_code)
