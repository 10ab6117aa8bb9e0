"""Preference data of the shapes task: the true description chosen, one that names a second, absent shape rejected.

    write_shape_pairs("work/shapes/sft.json", "work/shapes/pairs.json")
    llava-kit demo --preference [--workdir demo_preference]       # the recipe: before/after figures through chat

A rejected answer is the true description with "and a COLOUR SHAPE" added for a shape that is not in the image
("A red square and a blue circle on a white background."), the kind of object hallucination RLHF-V and RLAIF-V
train away. `names_absent_shape` is the measure: whether an answer names a shape the image does not show.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava_kit.demo.pipeline import DemoRecipe
from llava_kit.demo.shapes import COLORS, IMAGE_TOKEN, QUESTIONS, SHAPES

DESCRIBE = QUESTIONS["describe"]


def hallucinated(description: str, shape: str, rng: random.Random) -> str:
    """`description` ("A red square on a white background.") with a second, absent shape added after the first."""
    other = rng.choice([s for s in SHAPES if s != shape])
    color = rng.choice(list(COLORS))
    return description.replace(f" {shape} on ", f" {shape} and a {color} {other} on ", 1)


def true_description(record: dict) -> tuple[str, str]:
    """(the description, its shape) of a shapes sft.json record."""
    turns = record["conversations"]
    answer = next(turns[i + 1]["value"] for i in range(0, len(turns) - 1, 2) if DESCRIBE in turns[i]["value"])
    return answer, next(s for s in SHAPES if f" {s} on " in answer)


def shape_pairs(records: list[dict], seed: int = 0) -> list[dict]:
    """LLaMA-Factory pairwise records (one per image): "Describe the image." -> chosen true, rejected hallucinated."""
    rng = random.Random(seed)
    pairs = []
    for record in records:
        answer, shape = true_description(record)
        pairs.append({"id": record["id"], "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{DESCRIBE}"}],
                      "chosen": {"from": "gpt", "value": answer},
                      "rejected": {"from": "gpt", "value": hallucinated(answer, shape, rng)},
                      "images": [record["image"]]})
    return pairs


def write_shape_pairs(sft_json: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write the pairs of every image of a shapes sft.json as LLaMA-Factory pairwise JSON."""
    out = Path(out)
    out.write_text(json.dumps(shape_pairs(json.loads(Path(sft_json).read_text()), seed), indent=1) + "\n")
    return out


_SHAPE_WORDS = {s: re.compile(rf"\b{s}s?\b", re.IGNORECASE) for s in SHAPES}


def names_absent_shape(answer: str, shape: str) -> bool:
    """Whether `answer` names a shape other than `shape` (the one in the image)."""
    return any(pattern.search(answer) for s, pattern in _SHAPE_WORDS.items() if s != shape)


def hallucinating_sft(records: list[dict], rate: float, seed: int = 0) -> list[dict]:
    """The shapes sft.json records with the description answer hallucinated (a second, absent shape) in a
    fraction `rate` of them: the sft model then names absent shapes, as real VLMs name absent objects."""
    rng = random.Random(seed)
    out = []
    for record in records:
        turns = [dict(t) for t in record["conversations"]]
        if rng.random() < rate:
            answer, shape = true_description(record)
            for i in range(0, len(turns) - 1, 2):
                if DESCRIBE in turns[i]["value"]:
                    turns[i + 1]["value"] = hallucinated(answer, shape, rng)
        out.append({**record, "conversations": turns})
    return out


@dataclass
class PreferenceRecipe:
    """The preference recipe's numbers: the demo's models and stages, an sft that hallucinates, then dpo."""

    demo: DemoRecipe = field(default_factory=lambda: DemoRecipe(sft_steps=500))
    hallucination_rate: float = 0.7
    """Fraction of the sft descriptions that name a second, absent shape."""
    dpo_steps: int = 120
    dpo_batch_size: int = 8
    dpo_lr: float = 1e-4
    """Measured (docs/preference.md): 1e-3 over-optimises (the rejected answers' probability collapses and takes the
    language with it: "square square on a."); 1e-4 keeps the chosen answers likely."""
    beta: float = 0.1
    lora_r: int = 16

    @classmethod
    def quick(cls) -> PreferenceRecipe:
        """A few steps of everything: checks the recipe end to end (the figures mean nothing)."""
        return cls(demo=DemoRecipe.quick(), dpo_steps=4, dpo_batch_size=4)


def measure(model_dir: Path, eval_jsonl: Path, image_root: Path, kinds=("describe", "shape")) -> dict:
    """Greedy answers through the generation service (the chat path) to the held-out questions of `kinds`:
    the fraction of descriptions that name an absent shape, that name two or more shapes, and the accuracy per
    kind (the demo's scorer)."""
    from llava_kit.benchmarks import custom
    from llava_kit.demo.shapes import score_record
    from llava_kit.eval import answer_with_service, read_eval_records
    from llava_kit.inference import GenerationService
    from llava_kit.inference.sampling import SamplingParams
    from llava_kit.loader import open_model_dir

    records = [r for r in read_eval_records(eval_jsonl) if r["kind"] in kinds]
    service = GenerationService.from_loaded(open_model_dir(model_dir))
    items = custom.items_of(records, image_root, "shapes")
    answers = [a.text for a in answer_with_service(service, items, SamplingParams(max_new_tokens=24), progress=False)]
    described = [(r, a) for r, a in zip(records, answers, strict=True) if r["kind"] == "describe"]
    result = {"absent_shape": sum(names_absent_shape(a, r["shape"]) for r, a in described) / len(described),
              "two_shapes": sum(sum(bool(p.search(a)) for p in _SHAPE_WORDS.values()) > 1 for _, a in described)
              / len(described)}
    for kind in kinds:
        scored = [score_record(r, a) for r, a in zip(records, answers, strict=True) if r["kind"] == kind]
        result[f"accuracy_{kind}"] = sum(scored) / len(scored)
    result["examples"] = [a for _, a in described[:3]]
    return result


def run_preference_demo(workdir: str | Path = "demo_preference", quick: bool = False,
                        recipe: PreferenceRecipe | None = None, results=None) -> int:
    """The preference recipe: the demo's data and models -> pretrain -> an sft whose descriptions often name an
    absent shape -> merge (before) -> dpo on pairs (true description chosen, hallucinated rejected) -> merge (after);
    both measured through the generation service on held-out images. Prints the figures; writes
    WORKDIR/preference_summary.json."""
    from llava_kit.demo.pipeline import prepare_shapes

    recipe = recipe or (PreferenceRecipe.quick() if quick else PreferenceRecipe())
    workdir = Path(workdir).resolve()
    timings: dict[str, float] = {}
    prepared = prepare_shapes(recipe.demo, workdir, timings)
    return train_and_measure(recipe, workdir, prepared, timings, results)


def train_and_measure(recipe: PreferenceRecipe, workdir: Path, prepared: dict, timings: dict, results=None) -> int:
    """The recipe after the demo's preparation (`prepare_shapes`: data, tiny models, tower warm-up, text-pt)."""
    import yaml

    from llava_kit.config import load_config
    from llava_kit.demo.pipeline import _stage
    from llava_kit.export.merge import merge_run
    from llava_kit.train.engine import train

    configs = prepared["configs"]
    sft_records = json.loads(Path(prepared["sft"]).read_text())
    hallucinating = workdir / "data" / "sft_hallucinating.json"
    hallucinating.write_text(json.dumps(hallucinating_sft(sft_records, recipe.hallucination_rate, recipe.demo.seed),
                                        indent=1) + "\n")
    pairs = write_shape_pairs(prepared["sft"], workdir / "data" / "pairs.json", recipe.demo.seed)
    sft_cfg = yaml.safe_load(Path(configs["sft"]).read_text())
    sft_cfg["data"]["path"] = str(hallucinating)
    Path(configs["sft"]).write_text(yaml.safe_dump(sft_cfg, sort_keys=False))
    with _stage("pretrain", timings):
        train(load_config(configs["pretrain"]), overwrite=True)
    with _stage("sft (hallucinating)", timings):
        before = merge_run(train(load_config(configs["sft"]), overwrite=True), workdir / "merged_sft")
    dpo = {
        "stage": "dpo", "output_dir": str(workdir / "runs" / "dpo"), "seed": recipe.demo.seed,
        "model": {"vision": {"name_or_path": str(before), **{k: sft_cfg["model"]["vision"][k]
                                                              for k in ("feature_layer", "select_strategy")}},
                  "llm": {"name_or_path": str(before)}, "init_from": str(before),
                  "trainable": {"vision": "frozen", "projector": "frozen", "llm": "lora"},
                  "lora": {"r": recipe.lora_r, "alpha": 2 * recipe.lora_r, "dropout": 0.0}},
        "data": {**sft_cfg["data"], "path": str(pairs)},
        "train": {**sft_cfg["train"], "micro_batch_size": recipe.dpo_batch_size, "max_steps": recipe.dpo_steps,
                  "learning_rate": recipe.dpo_lr, "projector_learning_rate": None, "logging_steps": 10,
                  "preference": {"beta": recipe.beta}},
    }
    configs["dpo"] = workdir / "configs" / "dpo.yaml"
    configs["dpo"].write_text(yaml.safe_dump(dpo, sort_keys=False))
    with _stage("dpo", timings):
        after = merge_run(train(load_config(configs["dpo"]), overwrite=True), workdir / "merged_dpo")
    with _stage("measure", timings):
        figures = {name: measure(path, prepared["eval"], prepared["images"])
                   for name, path in (("before (sft)", before), ("after (dpo)", after))}
    summary = {"figures": figures, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "recipe": asdict(recipe)}
    (workdir / "preference_summary.json").write_text(json.dumps(summary, indent=2))
    out = results or sys.stdout
    for name, f in figures.items():
        print(f"{name}: names an absent shape {f['absent_shape']:.2f}, two or more shapes {f['two_shapes']:.2f}, "
              f"describe accuracy {f['accuracy_describe']:.2f}, shape accuracy {f['accuracy_shape']:.2f}", file=out)
    return 0
