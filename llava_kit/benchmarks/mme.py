"""MME: two yes/no questions per image in 14 categories; acc and acc+ per category, scores summed as MME reports.

Reads
- the official release folder `MME_Benchmark_release_version/` (what LLaVA's scripts use): one folder per
  category, either `images/` + `questions_answers_YN/` or images with their `.txt` beside them; each `.txt` holds
  the image's two `question<TAB>answer` lines;
- records with `question`, `answer` (Yes/No), `category`, `image` (a file name, or image bytes) and the image's
  id in `question_id` (lmms-lab/MME's parquet files, whose question_id is `category/file`) or `image_path`
  (VLMEvalKit's MME.tsv, base64 images).

Prompt (LLaVA-1.5): the question without its " Please answer yes or no.", then "Answer the question using a single
word or phrase.". An answer is read as MME's eval tool reads it: lower-cased, "yes"/"no" as it is, else "yes" or
"no" when its first four characters contain it (yes first), else "other" (wrong).

Per category: acc = questions answered right / questions; acc+ = images with both questions right / images;
score = (acc + acc+) x 100 (200 at most). Perception is the sum of the ten perception categories' scores (2000 at
most), cognition of the four cognition ones (800 at most), as MME's calculation.py prints them.
"""

from __future__ import annotations

import base64
import logging
import re
from collections import defaultdict
from pathlib import Path

from llava_kit.benchmarks.base import (
    LLAVA_SHORT_ANSWER,
    Benchmark,
    BenchmarkFileError,
    Item,
    Scores,
    first_key,
    json_safe,
    pick,
    ratio,
    read_rows,
    row_image,
)

logger = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
LAYOUT = ("MME_Benchmark_release_version/ (a folder per category), or records with `question`, `answer`, "
          "`category`, `image` and `question_id` or `image_path` (lmms-lab/MME parquet, VLMEvalKit's MME.tsv)")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
YES_NO_SUFFIX = re.compile(r"\s*Please answer yes or no\.\s*$")


def prompt_of(question: str) -> str:
    """LLaVA-1.5's MME prompt: the question without "Please answer yes or no.", then the short-answer suffix."""
    return f"{YES_NO_SUFFIX.sub('', question.strip())}\n{LLAVA_SHORT_ANSWER}"


def read(data: Path, image_root: Path | None, limit: int = 0) -> list[Item]:
    """MME questions, two per image, from the release folder or a records file."""
    items = _read_release(data) if data.is_dir() and not any(data.glob("*.parquet")) else _read_rows(data, image_root)
    if limit:  # whole images: acc+ needs both questions of each
        kept = list(dict.fromkeys(item.record["pair"] for item in items))[:limit]
        items = [item for item in items if item.record["pair"] in set(kept)]
    return items


def _read_release(root: Path) -> list[Item]:
    items = []
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        category = category_dir.name
        images = category_dir / "images" if (category_dir / "images").is_dir() else category_dir
        answers = category_dir / "questions_answers_YN" if images != category_dir else category_dir
        for txt in sorted(answers.glob("*.txt")):
            image = next((images / (txt.stem + s) for s in IMAGE_SUFFIXES if (images / (txt.stem + s)).is_file()),
                         None)
            if image is None:
                raise BenchmarkFileError(f"{txt}: no image {txt.stem}.jpg or .png in {images}")
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                question, tab, answer = line.strip().partition("\t")
                if not tab:
                    raise BenchmarkFileError(f"{txt}:{n}: expected `question<TAB>answer` (MME's .txt files)")
                pair = f"{category}/{image.name}"
                items.append(_item(f"{pair}:{n}", question, answer, category, image, pair, f"{txt}:{n}",
                                   {"question_id": pair, "question": question, "answer": answer, "category": category}))
    if not items:
        raise BenchmarkFileError(f"{root} holds no MME questions; expected {LAYOUT}")
    return items


def _read_rows(data: Path, image_root: Path | None) -> list[Item]:
    items = []
    for n, row in enumerate(read_rows(data), 1):
        where = f"{data.name}:{n}"
        pair_key = pick(row, ("question_id", "image_path"), where, LAYOUT)
        for key in ("question", "answer", "category"):
            pick(row, (key,), where, LAYOUT)
        image = row.get("image")
        if isinstance(image, str) and len(image) > 512:  # base64 (VLMEvalKit's TSV)
            image = {"bytes": base64.b64decode(image)}
        elif first_key(row, ("image",)) is None and isinstance(row.get("image_path"), str):
            image = row["image_path"]
        pair = str(row[pair_key])
        items.append(_item(f"{pair}:{n}", str(row["question"]), str(row["answer"]), str(row["category"]),
                           row_image(image, image_root, where), pair, where, json_safe(row)))
    return items


def _item(item_id, question, answer, category, image, pair, where, record) -> Item:
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkFileError(f"{where}: the answer is {answer!r}; MME answers are Yes or No")
    return Item(id=item_id, prompt=prompt_of(question), images=[image], answer=label, category=category,
                record={**record, "pair": pair})


def parse_answer(text: str) -> str:
    """yes, no or other, as MME's calculation.py reads an answer."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score(items: list[Item], predictions: list[str]) -> Scores:
    parsed = [parse_answer(p) for p in predictions]
    rows = [{"parsed": p, "correct": p == item.answer} for item, p in zip(items, parsed, strict=True)]
    right = defaultdict(list)  # category -> [correct, ...]
    pairs = defaultdict(lambda: defaultdict(list))  # category -> image -> [correct, correct]
    for item, row in zip(items, rows, strict=True):
        right[item.category].append(row["correct"])
        pairs[item.category][item.record["pair"]].append(row["correct"])
    by_category, counts = {}, {"all": 0}
    for category in sorted(right):
        single = [image for image, answers in pairs[category].items() if len(answers) != 2]
        if single:
            logger.warning("MME %s: %d image(s) without exactly two questions (e.g. %s); acc+ counts them as they "
                           "are", category, len(single), single[0])
        acc = ratio(sum(right[category]), len(right[category]))
        acc_plus = ratio(sum(all(a) for a in pairs[category].values()), len(pairs[category]))
        by_category[category] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}
        counts[category] = len(pairs[category])
        counts["all"] += len(pairs[category])
    unknown = sorted(set(by_category) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        logger.warning("MME: categories %s are neither perception nor cognition; they are left out of both sums",
                       ", ".join(unknown))
    perception = sum(by_category[c]["score"] for c in PERCEPTION if c in by_category)
    cognition = sum(by_category[c]["score"] for c in COGNITION if c in by_category)
    metrics = {"perception": perception, "cognition": cognition, "total": perception + cognition,
               "acc": ratio(sum(r["correct"] for r in rows), len(rows))}
    return Scores(rows, metrics, by_category, counts, unit="images")


BENCHMARK = Benchmark(name="mme", title="MME: acc and acc+ per category; perception and cognition scores",
                      layouts=LAYOUT, read=read, score=score, headline="perception",
                      points=("perception", "cognition", "total", "score"))
