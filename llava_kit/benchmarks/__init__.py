"""Benchmarks in their standard local formats: name -> reader + LLaVA-1.5's prompts + scorer (one module each).

    benchmark = get_benchmark("pope")
    items = benchmark.read(Path("coco_pope_random.json"), Path("coco/val2014"))
    scores = benchmark.score(items, predictions)              # predictions: one answer per item, in order

| name          | module        | reports (headline first)                                         |
|---------------|---------------|------------------------------------------------------------------|
| custom        | custom.py     | accuracy per kind (llava-kit's eval JSONL, llava_kit/scoring.py) |
| mmbench       | mmbench.py    | circular_accuracy, accuracy, per category                        |
| mmbench-cn    | mmbench.py    | the same, with the Chinese prompt                                |
| mme           | mme.py        | perception, cognition, total; acc, acc_plus, score per category  |
| pope          | pope.py       | f1, accuracy, precision, recall, yes_ratio, per category         |
| scienceqa-img | scienceqa.py  | accuracy, per subject                                            |
| vqa           | vqa.py        | accuracy (VQAv2 / TextVQA / GQA), per answer type                |

Each module's docstring names the files it reads (the layouts of LLaVA's eval scripts, lmms-eval's parquet copies,
VLMEvalKit's TSVs), its prompt and how answers are read. Nothing here loads a model (llava_kit/eval/ asks the
questions). The names are also written out in llava_kit/config.py (BENCHMARK_NAMES), so configs and the CLI check
them without importing this package.
"""

from __future__ import annotations

from llava_kit.benchmarks import custom, mmbench, mme, pope, scienceqa, vqa
from llava_kit.benchmarks.base import Benchmark, BenchmarkFileError, Item, Scores, open_image
from llava_kit.errors import UsageError

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (custom.BENCHMARK, mmbench.BENCHMARK, mmbench.BENCHMARK_CN,
                                                         mme.BENCHMARK, pope.BENCHMARK, scienceqa.BENCHMARK,
                                                         vqa.BENCHMARK)}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as `name` (exact)."""
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkFileError", "Item", "Scores", "get_benchmark", "open_image"]
