"""One engine for every stage, on the Hugging Face Trainer.

    llava-kit train configs/tiny/pretrain.yaml output_dir=runs/pretrain

Reads top to bottom: resolve the config -> build the model -> apply trainability -> build the data
(bad records reported) -> Trainer.train() (DeepSpeed, accumulation, schedules, checkpoints, resume,
TensorBoard and progress bars all come from transformers/accelerate) -> save only what was trained,
the metrics and a loss plot. llava-kit adds the model, the data, the separate projector learning
rate and the checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from llava_kit.config import TEXT_STAGES, RunConfig, save_config
from llava_kit.data.dataset import Collator, LlavaDataset
from llava_kit.data.feature_cache import FeatureCache, default_cache_root
from llava_kit.data.formats import read_llava
from llava_kit.data.packing import PackedCollator, PackedLlavaDataset
from llava_kit.data.sampling import ModalityLengthGroupedSampler
from llava_kit.data.text import build_text_dataset
from llava_kit.data.token_cache import TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.model.build import build_llava, load_llm, load_tokenizer
from llava_kit.train.checkpoint import load_projector, save_text_run, save_trained_weights
from llava_kit.train.plots import plot_loss
from llava_kit.train.trainable import add_lora, apply_trainability, check_qlora_available, qlora_quantization_config

logger = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    """Trainer with a separate projector learning rate, saving only the trained weights in checkpoints."""

    def __init__(self, *args, projector_learning_rate: float | None = None, group_by_length: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate
        self.group_by_length = group_by_length

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not (self.group_by_length and isinstance(dataset, LlavaDataset)):
            return super()._get_train_sampler(train_dataset)
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return ModalityLengthGroupedSampler(dataset.lengths, dataset.has_images, global_batch, seed=args.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.projector_learning_rate is not None:
            model = model or self.model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[float, float], list] = {}
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                is_projector = name.startswith("multi_modal_projector.")
                lr = self.projector_learning_rate if is_projector else self.args.learning_rate
                weight_decay = self.args.weight_decay if name in decay else 0.0
                groups.setdefault((lr, weight_decay), []).append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(
                [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()], **optimizer_kwargs)
        return super().create_optimizer(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints hold only the trainable tensors (resume loads them non-strictly onto the rebuilt base). Under
        # DeepSpeed the Trainer hands over the whole gathered model: filter that too, or each checkpoint is a full copy.
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state_dict = self.model.state_dict() if state_dict is None else state_dict
        super()._save(output_dir, state_dict={k: v for k, v in state_dict.items() if k in trainable})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Our checkpoints hold exactly the trainable tensors: load them, and refuse a checkpoint of another run
        # (different trainability or LoRA settings) instead of resuming with half the weights silently fresh.
        model = model or self.model
        path = Path(resume_from_checkpoint) / "model.safetensors"
        if not path.is_file():
            raise PathNotFoundError(f"{path} is missing; resume_from_checkpoint must be a checkpoint-N directory "
                                    "written by llava-kit train (or `latest`)")
        state = load_file(str(path))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(trainable - state.keys()), sorted(state.keys() - trainable)
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint {resume_from_checkpoint} does not match this run's trainable weights "
                             f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); resume with the same config")
        model.load_state_dict(state, strict=False)


def compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def qlora_settings(cfg: RunConfig, precision: str):
    """(load dtype, bitsandbytes config) for QLoRA runs, (fp32, None) otherwise; refuses QLoRA where it cannot run."""
    if cfg.model.trainable.llm != "qlora":
        return torch.float32, None
    check_qlora_available()
    dtype = compute_dtype(precision) if precision != "fp32" else torch.bfloat16
    return dtype, qlora_quantization_config(dtype)


def build_text_model(cfg: RunConfig, precision: str = "fp32", attn_implementation: str | None = None,
                     gradient_checkpointing: bool = False):
    """The LLM alone for text stages: full fine-tuning, LoRA or QLoRA, as `model.trainable.llm` says."""
    remote_code = cfg.model.llm.trust_remote_code
    tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.name_or_path, remote_code)
    dtype, quantization = qlora_settings(cfg, precision)
    llm = load_llm(cfg.model.llm.name_or_path, dtype, quantization, remote_code, attn_implementation)
    mode = cfg.model.trainable.llm
    if mode in ("lora", "qlora"):
        llm = add_lora(llm, cfg.model.lora, quantized=mode == "qlora", gradient_checkpointing=gradient_checkpointing)
    else:
        llm.requires_grad_(True)
    trained = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    logger.info("trainable language_model %s / %s (%s)", f"{trained:,}", f"{sum(p.numel() for p in llm.parameters()):,}",
                mode)
    return llm, tokenizer


def on_gpu(cfg: RunConfig) -> bool:
    """True when this run trains on a CUDA GPU (one is visible and train.use_cpu is off)."""
    return not cfg.train.use_cpu and torch.cuda.is_available()


def choose_precision(precision: str, gpu: bool) -> str:
    """`auto` -> bf16 on a GPU that supports it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"


def choose_attn_implementation(requested: str, precision: str, gpu: bool) -> str | None:
    """`auto` -> flash_attention_2 where it can run (a GPU, the flash-attn package, bf16/fp16 compute), else None
    (transformers' default, sdpa); any other value is passed through."""
    import importlib.util

    if requested != "auto":
        return requested
    if gpu and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def choose_gradient_checkpointing(requested: bool | str, gpu: bool) -> bool:
    """`auto` -> on when training on a GPU (activations are what runs out there), off on the CPU."""
    return gpu if requested == "auto" else bool(requested)


def build_dataset(cfg: RunConfig, model, tokenizer) -> LlavaDataset:
    """Read and encode the training data; bad records are skipped and reported, or stop the run.

    With `data.cache` (default) the encoded examples are cached, keyed by the data files' contents, the
    tokenizer and every setting the tokens depend on, so a rerun skips reading, checking and tokenising.
    """
    tower = model.vision_tower
    image_settings = {"image_aspect": cfg.data.image_aspect, "image_preprocess": tower.preprocess,
                      "image_mean": tower.image_mean}

    def encode():
        result = read_llava(cfg.data.path)
        return LlavaDataset(
            result.samples, tokenizer, cfg.data.template, model.image_token_id, model.tokens_per_image,
            cfg.data.max_seq_len, image_root=cfg.data.image_root, system_prompt=cfg.data.system_prompt,
            bad_records=cfg.data.bad_records, prior_bad=result.bad, **image_settings)

    if not cfg.data.cache:
        return encode()
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    key = cache_key(stage="multimodal", files=[file_fingerprint(p) for p in paths],
                    tokenizer=tokenizer_fingerprint(tokenizer), template=cfg.data.template,
                    system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len,
                    image_token_id=model.image_token_id, tokens_per_image=model.tokens_per_image,
                    image_root=str(Path(cfg.data.image_root).resolve()), bad_records=cfg.data.bad_records)
    encoded, hit = TokenCache().get_or_build(key, lambda: encode().to_encoded())
    if hit:
        logger.info("data: tokenised examples read from the token cache (data.cache=false to re-encode)")
    return LlavaDataset.from_encoded(encoded, **image_settings)


def attach_feature_cache(cfg: RunConfig, model, dataset: LlavaDataset, device: torch.device) -> None:
    """With a frozen tower, train from cached tower features (data/feature_cache.py) unless turned off."""
    tower = model.vision_tower
    if cfg.data.feature_cache == "off" or any(p.requires_grad for p in tower.parameters()):
        return
    if not dataset.image_paths:
        return
    cache = FeatureCache(cfg.data.feature_cache_dir or default_cache_root(), tower, cfg.data.image_aspect)
    reader = cache.ensure(dataset.image_paths, tower, batch_size=max(cfg.train.micro_batch_size, 32),
                          num_workers=cfg.data.num_workers, device=device)
    dataset.use_feature_cache(reader)
    logger.info("training from cached tower features in %s (data.feature_cache=off to run the tower instead)",
                cache.dir)


def training_arguments(cfg: RunConfig, precision: str) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.num_epochs,
        max_steps=t.max_steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.lr_warmup_ratio, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, bf16=precision == "bf16", fp16=precision == "fp16",
        deepspeed=t.deepspeed, report_to=t.report_to, use_cpu=t.use_cpu,
        dataloader_num_workers=cfg.data.num_workers, remove_unused_columns=False, ddp_find_unused_parameters=False,
    )


def train(cfg: RunConfig) -> Path:
    """Run one stage described by a validated config; returns the run directory."""
    if cfg.model.trainable.llm == "qlora":
        check_qlora_available()  # before anything is written or loaded
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.seed)
    gpu = on_gpu(cfg)
    precision = choose_precision(cfg.train.precision, gpu)
    attention = choose_attn_implementation(cfg.model.llm.attn_implementation, precision, gpu)
    checkpointing = choose_gradient_checkpointing(cfg.train.gradient_checkpointing, gpu)
    logger.info("stage %s -> %s (precision %s, attention %s, gradient checkpointing %s)", cfg.stage, run_dir,
                precision, attention or "transformers' default", "on" if checkpointing else "off")

    text_only = cfg.stage in TEXT_STAGES
    if text_only:
        model, tokenizer = build_text_model(cfg, precision, attention, checkpointing)
        # TrainingArguments after the model: with ZeRO-3 its creation would make from_pretrained partition at load.
        args = training_arguments(cfg, precision)
        dataset = build_text_dataset(cfg.data, cfg.stage, tokenizer, seed=cfg.seed)
    else:
        _, quantization = qlora_settings(cfg, precision)
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
        apply_trainability(model, cfg.model.trainable, cfg.model.lora, checkpointing)
        args = training_arguments(cfg, precision)
        dataset = build_dataset(cfg, model, tokenizer)
        attach_feature_cache(cfg, model, dataset, args.device)
        if cfg.data.packing:
            dataset = PackedLlavaDataset(dataset, cfg.data.max_seq_len, seed=cfg.seed)
    if checkpointing:
        lm = model if text_only else model.language_model
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dataset.report.log()
    (run_dir / "data_report.json").write_text(json.dumps(dataset.report.to_dict(), indent=2))

    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=(PackedCollator if cfg.data.packing else Collator)(tokenizer.pad_token_id),
        projector_learning_rate=cfg.train.projector_learning_rate, group_by_length=cfg.train.group_by_length)
    resume = cfg.train.resume_from_checkpoint
    if resume == "latest":
        resume = get_last_checkpoint(str(run_dir))
        if resume is None:
            logger.warning("resume_from_checkpoint=latest but %s has no checkpoint-N; starting fresh", run_dir)
    trainer.train(resume_from_checkpoint=resume)

    # Every process takes part in saving (ZeRO-3 gathers partitioned weights collectively); rank 0 writes.
    writer = trainer.is_world_process_zero()
    (save_text_run if text_only else save_trained_weights)(model, tokenizer, cfg, run_dir, writer=writer)
    if writer:
        history = trainer.state.log_history
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        plot_loss(history, run_dir / "loss.png", title=f"{cfg.stage}: {run_dir.name}")
        logger.info("saved the trained weights, metrics.jsonl and loss.png in %s", run_dir)
    return run_dir
