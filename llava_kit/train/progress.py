"""A run's progress while it trains, for whatever watches its directory (the studio's loss plot, its job events).

The Trainer keeps its log history in memory and the engine writes metrics.jsonl when the run ends. With this callback
each log entry is also appended to metrics.jsonl as it is logged (the same lines the end writes again, so a reader
sees the file grow and then stay the same), and RUN_DIR/progress.json says where the run is:

    {"step": 12, "max_steps": 30, "epoch": 2.0, "num_train_epochs": 5, "trained_tokens": null, "updated": 1716...}

`trained_tokens` is filled in when training ends: the tokens of one pass over the data times the epochs trained.
Only the main process writes (under torchrun every rank runs the callback).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"


def tokens_per_epoch(dataset) -> int | None:
    """Tokens in one pass over a training dataset (padding excluded), or None for a dataset that does not say."""
    lengths = getattr(dataset, "lengths", None)  # multimodal datasets: tokens per example, images' tokens included
    if lengths is None and isinstance(getattr(dataset, "items", None), list):  # text datasets: encoded rows
        lengths = [len(item["input_ids"]) for item in dataset.items]
    return int(sum(lengths)) if lengths is not None else None


class RunProgress(TrainerCallback):
    """Appends each log entry to RUN_DIR/metrics.jsonl as it is logged and keeps RUN_DIR/progress.json current."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.tokens_per_epoch: int | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if train_dataloader is not None:
            self.tokens_per_epoch = tokens_per_epoch(train_dataloader.dataset)
        # A resumed run starts from the history its checkpoint restored; a new one from nothing.
        (self.run_dir / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in state.log_history))
        self._write_progress(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not state.log_history:
            return
        with (self.run_dir / METRICS_FILE).open("a") as f:  # one write of a whole line: readers never see half
            f.write(json.dumps(state.log_history[-1]) + "\n")
        self._write_progress(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._write_progress(state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            trained = None if self.tokens_per_epoch is None else round(self.tokens_per_epoch * (state.epoch or 0))
            self._write_progress(state, trained)

    def _write_progress(self, state, trained_tokens: int | None = None) -> None:
        progress = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                    "num_train_epochs": state.num_train_epochs, "trained_tokens": trained_tokens,
                    "updated": time.time()}
        path = self.run_dir / PROGRESS_FILE
        partial = path.with_name(f".{PROGRESS_FILE}.partial")
        partial.write_text(json.dumps(progress))
        os.replace(partial, path)  # readers see the old file or the new one, never a half-written one
