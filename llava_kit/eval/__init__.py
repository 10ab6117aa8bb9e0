"""Score a model on a benchmark: its local files -> LLaVA-1.5's prompts -> answers -> the benchmark's metrics.

    llava-kit eval --model DIR --benchmark pope --data coco_pope_random.json --image-root val2014
    llava-kit eval --base-url http://127.0.0.1:8000/v1 --benchmark mmbench --data MMBench_DEV_EN.tsv
    llava-kit eval --model DIR --data eval.jsonl --image-root images/          # the custom JSONL (the default)

    result = run_benchmark("pope", "coco_pope_random.json", "val2014", service=service)
    result.scores.metrics["f1"], result.headline

- `llava_kit/benchmarks/`  what each benchmark reads, asks and scores (no model)
- `answering.py`           the questions asked through the generation service (batched) or an OpenAI-compatible
                           endpoint (a bounded pool of requests), errors per item
- `runner.py`              scores, the predictions JSONL, the summary table

`evaluate()` is the custom benchmark on records already read (the demo, compare-projectors): accuracy per kind.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llava_kit.benchmarks import custom, get_benchmark
from llava_kit.eval.answering import Answer, answer_with_endpoint, answer_with_service, endpoint_model
from llava_kit.eval.runner import EvalResult, format_report, format_summary, score_answers
from llava_kit.inference.sampling import SamplingParams
from llava_kit.inference.service import GenerationService

logger = logging.getLogger(__name__)

read_eval_records = custom.read_records


def run_benchmark(name: str, data: str | Path, image_root: str | Path | None = None, *,
                  service: GenerationService | None = None, base_url: str | None = None,
                  model_name: str | None = None, api_key: str | None = None, limit: int = 0,
                  max_new_tokens: int | None = None, batch_size: int = 32, concurrency: int = 8,
                  predictions_path: str | Path | None = None, scorer: str = "auto",
                  progress: bool = True) -> EvalResult:
    """Run benchmark `name` on its local files, answered by `service` or by the endpoint at `base_url`.

    `limit` > 0 keeps the first that many questions (MMBench: circular groups; MME: images). Answers are greedy,
    at most `max_new_tokens` long (default: the benchmark's).
    """
    benchmark = get_benchmark(name)
    options = {"scorer": scorer} if name == "custom" else {}
    items = benchmark.read(Path(data), Path(image_root) if image_root else None, limit, **options)
    params = SamplingParams(max_new_tokens=max_new_tokens or benchmark.max_new_tokens)
    logger.info("%s: %d prompts from %s, answered by %s", name, len(items), data, base_url or "the model")
    if base_url is not None:
        api_key = api_key or "EMPTY"  # the client needs one; a server without a key ignores it
        model_name = model_name or endpoint_model(base_url, api_key)
        answers = answer_with_endpoint(base_url, model_name, api_key, items, params, concurrency, progress)
    else:
        answers = answer_with_service(service, items, params, batch_size, progress)
    return score_answers(benchmark, items, answers, predictions_path)


def evaluate(service: GenerationService, records: list[dict], image_root: str | Path, max_new_tokens: int = 32,
             predictions_path: str | Path | None = None, batch_size: int = 32,
             scorer: str = "auto") -> dict[str, float]:
    """Answer every record (the custom JSONL's) in a fresh conversation; returns accuracy per kind and overall
    ("all"). Questions are answered `batch_size` at a time (greedy; the same answers as one by one)."""
    items = custom.items_of(records, image_root, scorer)
    logger.info("eval: %d questions, scorer %s", len(records), items[0].answer["scorer"] if items else scorer)
    answers = answer_with_service(service, items, SamplingParams(max_new_tokens=max_new_tokens), batch_size)
    result = score_answers(custom.BENCHMARK, items, answers, predictions_path)
    return {**{kind: m["accuracy"] for kind, m in result.scores.by_category.items()},
            "all": result.scores.metrics["accuracy"]}


__all__ = ["Answer", "EvalResult", "answer_with_endpoint", "answer_with_service", "evaluate", "format_report",
           "format_summary", "read_eval_records", "run_benchmark", "score_answers"]
