"""Score a model on held-out questions through the chat code path.

    llava-kit eval --model DIR --data eval.jsonl --image-root images/

Each line of the JSONL is one question: `{"image", "question", ...}` with either the shapes-task
fields (`kind`, `shape`, `color`, `background`; scored by `shapes.score_answer`) or an `answer`
(scored as a case-insensitive match of the whole answer). Prints per-kind accuracy and, last,
`accuracy: X.XX`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from llava_kit.data.images import resolve_image_path
from llava_kit.data.shapes import ShapeSpec, score_answer
from llava_kit.errors import DataError
from llava_kit.serve.chat import ChatSession, GenerationSettings, answer_batch, answer_once

logger = logging.getLogger(__name__)


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def score_record(record: dict, answer: str) -> bool:
    """True when `answer` is right for the record (shapes fields, or an exact `answer`)."""
    if "shape" in record and "color" in record:
        spec = ShapeSpec(shape=record["shape"], color=record["color"], width=0, height=0,
                         background=record.get("background", "white"))
        return score_answer(record.get("kind", "describe"), answer, spec)
    return _normalise(answer) == _normalise(record["answer"])


def read_eval_records(path: str | Path) -> list[dict]:
    records = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "question" not in record or not ({"answer"} <= record.keys() or {"shape", "color"} <= record.keys()):
            raise DataError(f"{path}:{line_no}: an eval record needs `question` and `answer` (or shape/color)")
        records.append(record)
    return records


def evaluate(model, tokenizer, settings, records: list[dict], image_root: str | Path,
             max_new_tokens: int = 32, predictions_path: str | Path | None = None,
             batch_size: int = 32) -> dict[str, float]:
    """Answer every record in a fresh conversation; returns accuracy per kind and overall ("all").

    Questions are answered `batch_size` at a time (greedy; the same answers as one by one).
    """
    session = ChatSession(model, tokenizer, settings, GenerationSettings(max_new_tokens=max_new_tokens))
    right, total = defaultdict(int), defaultdict(int)
    rows, answers = [], []
    progress = tqdm(total=len(records), desc="eval", unit="q", dynamic_ncols=True)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        questions = [(str(resolve_image_path(r["image"], image_root)) if r.get("image") else None, r["question"])
                     for r in chunk]
        answers += answer_batch(session, questions) if batch_size > 1 else [answer_once(session, *questions[0])]
        progress.update(len(chunk))
    progress.close()
    for record, answer in zip(records, answers, strict=True):
        ok = score_record(record, answer)
        kind = record.get("kind", "all")
        for key in {kind, "all"}:
            right[key] += ok
            total[key] += 1
        rows.append({**record, "prediction": answer, "correct": ok})
    if predictions_path:
        Path(predictions_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: right[k] / total[k] for k in total}


def format_report(accuracy: dict[str, float], counts: dict[str, int] | None = None) -> str:
    """Per-kind lines, then `accuracy: X.XX` as the last line."""
    lines = [f"{kind:>10}: {acc:.2f}" + (f"  (n={counts[kind]})" if counts else "")
             for kind, acc in sorted(accuracy.items()) if kind != "all"]
    lines.append(f"accuracy: {accuracy['all']:.2f}")
    return "\n".join(lines)
