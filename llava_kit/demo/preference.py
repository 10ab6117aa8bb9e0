"""Preference data of the shapes task: the true description chosen, one that names a second, absent shape rejected.

    write_shape_pairs("work/shapes/sft.json", "work/shapes/pairs.json")

A rejected answer is the true description with "and a COLOUR SHAPE" added for a shape that is not in the image
("A red square and a blue circle on a white background."), the kind of object hallucination RLHF-V and RLAIF-V
train away. `names_absent_shape` is the measure: whether an answer names a shape the image does not show.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

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
