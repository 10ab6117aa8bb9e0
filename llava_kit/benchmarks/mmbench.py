"""MMBench: multiple choice (A-D) with circular evaluation; accuracy per category.

Reads MMBench's TSV (`mmbench_dev_20230712.tsv`, `MMBench_DEV_EN.tsv`, ...; columns `index, question, hint, A, B,
C, D, answer, category, l2-category, image` with base64 images; lmms-lab/MMBench's parquet files too).

Circular evaluation: every question is asked once per rotation of its options (n options, n rotations: the option
texts move up one letter each time, the right answer's letter with them), and counts as right only when every
rotation is answered right. A file that already holds the rotations (VLMEvalKit's circular TSVs: rotation k of
question i has index i + k x 1,000,000) is asked as it is, grouped by `index % 1,000,000`; otherwise the rotations
are made here, as LLaVA's model_vqa_mmbench.py --all-rounds does.

Prompt (LLaVA-1.5): the hint (when there is one), the question, one line per option `A. text`, then "Answer with
the option's letter from the given choices directly." (MMBench-CN: "请直接回答选项字母。"). An answer is read as
VLMEvalKit's rule-based matching (`can_infer`, without its GPT fallback): punctuation becomes spaces, and the one
option letter standing alone among the words is the answer; else the one option whose text the answer contains;
else none (wrong).

Reports `circular_accuracy` (the headline: right groups / groups) and `accuracy` (the questions as given, first
rotation only), both per category.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from llava_kit.benchmarks.base import (
    LLAVA_LETTER_ANSWER,
    Benchmark,
    BenchmarkFileError,
    Item,
    Scores,
    decode_base64_image,
    json_safe,
    ratio,
    read_rows,
    require_keys,
)

LETTERS = ("A", "B", "C", "D")
CIRCULAR = 1_000_000
"""VLMEvalKit's circular copies: rotation k of question i has index i + k x CIRCULAR."""
LAYOUT = ("MMBench's TSV columns index, question, hint, A, B, C, D, answer, category, l2-category, image (base64); "
          "the dev split (the test split has no answers)")
CHINESE_SUFFIX = "请直接回答选项字母。"
PUNCTUATION = re.compile(r"[.()\[\],:;!*#{}]")


def is_none(value) -> bool:
    """An empty cell as LLaVA's model_vqa_mmbench.py sees it: None, NaN, "", "nan" or "none"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def read_with(suffix: str):
    """A reader whose prompts end with `suffix` (English or Chinese)."""

    def read(data: Path, image_root: Path | None = None, limit: int = 0) -> list[Item]:
        """MMBench questions, each once per rotation of its options (or as the file holds them)."""
        rows = read_rows(data)
        if rows:
            require_keys(rows[0], ("index", "question", "A", "B", "answer", "image"), f"{data.name}:2", LAYOUT)
        indices = [int(float(row["index"])) for row in rows]
        circular_in_file = any(index >= CIRCULAR for index in indices)
        groups = list(dict.fromkeys(index % CIRCULAR for index in indices))
        kept = set(groups[:limit] if limit else groups)
        items = []
        for n, (row, index) in enumerate(zip(rows, indices, strict=True), 2):
            if index % CIRCULAR not in kept:
                continue
            where = f"{data.name}:{n}"
            options = [row[letter] for letter in _present_options(row)]
            answer = str(row["answer"]).strip()
            if answer not in LETTERS[:len(options)]:
                raise BenchmarkFileError(f"{where}: the answer is {row['answer']!r}, not one of the question's option "
                                         f"letters {', '.join(LETTERS[:len(options)])}")
            rotations = [0] if circular_in_file else range(len(options))
            image = row["image"]
            image = bytes(image["bytes"]) if isinstance(image, dict) else decode_base64_image(image, where)
            for rotation in rotations:
                items.append(_item(row, index, rotation, options, answer, image, suffix))
        return items

    return read


def _present_options(row: dict) -> list[str]:
    """The option letters of a question: A, B, ... up to the first empty one."""
    present = []
    for letter in LETTERS:
        if is_none(row.get(letter)):
            break
        present.append(letter)
    return present


def _item(row: dict, index: int, rotation: int, options: list, answer: str, image: bytes, suffix: str) -> Item:
    """Rotation `rotation` of a question: option texts moved up `rotation` letters, the answer's letter with them."""
    n = len(options)
    rotated = [str(o) for o in options[rotation:] + options[:rotation]]
    gold = LETTERS[(LETTERS.index(answer) - rotation) % n]
    question = str(row["question"])
    if not is_none(row.get("hint")):
        question = f"{row['hint']}\n{question}"
    lines = [question, *(f"{letter}. {text}" for letter, text in zip(LETTERS, rotated, strict=False)), suffix]
    asked = dict(zip(LETTERS, rotated, strict=False))
    record = {**json_safe(row), "rotation": index // CIRCULAR + rotation, "group": index % CIRCULAR, "options": asked,
              "gold": gold}
    return Item(id=str(index + rotation * CIRCULAR), prompt="\n".join(lines), images=[image], answer=gold,
                category=str(row.get("category") or ""), record=record)


def parse_answer(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names (VLMEvalKit's rule-based matching), or None."""
    words = PUNCTUATION.sub(" ", text).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    named = [letter for letter, option in options.items() if option.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def score(items: list[Item], predictions: list[str]) -> Scores:
    rows, groups, first_pass = [], defaultdict(list), defaultdict(list)
    category_of = {}
    for item, prediction in zip(items, predictions, strict=True):
        parsed = parse_answer(prediction, item.record["options"])
        correct = parsed == item.answer
        rows.append({"parsed": parsed, "correct": correct})
        group = item.record["group"]
        groups[group].append(correct)
        if int(item.id) < CIRCULAR:  # the question as the file gives it
            first_pass[item.category].append(correct)
            category_of[group] = item.category
    by_category, counts = {}, {"all": len(groups)}
    for category in sorted({c for c in category_of.values() if c}):
        chosen = [g for g, c in category_of.items() if c == category]
        by_category[category] = {"circular_accuracy": ratio(sum(all(groups[g]) for g in chosen), len(chosen)),
                                 "accuracy": ratio(sum(first_pass[category]), len(first_pass[category]))}
        counts[category] = len(chosen)
    every_first = [c for answers in first_pass.values() for c in answers]
    metrics = {"circular_accuracy": ratio(sum(all(g) for g in groups.values()), len(groups)),
               "accuracy": ratio(sum(every_first), len(every_first))}
    return Scores(rows, metrics, by_category, counts, unit="circular groups")


def _benchmark(name: str, title: str, suffix: str) -> Benchmark:
    return Benchmark(name=name, title=title, layouts=LAYOUT, read=read_with(suffix), score=score,
                     headline="circular_accuracy")


BENCHMARK = _benchmark("mmbench", "MMBench (English): circular accuracy per category", LLAVA_LETTER_ANSWER)
BENCHMARK_CN = _benchmark("mmbench-cn", "MMBench-CN (Chinese): circular accuracy per category", CHINESE_SUFFIX)
