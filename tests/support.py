"""Small helpers shared by tests (importable as `tests.support`: the repository root is on pytest's pythonpath)."""

from __future__ import annotations

from llava_kit.loader import open_model_dir


def open_for_chat(path):
    """(model, tokenizer, inference settings) of any model directory, through the one loader."""
    loaded = open_model_dir(path)
    return loaded.model, loaded.tokenizer, loaded.settings


def unchecked_config(stage: str = "sft", **keys):
    """A RunConfig on the tiny model names with chatml data (paths not checked); `keys` are sections joined by `__`
    (model__lora__init="pissa")."""
    from llava_kit.config import config_from_dict

    data = {"stage": stage, "output_dir": "out",
            "model": {"vision": {"name_or_path": "tiny:vision"}, "llm": {"name_or_path": "tiny:llm"}},
            "data": {"path": "p.json", "image_root": ".", "template": "chatml"}}
    for key, value in keys.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(data, check_paths=False)
