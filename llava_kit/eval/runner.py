"""A benchmark run: items -> answers -> scores -> predictions JSONL and a summary table.

    result = score_answers(benchmark, items, answers, predictions_path="pope.jsonl")
    print(format_summary(result))             # per-category table, overall metrics, the headline last

The predictions file has one JSON object per item, in order: the source record's fields (image bytes left out),
`id`, `category`, `prompt` (as asked), `prediction`, how it was read and scored (`parsed`, `correct` or `score`),
and `error` when the item could not be asked or answered (scored as wrong).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava_kit.benchmarks import Benchmark, Item, Scores
from llava_kit.eval.answering import Answer

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What a benchmark run produced."""

    benchmark: Benchmark
    scores: Scores
    rows: list[dict]
    """The predictions file's rows."""
    errors: int
    """Items with no answer (each row's `error` says why); they are scored as wrong."""

    @property
    def headline(self) -> float:
        """The benchmark's headline metric."""
        return self.scores.metrics[self.benchmark.headline]


def score_answers(benchmark: Benchmark, items: list[Item], answers: list[Answer],
                  predictions_path: str | Path | None = None) -> EvalResult:
    """Score the answers (an item without one counts as answered "") and write the predictions file if asked."""
    scores = benchmark.score(items, [answer.text for answer in answers])
    rows = []
    for item, answer, scored in zip(items, answers, scores.rows, strict=True):
        row = {**item.record, "id": item.id, "category": item.category, "prompt": item.prompt,
               "prediction": answer.text, **scored}
        if answer.error is not None:
            row["error"] = answer.error
        rows.append(row)
    errors = sum(answer.error is not None for answer in answers)
    if errors:
        first = next(answer.error for answer in answers if answer.error is not None)
        logger.warning("%s: %d of %d items could not be answered (scored as wrong); the first: %s", benchmark.name,
                       errors, len(items), first)
    if predictions_path:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        Path(predictions_path).write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n"
                                                  for row in rows), encoding="utf-8")
        logger.info("wrote %d predictions to %s", len(rows), predictions_path)
    return EvalResult(benchmark, scores, rows, errors)


def _value(benchmark: Benchmark, metric: str, value: float) -> str:
    return f"{value:.2f}" if metric in benchmark.points else f"{value:.4f}"


def format_summary(result: EvalResult) -> str:
    """The summary table: a header, one row per category (its count and metrics), the overall metrics one per line,
    the headline metric last. The custom benchmark keeps llava-kit's own format (`format_report`)."""
    benchmark, scores = result.benchmark, result.scores
    if benchmark.name == "custom":
        accuracy = {kind: m["accuracy"] for kind, m in scores.by_category.items()}
        return format_report({**accuracy, "all": scores.metrics["accuracy"]})
    lines = [f"{benchmark.name}: {scores.counts.get('all', len(result.rows))} {scores.unit}, {len(result.rows)} "
             f"prompts, {result.errors} without an answer"]
    if scores.by_category:
        names = list(next(iter(scores.by_category.values())))
        width = max(len("category"), *(len(c) for c in scores.by_category))
        columns = {m: max(len(m), 8) for m in names}
        lines.append(f"{'category':<{width}} {'n':>6}  " + "  ".join(f"{m:>{w}}" for m, w in columns.items()))
        for category, metrics in scores.by_category.items():
            lines.append(f"{category:<{width}} {scores.counts.get(category, 0):>6}  "
                         + "  ".join(f"{_value(benchmark, m, metrics[m]):>{w}}" for m, w in columns.items()))
    overall = [m for m in scores.metrics if m != benchmark.headline] + [benchmark.headline]
    lines += [f"{m}: {_value(benchmark, m, scores.metrics[m])}" for m in overall]
    return "\n".join(lines)


def format_report(accuracy: dict[str, float], counts: dict[str, int] | None = None) -> str:
    """Per-kind lines, then `accuracy: X.XX` as the last line (the custom benchmark's summary)."""
    lines = [f"{kind:>10}: {acc:.2f}" + (f"  (n={counts[kind]})" if counts else "")
             for kind, acc in sorted(accuracy.items()) if kind != "all"]
    lines.append(f"accuracy: {accuracy['all']:.2f}")
    return "\n".join(lines)
