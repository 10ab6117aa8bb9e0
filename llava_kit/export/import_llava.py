"""Import LLaVA checkpoints made elsewhere: the llava-hf layout and the original LLaVA layout (`mm_projector`).

    llava-kit import SRC_DIR -o OUT_DIR [--vision TOWER]     # OUT_DIR: a llava-kit merged model directory
    llava-kit chat --model SRC_DIR ...                        # llava-hf directories open directly too

The readers live in llava_kit/store/foreign.py (`open_model_dir` uses them); this command writes what they read
as a merged llava-kit directory, which works as `--model` for chat, eval, serve and export, and as the start of
an `sft` run: model.vision.name_or_path, model.llm.name_or_path and model.init_from may all be OUT_DIR.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llava_kit.errors import ModelLoadError
from llava_kit.loader import open_model_dir
from llava_kit.store.merged import write_merged
from llava_kit.store.projector_files import describe_projector

logger = logging.getLogger(__name__)


def import_checkpoint(src: str | Path, out_dir: str | Path, vision: str | None = None) -> Path:
    """Convert a llava-hf or original LLaVA directory into a llava-kit merged model directory."""
    loaded = open_model_dir(src, vision=vision, allow_original_llava=True)
    if loaded.kind not in ("hf-llava", "hf-llava-next", "original-llava"):
        raise ModelLoadError(f"{src} is not a llava-hf or original LLaVA checkpoint (it is {loaded.kind}); "
                             "`import` converts checkpoints made elsewhere")
    spec = describe_projector(loaded.model, llm_source=str(src), template=loaded.settings.template, stage="imported")
    out = write_merged(loaded.model, loaded.tokenizer, loaded.settings, out_dir, spec,
                       merged_from=str(Path(src).resolve()))
    logger.info("imported %s into %s", src, out)
    return out
