"""The Train page's form as data: a recipe fills it, and it becomes a run config. Kept apart from the Gradio page
(studio_pages.py) so the mapping reads, and is tested, without a browser.

    values = form_from_config(load_yaml_file("configs/tiny/pretrain.yaml"))   # field -> value
    config = config_from_form(values)                                         # a run-config dict (studio validates it)
"""

from __future__ import annotations

import os
from pathlib import Path

from llava_kit.config import PREFERENCE_STAGES, STAGE_MODALITY
from llava_kit.studio.recipes import configs_dir

FIELDS = ("stage", "label", "vision", "llm", "projector", "init_from", "data_path", "image_root", "data_format",
          "template", "max_seq_len", "llm_trainable", "lora_r", "lora_alpha", "lora_dropout", "deepspeed",
          "max_steps", "num_epochs", "micro_batch_size", "gradient_accumulation_steps", "learning_rate",
          "projector_learning_rate", "logging_steps", "save_steps", "use_cpu")
"""The form's fields, in the order the page passes them."""
VISION_TOWERS = ("tiny:vision", "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384")
LLMS = ("tiny:llm", "lmsys/vicuna-7b-v1.5", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B")
DEEPSPEED = ("none", "zero2", "zero3")
STAGE_DEFAULTS = {"pretrain": {"llm_trainable": "frozen", "template": "plain"},
                  "sft": {"llm_trainable": "lora", "template": "chatml"},
                  "text-pt": {"llm_trainable": "lora", "template": "plain"},
                  "text-sft": {"llm_trainable": "lora", "template": "chatml"},
                  "dpo": {"llm_trainable": "lora", "template": "chatml"},
                  "text-dpo": {"llm_trainable": "lora", "template": "chatml"}}
"""What choosing a stage on the page sets; every stage of config.STAGES has an entry (tested)."""


def source_path(path: str) -> str:
    """A path as the form shows it resolved: as given when it exists from here, else from the source tree (where the
    shipped recipes name their data from), else as given."""
    if not path or Path(path).expanduser().exists():
        return path
    candidate = configs_dir().parent / path
    return str(candidate) if candidate.exists() else path


def form_from_config(config: dict) -> dict:
    """The form's values for a run config (a recipe): every field of FIELDS."""
    model, data, train = config.get("model", {}), config.get("data", {}), config.get("train", {})
    lora, trainable = model.get("lora", {}), model.get("trainable", {})
    stage = config.get("stage", "pretrain")
    deepspeed = train.get("deepspeed") or ""
    path = data.get("path", "")
    return {
        "stage": stage, "label": Path(config.get("output_dir", stage)).name or stage,
        "vision": model.get("vision", {}).get("name_or_path", "tiny:vision"),
        "llm": model.get("llm", {}).get("name_or_path", "tiny:llm"),
        "projector": model.get("projector", {}).get("name", "mlp2x_gelu"),
        "init_from": model.get("init_from") or "",
        "data_path": source_path(path if isinstance(path, str) else ",".join(path)),
        "image_root": source_path(data.get("image_root", "")),
        "data_format": data.get("format", "auto"), "template": data.get("template", "plain"),
        "max_seq_len": data.get("max_seq_len", 2048),
        "llm_trainable": trainable.get("llm") or STAGE_DEFAULTS[stage]["llm_trainable"],
        "lora_r": lora.get("r", 64), "lora_alpha": lora.get("alpha", 128), "lora_dropout": lora.get("dropout", 0.05),
        "deepspeed": next((name for name in DEEPSPEED if name != "none" and name in Path(deepspeed).stem), "none"),
        "max_steps": train.get("max_steps", -1), "num_epochs": train.get("num_epochs", 1.0),
        "micro_batch_size": train.get("micro_batch_size", 8),
        "gradient_accumulation_steps": train.get("gradient_accumulation_steps", 1),
        "learning_rate": train.get("learning_rate", 1e-3),
        "projector_learning_rate": train.get("projector_learning_rate") or 0,
        "logging_steps": train.get("logging_steps", 10), "save_steps": train.get("save_steps", 500),
        "use_cpu": bool(train.get("use_cpu", False)),
    }


def config_from_form(values: dict) -> dict:
    """A run config from the form's values (without output_dir: the studio gives each run its own). Numbers come
    from the page as floats; empty fields are left out so the config's defaults apply."""
    stage = values["stage"]
    text = STAGE_MODALITY.get(stage) == "text"
    paths = [source_path(p.strip()) for p in str(values.get("data_path") or "").split(",") if p.strip()]
    model = {"llm": {"name_or_path": values["llm"]},
             "trainable": {"llm": values["llm_trainable"]},
             "lora": {"r": _int(values["lora_r"]), "alpha": _int(values["lora_alpha"]),
                      "dropout": float(values["lora_dropout"])}}
    data = {"path": paths[0] if len(paths) == 1 else paths, "format": values["data_format"],
            "template": values["template"], "max_seq_len": _int(values["max_seq_len"])}
    if not text:
        model["vision"] = {"name_or_path": values["vision"]}
        model["projector"] = {"name": values["projector"]}
        if values.get("init_from"):
            model["init_from"] = source_path(values["init_from"])
        data["image_root"] = source_path(values.get("image_root") or "")
    train = {"max_steps": _int(values["max_steps"]), "num_epochs": float(values["num_epochs"]),
             "micro_batch_size": _int(values["micro_batch_size"]),
             "gradient_accumulation_steps": _int(values["gradient_accumulation_steps"]),
             "learning_rate": float(values["learning_rate"]), "logging_steps": _int(values["logging_steps"]),
             "save_steps": _int(values["save_steps"]), "use_cpu": bool(values["use_cpu"]), "report_to": "none"}
    if stage in PREFERENCE_STAGES:  # its projector stays frozen (the reference is the adapter-disabled policy)
        data["packing"] = False
    elif values.get("projector_learning_rate") and not text:
        train["projector_learning_rate"] = float(values["projector_learning_rate"])
    if values.get("deepspeed", "none") != "none":
        train["deepspeed"] = str(configs_dir() / "deepspeed" / f"{values['deepspeed']}.json")
    return {"stage": stage, "seed": 0, "model": model, "data": data, "train": train}


def _int(value) -> int:
    """A whole number from the page (Gradio's numbers are floats); a fraction stays a float, for the config's own
    check to refuse by name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def resolve_image_root(path: str, image_root: str) -> str:
    """The image root the preview uses: the one given, else the data file's folder."""
    return image_root or os.path.dirname(source_path(path)) or "."
