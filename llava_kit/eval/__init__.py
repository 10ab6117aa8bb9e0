"""Score a model on held-out questions through the generation service.

    llava-kit eval --model DIR --data eval.jsonl --image-root images/ [--scorer auto|exact|shapes]

Each line of the JSONL is one question: `{"image" (optional), "question", ...}` plus what its scorer needs
(llava_kit/scoring.py). Prints per-kind accuracy and, last, `accuracy: X.XX`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from llava_kit.data.images import load_image, resolve_image_path
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import DataError, PathNotFoundError
from llava_kit.inference.sampling import SamplingParams
from llava_kit.inference.service import GenerationRequest, GenerationService
from llava_kit.scoring import choose_scorer

logger = logging.getLogger(__name__)

def read_eval_records(path: str | Path) -> list[dict]:
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


def evaluate(service: GenerationService, records: list[dict], image_root: str | Path, max_new_tokens: int = 32,
             predictions_path: str | Path | None = None, batch_size: int = 32,
             scorer: str = "auto") -> dict[str, float]:
    """Answer every record in a fresh conversation; returns accuracy per kind and overall ("all").

    Questions are answered `batch_size` at a time (greedy; the same answers as one by one).
    """
    scorer_name, score = choose_scorer(records, scorer)
    logger.info("eval: %d questions, scorer %s", len(records), scorer_name)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    answers: list[str] = []
    progress = tqdm(total=len(records), desc="eval", unit="q", dynamic_ncols=True)
    for start in range(0, len(records), batch_size):
        requests = [GenerationRequest(_prompt(service, record, image_root), params)
                    for record in records[start:start + batch_size]]
        answers += [completion.text for completion in service.generate(requests)]
        progress.update(len(requests))
    progress.close()
    right, total, rows = defaultdict(int), defaultdict(int), []
    for record, answer in zip(records, answers, strict=True):
        ok = score(record, answer)
        for key in {record.get("kind", "all"), "all"}:
            right[key] += ok
            total[key] += 1
        rows.append({**record, "prediction": answer, "correct": ok})
    if predictions_path:
        Path(predictions_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: right[k] / total[k] for k in total}


def _prompt(service: GenerationService, record: dict, image_root: str | Path):
    """One question in a fresh conversation, its image first (as `llava-kit chat --image` asks it)."""
    if not record.get("image"):
        return service.prepare([{"role": "user", "content": record["question"]}])
    image = load_image(resolve_image_path(record["image"], image_root))
    return service.prepare([{"role": "user", "content": f"{IMAGE_TOKEN}\n{record['question']}"}], [image])


def format_report(accuracy: dict[str, float], counts: dict[str, int] | None = None) -> str:
    """Per-kind lines, then `accuracy: X.XX` as the last line."""
    lines = [f"{kind:>10}: {acc:.2f}" + (f"  (n={counts[kind]})" if counts else "")
             for kind, acc in sorted(accuracy.items()) if kind != "all"]
    lines.append(f"accuracy: {accuracy['all']:.2f}")
    return "\n".join(lines)
