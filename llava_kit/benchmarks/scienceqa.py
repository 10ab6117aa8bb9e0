"""ScienceQA-IMG: multiple-choice science questions with an image (the IMG subset of the test split); accuracy.

Reads
- ScienceQA's own `problems.json` (pid -> question, choices, answer index, hint, image, split, subject), the test
  split as `pid_splits.json` beside it names it (else each problem's `split`); images at IMAGE_ROOT/PID/image.png
  (LLaVA's `scienceqa/images/test`);
- LLaVA's question file `llava_test_CQM-A.json` (id, image, conversations with the prompt and "The answer is X.");
- records with `question`, `choices`, `answer` (the index of the right choice), `hint` and `image` (lmms-lab/
  ScienceQA's ScienceQA-IMG parquet files, or the same fields in .jsonl).
Problems without an image are left out (the -IMG subset).

Prompt (LLaVA-1.5, its CQM format): "Context: HINT (N/A when empty)\\nQuestion: QUESTION\\nOptions: (A) x (B) y",
then "Answer with the option's letter from the given choices directly.". An answer is read as LLaVA's
eval_science_qa.py reads it: a letter alone, a letter followed by ". ", or the one "The answer is X." in it; else it
failed (wrong). Reports accuracy, per subject.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from llava_kit.benchmarks.base import (
    LLAVA_LETTER_ANSWER,
    Benchmark,
    BenchmarkFileError,
    Item,
    Scores,
    image_file,
    json_safe,
    pick,
    ratio,
    read_json,
    read_rows,
    row_image,
)

logger = logging.getLogger(__name__)

OPTIONS = ("A", "B", "C", "D", "E")
LAYOUT = ("ScienceQA's problems.json, LLaVA's llava_test_CQM-A.json, or records with `question`, `choices`, "
          "`answer` (index), `hint`, `image` (lmms-lab/ScienceQA parquet)")
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
PROMPT_OPTION = re.compile(r"\(([A-E])\) ")


def cqm_prompt(question: str, choices: list[str], hint: str | None) -> str:
    """LLaVA's CQM prompt of a problem (scripts/convert_sqa_to_llava_base_prompt.py), with the letter suffix."""
    context = (hint or "").strip() or "N/A"
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip(OPTIONS, choices, strict=False))
    text = f"Context: {context}\nQuestion: {question}\nOptions: {options}\n".replace("  ", " ").strip()
    return f"{text}\n{LLAVA_LETTER_ANSWER}"


def read(data: Path, image_root: Path | None, limit: int = 0) -> list[Item]:
    """The ScienceQA problems with an image, from any of the three layouts."""
    value = read_json(data) if data.suffix.lower() in (".json", ".jsonl") else read_rows(data)
    if isinstance(value, dict):
        items = _from_problems(value, data, image_root)
    elif value and isinstance(value[0], dict) and "conversations" in value[0]:
        items = _from_llava(value, data, image_root)
    else:
        items = _from_rows(value, data, image_root)
    return items[:limit] if limit else items


def _item(pid: str, prompt: str, image, gold: str, n_choices: int, category: str, record: dict) -> Item:
    return Item(id=pid, prompt=prompt, images=[image], answer=gold, category=category,
                record={**record, "gold": gold, "n_choices": n_choices})


def _from_problems(problems: dict, data: Path, image_root: Path | None) -> list[Item]:
    splits = data.parent / "pid_splits.json"
    if splits.is_file():
        test = read_json(splits)["test"]
    else:
        test = [pid for pid, p in problems.items() if p.get("split", "test") == "test"]
    items, skipped = [], 0
    for pid in test:
        problem = problems[pid]
        if not problem.get("image"):
            skipped += 1
            continue
        where = f"{data.name}[{pid}]"
        for key in ("question", "choices", "answer"):
            pick(problem, (key,), where, LAYOUT)
        image = image_file(f"{pid}/{problem['image']}", image_root, where)
        prompt = cqm_prompt(problem["question"], problem["choices"], problem.get("hint"))
        items.append(_item(pid, prompt, image, OPTIONS[int(problem["answer"])], len(problem["choices"]),
                           str(problem.get("subject") or ""), {"pid": pid, **json_safe(problem)}))
    logger.info("scienceqa-img: %d test problems with an image (%d without one left out)", len(items), skipped)
    return items


def _from_llava(records: list, data: Path, image_root: Path | None) -> list[Item]:
    items = []
    for n, record in enumerate(records):
        if not record.get("image"):
            continue
        where = f"{data.name}[{n}]"
        turns = record["conversations"]
        prompt = turns[0]["value"].replace("<image>", "").strip()
        gold = ANSWER_IS.findall(turns[1]["value"]) if len(turns) > 1 else []
        if len(gold) != 1:
            raise BenchmarkFileError(f"{where}: the answer turn has no single \"The answer is X.\"; LLaVA's "
                                     "llava_test_CQM-A.json holds it (other formats: problems.json)")
        image = image_file(record["image"], image_root, where)
        items.append(_item(str(record.get("id", n)), f"{prompt}\n{LLAVA_LETTER_ANSWER}", image, gold[0],
                           len(PROMPT_OPTION.findall(prompt)), "", {"id": record.get("id", n), "prompt": prompt}))
    return items


def _from_rows(rows: list, data: Path, image_root: Path | None) -> list[Item]:
    items = []
    for n, row in enumerate(rows, 1):
        where = f"{data.name}:{n}"
        for key in ("question", "choices", "answer"):
            pick(row, (key,), where, LAYOUT)
        if row.get("image") in (None, "") or (isinstance(row["image"], dict) and not any(row["image"].values())):
            continue
        choices = list(row["choices"])
        items.append(_item(str(row.get("id", n)), cqm_prompt(row["question"], choices, row.get("hint")),
                           row_image(row["image"], image_root, where), OPTIONS[int(row["answer"])], len(choices),
                           str(row.get("subject") or ""), json_safe(row)))
    return items


def parse_answer(text: str, n_choices: int) -> str | None:
    """The letter LLaVA's eval_science_qa.py reads from an answer, or None when it fails."""
    if text in OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in OPTIONS[:n_choices] else None


def score(items: list[Item], predictions: list[str]) -> Scores:
    rows = []
    for item, prediction in zip(items, predictions, strict=True):
        parsed = parse_answer(prediction, item.record["n_choices"])
        rows.append({"parsed": parsed, "correct": parsed == item.answer})
    by_category, counts = {}, {"all": len(items)}
    for category in sorted({item.category for item in items if item.category}):
        chosen = [r["correct"] for item, r in zip(items, rows, strict=True) if item.category == category]
        by_category[category] = {"accuracy": ratio(sum(chosen), len(chosen))}
        counts[category] = len(chosen)
    return Scores(rows, {"accuracy": ratio(sum(r["correct"] for r in rows), len(rows))}, by_category, counts)


BENCHMARK = Benchmark(name="scienceqa-img", title="ScienceQA-IMG: multiple choice with an image, accuracy",
                      layouts=LAYOUT, read=read, score=score, headline="accuracy")
