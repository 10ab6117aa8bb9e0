"""The HF Trainer as llava-kit trains with it: projector learning rate, grouped batches, lean atomic checkpoints."""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
from pathlib import Path

from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from llava_kit.data.dataset import LlavaDataset
from llava_kit.data.sampling import ModalityLengthGroupedSampler
from llava_kit.errors import ModelLoadError, PathNotFoundError
from llava_kit.train.checkpoints import (
    TRAINER_STATE,
    CheckpointError,
    disk_full_error,
    is_disk_full,
    publish,
    staging_dir,
)

logger = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    """The HF Trainer with a separate projector learning rate, length-grouped batches, checkpoints that hold only
    the trained tensors, written atomically (llava_kit/train/checkpoints.py) and checked before a resume, the best
    checkpoint (train.keep_best) never rotated away, and an optional benchmark score at each evaluation."""

    def __init__(self, *args, projector_learning_rate: float | None = None, group_by_length: bool = False,
                 benchmark_probe=None, loraplus_lr_ratio: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate
        self.loraplus_lr_ratio = loraplus_lr_ratio
        """LoRA+: the LLM's optimizer comes from peft's create_loraplus_optimizer (B matrices at ratio x lr)."""
        self.group_by_length = group_by_length
        self.benchmark_probe = benchmark_probe
        """Called with the model at each evaluation; returns metrics to log (llava_kit/train/benchmark_probe.py)."""
        self._checkpoint_root: Path | None = None  # the staging directory while a checkpoint is written

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not (self.group_by_length and isinstance(dataset, LlavaDataset)):
            return super()._get_train_sampler(train_dataset)
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return ModalityLengthGroupedSampler(dataset.lengths, dataset.has_images, global_batch, seed=args.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.loraplus_lr_ratio is not None:
            self.optimizer = self._loraplus_optimizer(model or self.model)
        if self.optimizer is None and self.projector_learning_rate is not None:
            model = model or self.model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[float, float], list] = {}
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                is_projector = name.startswith("multi_modal_projector.") or name == "image_newline"  # AnyRes
                lr = self.projector_learning_rate if is_projector else self.args.learning_rate
                weight_decay = self.args.weight_decay if name in decay else 0.0
                groups.setdefault((lr, weight_decay), []).append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(
                [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()], **optimizer_kwargs)
        return super().create_optimizer(model)

    def _loraplus_optimizer(self, model):
        """peft's LoRA+ optimizer over the LLM's adapter (A at lr, B at lr x ratio); the projector, when it trains,
        joins as one more group at its own learning rate."""
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}  # the groups carry theirs
        llm = getattr(model, "language_model", model)
        optimizer = create_loraplus_optimizer(llm, optimizer_cls, lr=self.args.learning_rate,
                                              loraplus_lr_ratio=self.loraplus_lr_ratio,
                                              loraplus_weight_decay=self.args.weight_decay, **optimizer_kwargs)
        if llm is not model:
            projector = [p for p in model.multi_modal_projector.parameters() if p.requires_grad]
            if projector:
                optimizer.add_param_group({"params": projector, "weight_decay": self.args.weight_decay,
                                           "lr": self.projector_learning_rate or self.args.learning_rate})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints hold only the trainable tensors (resume loads them non-strictly onto the rebuilt base). Under
        # DeepSpeed the Trainer hands over the whole gathered model: filter that too, or each checkpoint is a full copy.
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state_dict = self.model.state_dict() if state_dict is None else state_dict
        super()._save(output_dir, state_dict={k: v for k, v in state_dict.items() if k in trainable})

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The held-out loss, then the benchmark score when train.eval_benchmark is set (logged with it)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.benchmark_probe is not None:
            scores = self.benchmark_probe(self.model)
            self.log(scores)
            metrics.update(scores)
        return metrics

    def _load_best_model(self) -> None:
        # The best checkpoint holds only the trainable tensors, as every checkpoint: load it as a resume does (the
        # Trainer's own loader would warn of every frozen weight as missing). DeepSpeed keeps its own format.
        if self.is_deepspeed_enabled:
            super()._load_best_model()
            return
        logger.info("loading the best checkpoint %s (eval_loss %.4f)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Our checkpoints hold exactly the trainable tensors: load them, and refuse a checkpoint of another run
        # (different trainability or LoRA settings) instead of resuming with half the weights silently fresh.
        model = model or self.model
        path = Path(resume_from_checkpoint) / "model.safetensors"
        if not path.is_file():
            raise PathNotFoundError(f"{path} is missing; resume_from_checkpoint must be a checkpoint-N directory "
                                    "written by llava-kit train (or `latest`)")
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 (safetensors raises its own error type for a damaged file)
            raise CheckpointError(f"model.safetensors in {resume_from_checkpoint} is damaged ({err}); resume from "
                                  "an earlier checkpoint") from None
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(trainable - state.keys()), sorted(state.keys() - trainable)
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint {resume_from_checkpoint} does not match this run's trainable weights "
                             f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); resume with the same config")
        model.load_state_dict(state, strict=False)


    # ---------------------------------------------------------------------------------------- atomic checkpoints
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer writes it under the staging directory (see _save_checkpoint).
        return str(self._checkpoint_root) if self._checkpoint_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into RUN_DIR/.checkpoint-N.partial/ and renamed into place once every
        process has written every file; a failed save leaves nothing partial behind."""
        run_dir = Path(self.args.output_dir)
        step = self.state.global_step
        staging = staging_dir(run_dir, step)
        self._checkpoint_root = staging
        try:
            super()._save_checkpoint(model, trial)
            self._point_at_best(run_dir, staging / f"checkpoint-{step}")
        except Exception as err:
            shutil.rmtree(staging, ignore_errors=True)
            if is_disk_full(err) or "No space left" in str(err) or "file write failed" in str(err):
                raise disk_full_error(run_dir, step, err) from None
            raise
        finally:
            self._checkpoint_root = None
        self.accelerator.wait_for_everyone()  # every process has written its files (DeepSpeed shards, RNG states)
        if self.args.should_save:
            publish(staging / f"checkpoint-{step}", run_dir / f"checkpoint-{step}")
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _point_at_best(self, run_dir: Path, written: Path) -> None:
        """Name the best checkpoint by its final place, RUN_DIR/checkpoint-N.

        The Trainer looks for the best checkpoint in the directory it saved into, the staging one: it would name a
        path that is gone once the checkpoint is renamed (and so unprotected by the rotation, and not found at the
        end), or not update it at all when the best is an earlier checkpoint. The trainer state written with the
        checkpoint (read back on resume) gets the final path too.
        """
        if not self.state.best_global_step:
            return
        best = run_dir / f"checkpoint-{self.state.best_global_step}"
        if self.state.best_global_step == self.state.global_step or best.is_dir():
            self.state.best_model_checkpoint = str(best)
            if self.args.should_save:
                self.state.save_to_json(str(written / TRAINER_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        with _naming_damaged_files(checkpoint, "optimizer.pt or scheduler.pt"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint) -> None:
        with _naming_damaged_files(checkpoint, "rng_state.pth"):
            super()._load_rng_state(checkpoint)


@contextlib.contextmanager
def _naming_damaged_files(checkpoint, files: str):
    """A file that passed the cheap checks but fails to load (damaged inside) is a CheckpointError too."""
    try:
        yield
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{files} in {checkpoint} is damaged ({err}); resume from an earlier checkpoint") \
            from None
