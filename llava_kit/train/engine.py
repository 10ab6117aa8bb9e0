"""One engine for every stage, on the Hugging Face Trainer.

    llava-kit train configs/tiny/pretrain.yaml output_dir=runs/pretrain

Reads top to bottom: resolve the config -> the stage's modality (llava_kit/modality.py: text or multimodal)
builds the model with its trainability and the data (bad records reported) -> Trainer.train() (DeepSpeed,
accumulation, schedules, checkpoints, resume, TensorBoard and progress bars all come from
transformers/accelerate) -> the modality saves only what was trained; the metrics and a loss plot. llava-kit
adds the model, the data, the separate projector learning rate and the checks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from llava_kit.config import OPTIMIZER_NEEDS, PREFERENCE_STAGES, RunConfig, save_config
from llava_kit.data.dataset import Collator
from llava_kit.data.packing import PackedCollator
from llava_kit.data.preference import PreferenceCollator
from llava_kit.errors import ConfigError
from llava_kit.modality import EVAL_DATA_REPORT, modality_for_stage
from llava_kit.model.trainable import check_qlora_available
from llava_kit.train.benchmark_probe import BenchmarkProbe
from llava_kit.train.checkpoints import check_checkpoint, latest_checkpoint, prepare_run_dir, remove_stale_staging
from llava_kit.train.plots import plot_loss
from llava_kit.train.preference import PreferenceTrainer
from llava_kit.train.progress import RunProgress
from llava_kit.train.trainer import LlavaTrainer

logger = logging.getLogger(__name__)


def resolve_resume(run_dir: Path, requested: str | None) -> Path | None:
    """The checkpoint a run resumes from (`latest`: the newest complete one), checked file by file first."""
    if not requested:
        return None
    checkpoint = latest_checkpoint(run_dir) if requested == "latest" else Path(requested)
    if checkpoint is None:
        logger.warning("resume_from_checkpoint=latest but %s has no complete checkpoint-N; starting fresh", run_dir)
        return None
    check_checkpoint(checkpoint)
    logger.info("resuming from %s", checkpoint)
    return checkpoint


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


def training_arguments(cfg: RunConfig, precision: str) -> TrainingArguments:
    t = cfg.train
    held_out = bool(cfg.data.eval_path)
    return TrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.num_epochs,
        max_steps=t.max_steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.lr_warmup_ratio, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, bf16=precision == "bf16", fp16=precision == "fp16",
        deepspeed=t.deepspeed, report_to=t.report_to, use_cpu=t.use_cpu,
        dataloader_num_workers=cfg.data.num_workers, remove_unused_columns=False, ddp_find_unused_parameters=False,
        # Held-out loss by the Trainer's own loop (the model returns {"loss"}; nothing else is gathered).
        eval_strategy="steps" if held_out else "no", eval_steps=(t.eval_steps or t.save_steps) if held_out else None,
        per_device_eval_batch_size=t.micro_batch_size, prediction_loss_only=True,
        load_best_model_at_end=t.keep_best, metric_for_best_model="eval_loss" if t.keep_best else None,
        greater_is_better=False if t.keep_best else None,
        optim=t.optim, optim_target_modules=t.optim_target_modules or None, neftune_noise_alpha=t.neftune_noise_alpha,
    )


def check_optimizer_available(optim: str) -> None:
    """Refuse, before anything is loaded, an optimizer this machine cannot run (config.OPTIMIZER_NEEDS)."""
    import importlib.util

    needs = OPTIMIZER_NEEDS[optim]
    if not needs:
        return
    missing = [] if torch.cuda.is_available() else ["a CUDA GPU (none is visible to torch)"]
    missing += [f"the {package} package (pip install {package.replace('_', '-')})" for package in needs
                if importlib.util.find_spec(package) is None]
    if missing:
        raise ConfigError(f"`train.optim` {optim} needs {' and '.join(missing)}; on this machine use adamw_torch "
                          "(or adafactor, which keeps less state)")


def final_weights(trainer: LlavaTrainer) -> dict:
    """Which weights the run directory gets, logged and returned as metrics.jsonl's last line: the best checkpoint's
    (train.keep_best; the Trainer loaded them back at the end) or the last step's."""
    state = trainer.state
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        final = {"final_weights": "best", "checkpoint": Path(state.best_model_checkpoint).name,
                 "step": state.best_global_step, "eval_loss": state.best_metric}
        last = "also the last step" if state.best_global_step == state.global_step else \
            f"not the last step ({state.global_step})"
        logger.info("final weights: the best checkpoint, %s (eval_loss %.4f), %s", final["checkpoint"],
                    state.best_metric, last)
    else:
        final = {"final_weights": "last", "step": state.global_step}
        logger.info("final weights: the last step (%d)", state.global_step)
    return final


def train(cfg: RunConfig, overwrite: bool = False) -> Path:
    """Run one stage described by a validated config; returns the run directory.

    A directory that already holds a run is refused unless the config resumes it or `overwrite` replaces it."""
    if cfg.model.trainable.llm == "qlora":
        check_qlora_available()  # before anything is written or loaded
    check_optimizer_available(cfg.train.optim)
    run_dir = Path(cfg.output_dir)
    resume = resolve_resume(run_dir, cfg.train.resume_from_checkpoint)
    # Launched as several processes (torchrun, accelerate, deepspeed), rank 0 alone checks, cleans and writes the
    # directory: another rank checking after rank 0 wrote config.yaml would take this run for an earlier one.
    first = int(os.environ.get("RANK", "0")) == 0
    if first:
        prepare_run_dir(run_dir, cfg.train.resume_from_checkpoint, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    if first:
        remove_stale_staging(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.seed)
    gpu = on_gpu(cfg)
    precision = choose_precision(cfg.train.precision, gpu)
    attention = choose_attn_implementation(cfg.model.llm.attn_implementation, precision, gpu)
    checkpointing = choose_gradient_checkpointing(cfg.train.gradient_checkpointing, gpu)
    logger.info("stage %s -> %s (precision %s, attention %s, gradient checkpointing %s)", cfg.stage, run_dir,
                precision, attention or "transformers' default", "on" if checkpointing else "off")

    modality = modality_for_stage(cfg.stage)
    model, tokenizer = modality.build_for_training(cfg, precision, attention, checkpointing)
    # TrainingArguments after the model: with ZeRO-3 its creation would make from_pretrained partition at load.
    args = training_arguments(cfg, precision)
    dataset = modality.build_dataset(cfg, model, tokenizer, args.device)
    if checkpointing:
        modality.language_model(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    dataset.report.log()
    (run_dir / "data_report.json").write_text(json.dumps(dataset.report.to_dict(), indent=2))
    eval_dataset = None
    if cfg.data.eval_path:  # held-out data, read and encoded as the training data is, with its own report
        eval_dataset = modality.build_eval_dataset(cfg, model, tokenizer, args.device)
        (run_dir / EVAL_DATA_REPORT).write_text(json.dumps(eval_dataset.report.to_dict(), indent=2))
        logger.info("held-out loss on %d examples of %s every %d steps and at the end%s", len(eval_dataset),
                    cfg.data.eval_path, args.eval_steps, "; the best checkpoint is kept" if cfg.train.keep_best else "")
    probe = BenchmarkProbe(cfg, tokenizer, modality) if cfg.train.eval_benchmark.name else None

    collator, trainer_class, extra = (PackedCollator if cfg.data.packing else Collator), LlavaTrainer, {}
    if cfg.stage in PREFERENCE_STAGES:  # pairs of answers: the preference loss (llava_kit/train/preference.py)
        collator, trainer_class = PreferenceCollator, PreferenceTrainer
        extra = {"settings": cfg.train.preference}
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        data_collator=collator(tokenizer.pad_token_id),
        projector_learning_rate=cfg.train.projector_learning_rate, group_by_length=cfg.train.group_by_length,
        benchmark_probe=probe, loraplus_lr_ratio=cfg.model.lora.loraplus_lr_ratio, **extra,
        callbacks=[RunProgress(run_dir)])  # metrics.jsonl and progress.json as the run goes (the studio watches them)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final = final_weights(trainer)

    # Every process takes part in saving (ZeRO-3 gathers partitioned weights collectively); rank 0 writes.
    writer = trainer.is_world_process_zero()
    modality.save_run(model, tokenizer, cfg, run_dir, writer=writer)
    if writer:
        history = [*trainer.state.log_history, final]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        plot_loss(history, run_dir / "loss.png", title=f"{cfg.stage}: {run_dir.name}")
        logger.info("saved the trained weights, metrics.jsonl and loss.png in %s", run_dir)
    return run_dir
