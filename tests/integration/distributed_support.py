"""Helpers of the multi-process tests (test_distributed.py, test_text_sft.py)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def zero3_partitioning_everything(tmp_path: Path) -> str:
    """The shipped ZeRO-3 config with the persistence threshold at 0, so even tiny weights are partitioned (with the
    shipped 1e6 every tiny-model tensor stays whole and saving would not exercise the gathering)."""
    config = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partition_all.json"
    path.write_text(json.dumps(config))
    return str(path)
