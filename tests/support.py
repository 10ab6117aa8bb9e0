"""Small helpers shared by tests (importable as `tests.support`: the repository root is on pytest's pythonpath)."""

from __future__ import annotations

from llava_kit.loader import open_model_dir


def open_for_chat(path):
    """(model, tokenizer, inference settings) of any model directory, through the one loader."""
    loaded = open_model_dir(path)
    return loaded.model, loaded.tokenizer, loaded.settings
