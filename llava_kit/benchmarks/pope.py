"""POPE: yes/no questions about objects in COCO images; accuracy, precision, recall, F1 and the yes-ratio.

Reads the files as LLaVA and lmms-eval have them:
- LLaVA's annotation files `coco_pope_{adversarial,popular,random}.json` (one JSON object per line: `question_id`,
  `image`, `text`, `label` yes/no), one file or a folder of them; the category is taken from the file name;
- records with `question` (or `text`), `answer` (or `label`), `image` (a file name, or image bytes) and optionally
  `category`, as .jsonl / .json / .parquet (lmms-lab/POPE's parquet files).

Prompt (LLaVA-1.5): the question, then "Answer the question using a single word or phrase.". An answer is read as
LLaVA's eval_pope.py reads it: only its first sentence, commas removed, split on spaces; it is "no" when a word is
`No`, `no` or `not`, else "yes". Positive = yes: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their
harmonic mean (0 where undefined), yes-ratio = the share of answers read as yes.
"""

from __future__ import annotations

import re
from pathlib import Path

from llava_kit.benchmarks.base import (
    LLAVA_SHORT_ANSWER,
    Benchmark,
    BenchmarkFileError,
    Item,
    Scores,
    json_safe,
    pick,
    ratio,
    read_rows,
    row_image,
)

LAYOUT = ("POPE records with `question` (or `text`), `answer` (or `label`: yes/no) and `image` (LLaVA's "
          "coco_pope_*.json, lmms-lab/POPE parquet)")
POPE_FILE = re.compile(r"coco_pope_(\w+)\.jsonl?$")


def read(data: Path, image_root: Path | None, limit: int = 0) -> list[Item]:
    """POPE questions from one file or a folder of coco_pope_*.json files."""
    files = sorted(p for p in data.iterdir() if POPE_FILE.search(p.name)) if data.is_dir() else [data]
    if data.is_dir() and not files:
        files = [data]  # a folder of parquet files
    items: list[Item] = []
    for path in files:
        match = POPE_FILE.search(path.name)
        for n, row in enumerate(read_rows(path), 1):
            where = f"{path.name}:{n}"
            question = pick(row, ("question", "text"), where, LAYOUT)
            answer = pick(row, ("answer", "label"), where, LAYOUT)
            label = str(row[answer]).strip().lower()
            if label not in ("yes", "no"):
                raise BenchmarkFileError(f"{where}: the answer is {row[answer]!r}; POPE answers are yes or no")
            category = str(row.get("category") or (match.group(1) if match else ""))
            items.append(Item(id=str(row.get("question_id", f"{path.name}:{n}")),
                              prompt=f"{str(row[question]).strip()}\n{LLAVA_SHORT_ANSWER}",
                              images=[row_image(row.get("image"), image_root, where)], answer=label,
                              category=category, record=json_safe(row)))
    return items[:limit] if limit else items


def parse_answer(text: str) -> str:
    """yes or no, as LLaVA's eval_pope.py reads an answer (first sentence; `No`, `no` or `not` among its words)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def metrics(labels: list[str], predictions: list[str]) -> dict[str, float]:
    """POPE's five numbers for parsed predictions against labels (positive = yes)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"accuracy": ratio(tp + tn, len(pairs)), "precision": precision, "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall), "yes_ratio": ratio(tp + fp, len(pairs))}


def score(items: list[Item], predictions: list[str]) -> Scores:
    parsed = [parse_answer(p) for p in predictions]
    rows = [{"parsed": p, "correct": p == item.answer} for item, p in zip(items, parsed, strict=True)]
    by_category, counts = {}, {"all": len(items)}
    for category in sorted({item.category for item in items if item.category}):
        chosen = [i for i, item in enumerate(items) if item.category == category]
        by_category[category] = metrics([items[i].answer for i in chosen], [parsed[i] for i in chosen])
        counts[category] = len(chosen)
    return Scores(rows, metrics([item.answer for item in items], parsed), by_category, counts)


BENCHMARK = Benchmark(name="pope", title="POPE object hallucination: accuracy, precision, recall, F1, yes-ratio",
                      layouts=LAYOUT, read=read, score=score, headline="f1")
