"""Checkpoints a week of training can trust: written atomically, found by `latest`, checked before a resume.

    RUN_DIR/checkpoint-N/            complete checkpoints only: trainer_state.json, model.safetensors (the trained
                                     tensors), optimizer.pt, scheduler.pt, rng_state*.pth
    RUN_DIR/.checkpoint-N.partial/   a checkpoint being written; renamed to checkpoint-N once every file is on disk

- A checkpoint is written into a hidden staging directory, its files flushed to disk, then renamed into place: a
  crash, a kill or a full disk during a save never leaves a `checkpoint-N` that looks complete. A full disk is one
  clear error; the staging directory is removed and the earlier checkpoints stay as they were.
- `latest` is the newest *complete* checkpoint (every file a resume reads is there); incomplete ones (from a tool
  that writes in place) are passed over, and named.
- Before a resume, every file of the checkpoint is checked cheaply (JSON parses, the safetensors header fits the
  file, torch's zip archives are whole); a damaged file is one error naming it and the checkpoint to fall back to.
- A run directory that already holds a run is refused, unless the run resumes or `--overwrite` is given.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from llava_kit.errors import LlavaKitError

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = re.compile(r"^\.checkpoint-(\d+)\.partial$")
TRAINER_STATE = "trainer_state.json"
RUN_FILES = ("config.yaml", "projector.safetensors", "projector.json", "adapter", "llm", "vision", "tokenizer",
             "metrics.jsonl", "progress.json", "loss.png", "data_report.json", "eval_data_report.json", "runs")
"""What a finished or started run leaves in its directory (besides checkpoints); `--overwrite` removes these."""


class CheckpointError(LlavaKitError):
    """A checkpoint that cannot be written or resumed from; the message says which file and what to do."""


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f".checkpoint-{step}.partial"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories of a run, oldest (smallest N) first."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)] if run_dir.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def missing_files(checkpoint: Path) -> list[str]:
    """What a resume needs that `checkpoint` lacks (empty when it is complete)."""
    needed = [TRAINER_STATE, "model.safetensors"]
    if (checkpoint / "optimizer.pt").exists() or not any(checkpoint.glob("global_step*")):
        needed += ["optimizer.pt", "scheduler.pt"]  # DeepSpeed keeps its optimizer states in global_stepN/ instead
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if not any(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None when there is none); incomplete newer ones are named."""
    passed_over = []
    for checkpoint in reversed(checkpoints(run_dir)):
        missing = missing_files(checkpoint)
        if not missing:
            if passed_over:
                logger.warning("resume: passed over incomplete %s; resuming from %s", "; ".join(passed_over),
                               checkpoint.name)
            return checkpoint
        passed_over.append(f"{checkpoint.name} (lacks {', '.join(missing)})")
    if passed_over:
        logger.warning("resume: no complete checkpoint; passed over %s", "; ".join(passed_over))
    return None


def _fallback_hint(checkpoint: Path) -> str:
    """What to resume from instead of a damaged `checkpoint`."""
    earlier = [c for c in checkpoints(checkpoint.parent)
               if int(CHECKPOINT.match(c.name).group(1)) < int(CHECKPOINT.match(checkpoint.name).group(1))
               and not missing_files(c)]
    if earlier:
        return (f"resume from the previous one: train.resume_from_checkpoint={earlier[-1]} (or delete "
                f"{checkpoint.name} and use `latest`)")
    return "there is no earlier complete checkpoint: start the run again without resume_from_checkpoint"


def check_checkpoint(checkpoint: str | Path) -> None:
    """Refuse a checkpoint with a missing or damaged file (one error naming it and the checkpoint to fall back to).

    Cheap checks that catch truncation: trainer_state.json parses, the safetensors header describes data that fits
    the file, each torch file is a whole zip archive (its central directory sits at the end of the file).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a checkpoint directory; give a RUN_DIR/checkpoint-N or `latest`")
    missing = missing_files(checkpoint)
    if missing:
        raise CheckpointError(f"{checkpoint} is incomplete (lacks {', '.join(missing)}); {_fallback_hint(checkpoint)}")
    for path in sorted(checkpoint.iterdir()):
        problem = _file_problem(path)
        if problem:
            raise CheckpointError(f"{path.name} in {checkpoint} is damaged ({problem}); {_fallback_hint(checkpoint)}")


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be read back, or None."""
    try:
        if path.name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        return str(err) or type(err).__name__
    return None


def _check_safetensors(path: Path) -> None:
    """The header is JSON and its tensors' byte ranges end where the file ends (a truncated file does not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size <= 0 or 8 + header_size > size:
            raise ValueError(f"header of {header_size} bytes in a file of {size}")
        header = json.loads(f.read(header_size))
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_size + end != size:
        raise ValueError(f"the tensors need {8 + header_size + end} bytes, the file has {size}")


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory` (and the directory entries) to disk before it is renamed into place."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staging: Path, final: Path) -> None:
    """Rename a fully written staging directory to its checkpoint name (atomic on one file system)."""
    fsync_tree(staging)
    if final.exists():  # a checkpoint of the same step from a run that was resumed before it: replaced
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(run_dir: Path, step: int, err: OSError) -> CheckpointError:
    """The one message of a save that ran out of space (the staging directory is already removed)."""
    done = [c.name for c in checkpoints(run_dir) if not missing_files(c)]
    kept = f"{done[-1]} and the earlier checkpoints are intact" if done else "no earlier checkpoint existed"
    return CheckpointError(f"the disk is full: saving checkpoint-{step} in {run_dir} failed ({err.strerror or err}); "
                           f"nothing partial was left and {kept}. Free space (or set train.save_total_limit lower), "
                           "then resume with train.resume_from_checkpoint=latest")


def remove_stale_staging(run_dir: str | Path) -> None:
    """Remove staging directories a killed run left behind (they never became checkpoints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.is_dir() and STAGING.match(path.name):
            logger.warning("removing %s: a checkpoint that was being written when an earlier run stopped", path)
            shutil.rmtree(path, ignore_errors=True)


SETUP_FILES = ("config.yaml", "data_report.json", "eval_data_report.json")
"""What a run writes before training starts: alone in a directory, they are a run refused in its set-up (a user error
in the model or data), which the corrected run replaces without --overwrite."""


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a run directory that already holds a run, unless resuming it or told to overwrite it.

    `overwrite` removes what a run leaves (RUN_FILES and checkpoints), logging each; other files stay. A directory
    holding only a refused run's set-up (SETUP_FILES: nothing trained) is replaced as if told to overwrite it.
    """
    if not run_dir.is_dir():
        return
    previous = [p for p in run_dir.iterdir() if p.name in RUN_FILES or CHECKPOINT.match(p.name)]
    if not previous or resume:
        return
    if all(p.name in SETUP_FILES for p in previous):  # nothing trained: the set-up of a refused run, kept for reading
        logger.info("output_dir %s holds only the set-up of a run that did not start (%s): replacing it", run_dir,
                    ", ".join(sorted(p.name for p in previous)))
        overwrite = True
    elif not overwrite:
        names = ", ".join(sorted(p.name for p in previous)[:6])
        raise LlavaKitError(f"output_dir {run_dir} already holds a run ({names}); choose a new output_dir, resume it "
                            "with train.resume_from_checkpoint=latest, or pass --overwrite to replace it")
    for path in previous:
        logger.warning("--overwrite: removing %s", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
