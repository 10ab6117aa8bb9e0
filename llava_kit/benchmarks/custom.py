"""llava-kit's own eval JSONL: one question per line, scored by a scorer of llava_kit/scoring.py (exact, shapes).

    {"image": "eval/000000.png", "question": "What shape is in the image?", "answer": "a star"}
    {"image": "eval/000001.png", "question": "...", "kind": "shape", "shape": "star", "color": "red"}

The question is asked as it is (no suffix), its image first, as `llava-kit chat --image` asks it. Reports accuracy
overall and per `kind`; the summary's last line is `accuracy: X.XX`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_kit.benchmarks.base import Benchmark, Item, Scores, image_file, ratio
from llava_kit.errors import DataError, PathNotFoundError
from llava_kit.scoring import choose_scorer, load_scorer

LAYOUT = "a JSONL of {image (optional), question, answer | the fields of a scorer}"


def read_records(path: str | Path) -> list[dict]:
    """The records of an eval JSONL file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"eval data {str(path)!r} does not exist")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise DataError(f"{path}:{line_no}: an eval record is an object with a `question` string")
        records.append(record)
    return records


def items_of(records: list[dict], image_root: str | Path | None, scorer: str = "auto") -> list[Item]:
    """Items of eval records, each carrying the scorer chosen for the set (`auto`: the first that fits them all)."""
    name, _ = choose_scorer(records, scorer)
    root = Path(image_root) if image_root is not None else None
    return [Item(id=str(record.get("id", n)), prompt=record["question"],
                 images=[image_file(record["image"], root, f"record {n}")] if record.get("image") else [],
                 answer={"scorer": name, "record": record}, category=str(record.get("kind", "")), record=record)
            for n, record in enumerate(records, 1)]


def read(data: Path, image_root: Path | None, limit: int = 0, scorer: str = "auto") -> list[Item]:
    records = read_records(data)
    return items_of(records[:limit] if limit else records, image_root, scorer)


def score(items: list[Item], predictions: list[str]) -> Scores:
    rows = []
    for item, prediction in zip(items, predictions, strict=True):
        scorer = load_scorer(item.answer["scorer"])
        rows.append({"correct": bool(scorer(item.answer["record"], prediction))})
    by_category, counts = {}, {"all": len(items)}
    for kind in sorted({item.category for item in items if item.category and item.category != "all"}):
        chosen = [r["correct"] for item, r in zip(items, rows, strict=True) if item.category == kind]
        by_category[kind] = {"accuracy": ratio(sum(chosen), len(chosen))}
        counts[kind] = len(chosen)
    return Scores(rows, {"accuracy": ratio(sum(r["correct"] for r in rows), len(rows))}, by_category, counts)


BENCHMARK = Benchmark(name="custom", title="llava-kit's eval JSONL (the exact and shapes scorers): accuracy per kind",
                      layouts=LAYOUT, read=read, score=score, headline="accuracy", max_new_tokens=32)
