"""What a fine-tuning job trains: a base (a recipe name, a fine-tuned model's name, or a model directory), the
uploaded data, and OpenAI's hyperparameters turned into run-config keys.

    base = resolve_base("tiny-shapes", fine_tuned={})                  # a shipped recipe: configs/tiny/sft.yaml
    config, echoed = fine_tune_config(base, "supervised", {"n_epochs": 2, "batch_size": "auto",
                                      "learning_rate_multiplier": 0.5}, training_file, "runs/ftjob-1", seed=0)

| `model`                       | trains                                                                            |
|-------------------------------|-----------------------------------------------------------------------------------|
| a recipe name (RECIPES)       | that shipped config (`configs/...`) with the uploaded data                        |
| `ft:...` (a finished job's)   | that job's merged model, further                                                  |
| a model directory             | a merged multimodal model (sft: LoRA + projector) or a transformers LLM (text-sft) |

Hyperparameters (OpenAI's names; `auto` keeps the recipe's value):

| OpenAI                     | run config                                                                         |
|----------------------------|------------------------------------------------------------------------------------|
| `n_epochs`                 | `train.num_epochs` (and `train.max_steps: -1`, so the epochs decide)              |
| `batch_size`               | the global batch: `train.micro_batch_size` x `train.gradient_accumulation_steps` |
| `learning_rate_multiplier` | times `train.learning_rate` and `train.projector_learning_rate`                    |
| `beta` (method dpo)        | `train.preference.beta` (default 0.1)                                              |

Method `dpo` trains stage `dpo` (text-dpo from a text base) on uploaded preference pairs: LoRA on the LLM, the
reference being the same model with its adapter disabled, the projector frozen (docs/preference.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llava_kit.config import PREFERENCE_FORMATS, PREFERENCE_STAGES, STAGE_FORMATS, STAGE_MODALITY, PreferenceConfig
from llava_kit.errors import UsageError
from llava_kit.schema import load_yaml_file


@dataclass(frozen=True)
class Recipe:
    """A shipped config a fine-tuning job may start from."""

    config: str
    """Path under the configs folder."""
    about: str


RECIPES = {
    "tiny-shapes": Recipe("tiny/sft.yaml", "tiny random CLIP tower and Llama (tiny:vision, tiny:llm), LoRA sft on a "
                                           "CPU: for trying the API and for tests"),
    "tiny-shapes-pretrain": Recipe("tiny/pretrain.yaml", "the same tiny models, projector only (stage pretrain)"),
    "tiny-text": Recipe("tiny/text_sft_identity.yaml", "the tiny Llama alone, LoRA text-sft"),
    "llava-1.5-7b": Recipe("llava-1.5-7b/sft_lora.yaml", "CLIP ViT-L/14-336 + Vicuna-7B, LLaVA-1.5's LoRA sft"),
    "siglip-qwen2.5-0.5b": Recipe("siglip-qwen2.5-0.5b/sft_lora.yaml", "SigLIP so400m + Qwen2.5-0.5B-Instruct, "
                                                                       "LoRA sft"),
    "qwen2.5-0.5b": Recipe("qwen2.5-0.5b/text_sft_lora.yaml", "Qwen2.5-0.5B, LoRA text-sft"),
}

# A model directory as the base: LoRA on its LLM (and its projector, for a multimodal model) with these settings.
DIRECTORY_LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
DIRECTORY_TRAIN = {"micro_batch_size": 8, "num_epochs": 3, "learning_rate": 2.0e-4, "projector_learning_rate": 2.0e-5,
                   "lr_scheduler": "cosine", "lr_warmup_ratio": 0.03, "logging_steps": 1, "save_steps": 500,
                   "report_to": "none"}
METHODS = ("supervised", "dpo")
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


class FineTuneError(UsageError):
    """A fine-tuning request that cannot be trained as asked; `param` names the request's field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Base:
    """What a job starts from: a name for its fine-tuned model and a run config without data or output."""

    name: str
    config: dict
    notes: list[str]
    """What was changed from the recipe (for the job's events)."""


def configs_dir() -> Path:
    """The shipped configs: $LLAVA_KIT_CONFIGS, else the source tree's configs/ folder."""
    return Path(os.environ.get("LLAVA_KIT_CONFIGS") or Path(__file__).resolve().parents[2] / "configs")


def resolve_base(model: str, fine_tuned: dict[str, Path]) -> Base:
    """The base `model` names: a recipe, a fine-tuned model (name -> its directory), or a model directory."""
    if model in RECIPES:
        return _recipe_base(model)
    if model in fine_tuned:
        return directory_base(fine_tuned[model], name=model.split(":")[-1])
    if Path(model).expanduser().is_dir():
        return directory_base(Path(model).expanduser())
    fine = ", ".join(fine_tuned) or "none yet"
    raise FineTuneError(f"model {model!r} is not a base this server knows: give a recipe ({', '.join(RECIPES)}), a "
                        f"fine-tuned model ({fine}) or a model directory on the server", param="model")


def _recipe_base(name: str) -> Base:
    path = configs_dir() / RECIPES[name].config
    if not path.is_file():
        raise FineTuneError(f"recipe {name!r} needs {path}, which is not there (recipes are the source tree's "
                            "configs/; set LLAVA_KIT_CONFIGS to that folder)", param="model")
    config, notes = load_yaml_file(path), []
    for key in ("path", "datasets", "image_root", "format"):  # the job's data replaces the recipe's
        config.get("data", {}).pop(key, None)
    model = config.setdefault("model", {})
    if model.get("init_from") and not Path(model["init_from"]).is_dir():
        notes.append(f"the recipe's model.init_from {model['init_from']!r} is not here: the projector starts from "
                     "its initialisation")
        model["init_from"] = None
    train = config.setdefault("train", {})
    if train.get("deepspeed"):  # recipes name it from the source tree's root; jobs may run elsewhere
        found = [p for p in (Path(train["deepspeed"]), configs_dir().parent / train["deepspeed"]) if p.is_file()]
        train["deepspeed"] = str(found[0].resolve()) if found else train["deepspeed"]
    return Base(name, config, notes)


def directory_base(path: Path, name: str | None = None) -> Base:
    """A merged multimodal model (LoRA sft of its LLM and projector) or a transformers LLM (LoRA text-sft)."""
    from llava_kit.loader import directory_kind
    from llava_kit.store.specs import MERGED_SPEC, TEXT_SPEC, MergedSpec, TextModelSpec, read_spec

    path = path.resolve()
    kind = directory_kind(path)
    name = name or path.name
    train = dict(DIRECTORY_TRAIN)
    if kind == "merged":
        spec = read_spec(path / MERGED_SPEC, MergedSpec)
        vision = spec.projector.trained_with.vision
        config = {"stage": "sft", "model": {
            "vision": {"name_or_path": str(path), **{k: vision[k] for k in ("feature_layer", "select_strategy")
                                                     if k in vision}},
            "llm": {"name_or_path": str(path)}, "init_from": str(path),
            "projector": {"name": spec.projector.name, "options": spec.projector.options},
            "trainable": {"vision": "frozen", "projector": "full", "llm": "lora"}, "lora": dict(DIRECTORY_LORA)},
            "data": _inference_data(spec.inference), "train": train}
        return Base(name, config, [])
    if kind == "llm":
        spec_file = path / TEXT_SPEC
        data = _inference_data(read_spec(spec_file, TextModelSpec).inference) if spec_file.is_file() \
            else {"template": "tokenizer" if _has_chat_template(path) else "chatml"}
        if data.get("template") == "completion":  # a merged text-pt run continues text: teach it turns in chatml
            data["template"] = "chatml"
        train.pop("projector_learning_rate")
        config = {"stage": "text-sft", "model": {"llm": {"name_or_path": str(path)}, "trainable": {"llm": "lora"},
                                                 "lora": dict(DIRECTORY_LORA)}, "data": data, "train": train}
        return Base(name, config, [])
    if kind == "run":
        raise FineTuneError(f"{path} is a run directory; merge it first (`llava-kit merge {path} -o DIR`, or Merge on "
                            "the studio's Runs page) and give the merged directory", param="model")
    raise FineTuneError(f"{path} is not a model directory fine-tuning can start from (a merged llava-kit model or a "
                        "transformers LLM)", param="model")


def _inference_data(settings) -> dict:
    data = {"template": settings.template, "image_aspect": settings.image_aspect, "max_seq_len": settings.max_seq_len}
    if settings.system_prompt is not None:
        data["system_prompt"] = settings.system_prompt
    return data


def _has_chat_template(path: Path) -> bool:
    config = path / "tokenizer_config.json"
    return (path / "chat_template.jinja").is_file() or (config.is_file() and "chat_template" in config.read_text())


# ---------------------------------------------------------------------------------------------- the job's config

def method_stage(method: str, base_stage: str) -> str:
    """The stage a method trains from a base of `base_stage`: supervised keeps it; dpo trains `dpo` from a
    multimodal conversation base and `text-dpo` from a text one (docs/preference.md). A base that does not tune the
    LLM on conversations (pretrain, text-pt) is refused for dpo, with the bases that fit."""
    if method == "supervised":
        return base_stage
    if method == "dpo":
        if base_stage in ("sft", "dpo"):
            return "dpo"
        if base_stage in ("text-sft", "text-dpo"):
            return "text-dpo"
        raise FineTuneError(f"method dpo tunes the LLM's answers in a chat template, and this base trains stage "
                            f"{base_stage} ({'the projector alone' if base_stage == 'pretrain' else 'raw text'}); "
                            "start dpo from a base that trains sft or text-sft (a recipe such as tiny-shapes, a "
                            "merged model, or a finished supervised job's fine_tuned_model)", param="model")
    raise FineTuneError(f"method {method!r} is not supported; this server trains {' or '.join(METHODS)}",
                        param="method.type")


def check_data_fits(summary: dict, stage: str, param: str) -> None:
    """Refuse data a stage cannot train on (raw text for a conversation stage, images for a text stage, a format
    the stage does not read), naming the file's field."""
    kind, formats = summary.get("kind"), summary.get("formats", {})
    preference = stage in PREFERENCE_STAGES
    if preference and kind != "preference":
        raise FineTuneError(f"{param}: method dpo trains on preference pairs (a prompt with a chosen and a rejected "
                            f"answer: {', '.join(PREFERENCE_FORMATS)}), and the file holds "
                            f"{'raw text' if kind == 'text' else 'conversations with one answer each'}; upload pairs, "
                            "or train this file with method supervised", param=param)
    if kind == "preference" and not preference:
        raise FineTuneError(f"{param}: the file holds preference pairs (chosen and rejected answers); train them with "
                            "method dpo, or upload conversations with one answer each for method supervised",
                            param=param)
    if stage == "text-pt" and kind != "text":
        raise FineTuneError(f"{param}: this base trains stage text-pt on raw text, but the file holds conversations",
                            param=param)
    if stage != "text-pt" and kind == "text":
        raise FineTuneError(f"{param}: the file holds raw text (text-pt data); this base trains stage {stage} on "
                            "conversations", param=param)
    if STAGE_MODALITY.get(stage) == "text" and summary.get("with_images"):
        raise FineTuneError(f"{param}: {summary['with_images']} records have images, and this base is a text-only "
                            f"model (stage {stage}); use a multimodal base", param=param)
    readable = STAGE_FORMATS.get(stage)
    unread = [name for name in formats if readable is not None and name not in readable and kind != "text"]
    if unread:
        raise FineTuneError(f"{param}: stage {stage} does not read {', '.join(unread)} records (it reads "
                            f"{', '.join(f for f in readable if f != 'auto')})", param=param)


def apply_hyperparameters(train: dict, hyperparameters: dict) -> dict:
    """Change a config's `train` section as OpenAI's hyperparameters ask; returns them as the job reports them
    (numbers where the config decides, `auto` where it trains by steps)."""
    n_epochs = hyperparameters.get("n_epochs", "auto")
    batch_size = hyperparameters.get("batch_size", "auto")
    multiplier = hyperparameters.get("learning_rate_multiplier", "auto")
    if n_epochs != "auto":
        train["num_epochs"], train["max_steps"] = n_epochs, -1
    if batch_size != "auto":
        largest = int(train.get("micro_batch_size", 8))
        micro = max(d for d in range(1, min(largest, batch_size) + 1) if batch_size % d == 0)
        train["micro_batch_size"], train["gradient_accumulation_steps"] = micro, batch_size // micro
    if multiplier != "auto":
        train["learning_rate"] = float(train.get("learning_rate", 1e-3)) * multiplier
        if train.get("projector_learning_rate") is not None:
            train["projector_learning_rate"] = float(train["projector_learning_rate"]) * multiplier
    by_steps = int(train.get("max_steps", -1)) > 0
    return {"n_epochs": "auto" if by_steps else train.get("num_epochs", 1),
            "batch_size": int(train.get("micro_batch_size", 8)) * int(train.get("gradient_accumulation_steps", 1)),
            "learning_rate_multiplier": 1.0 if multiplier == "auto" else multiplier}


def fine_tune_config(base: Base, method: str, hyperparameters: dict, data_path: str, image_root: str,
                     output_dir: str, seed: int | None) -> tuple[dict, dict]:
    """The run config of a fine-tuning job (not yet validated) and its hyperparameters as reported."""
    import copy

    config = copy.deepcopy(base.config)
    config["stage"] = method_stage(method, config.get("stage", "sft"))
    config["output_dir"] = output_dir
    if config["stage"] in PREFERENCE_STAGES:
        _preference_settings(config, hyperparameters.get("beta", "auto"))
    if seed is not None:
        config["seed"] = seed
    data = config.setdefault("data", {})
    data.update({"path": data_path, "format": "auto"})
    if STAGE_MODALITY.get(config["stage"]) != "text":
        data["image_root"] = image_root
    train = config.setdefault("train", {})
    echoed = apply_hyperparameters(train, hyperparameters)
    train["logging_steps"] = 1  # every step's loss is an event of the job, as OpenAI reports them
    if config["stage"] in PREFERENCE_STAGES:
        echoed["beta"] = train["preference"].get("beta", PreferenceConfig().beta)
    return config, echoed


def _preference_settings(config: dict, beta) -> None:
    """A base's config turned to a dpo job's: the LLM's adapter trained against itself disabled (the reference), the
    projector frozen (so the reference needs no copy), no packing; `beta` (not `auto`) sets the loss's beta."""
    model, train = config.setdefault("model", {}), config.setdefault("train", {})
    trainable = model.setdefault("trainable", {})
    if config["stage"] == "dpo":
        trainable["projector"] = "frozen"
        train.pop("projector_learning_rate", None)
    config.setdefault("data", {})["packing"] = False
    preference = train.setdefault("preference", {})
    if beta != "auto":
        preference["beta"] = beta
