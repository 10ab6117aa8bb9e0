"""Merge a run into one standalone model directory.

    llava-kit merge RUN_DIR -o OUT_DIR

OUT_DIR never refers to the base model paths again. A multimodal run becomes a `LlavaModel` transformers
directory (config.json + model.safetensors + tokenizer; llava_kit/store/merged.py); a text run becomes a plain
transformers LLM directory plus llava_kit_text.json. LoRA is folded into the LLM either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llava_kit.config import load_saved_config
from llava_kit.errors import ModelLoadError
from llava_kit.loader import open_model_dir

logger = logging.getLogger(__name__)


def merge_run(run_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Fold the run's LoRA into its LLM and write a standalone model directory."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    loaded = open_model_dir(run_dir, trust_remote_code=trust_remote_code)
    if loaded.kind != "run":
        raise ModelLoadError(f"{run_dir} is not a run directory (it is {loaded.kind}); `merge` takes the output of "
                             "`llava-kit train`")
    stage = load_saved_config(run_dir).stage
    out = loaded.modality.write_merged(loaded.model, loaded.tokenizer, loaded.settings, out_dir,
                                       source=str(run_dir.resolve()), stage=stage)
    logger.info("merged %s (%s) into %s", run_dir, stage, out)
    return out
