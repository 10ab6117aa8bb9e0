"""What every benchmark is made of: the items it asks, its definition, its scores, and the file readers they share.

    items = benchmark.read(Path("coco_pope_random.json"), Path("val2014"), limit=0)
    scores = benchmark.score(items, ["Yes", "No", ...])        # one prediction per item, in order
    scores.metrics["f1"], scores.by_category["random"]["f1"], scores.rows[0]["parsed"]

Nothing here loads a model: a benchmark turns local files into questions and answers into numbers. The eval runner
(llava_kit/eval/) asks the questions, through the generation service or an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llava_kit.data.images import ImageLoadError, load_image, resolve_image_path
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import DataError, PathNotFoundError

ImageSource = Path | bytes
"""An image file, or the encoded bytes of one (base64 in a TSV, bytes in a parquet file)."""

LLAVA_SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's suffix for short answers (MME, POPE, VQAv2, GQA, TextVQA)."""
LLAVA_LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's suffix for multiple choice (MMBench, ScienceQA)."""


class BenchmarkFileError(DataError):
    """A benchmark file in a layout its benchmark does not read; the message names the layouts it reads."""


@dataclass
class Item:
    """One question as it is asked: the prompt in the benchmark's format, its images, and what scoring needs."""

    id: str
    prompt: str
    """The question as LLaVA-1.5 asked it (suffix included), without image tags."""
    images: list[ImageSource]
    answer: Any
    """The gold answer as the benchmark's scorer reads it (a letter, yes/no, the reference answers, ...)."""
    category: str = ""
    record: dict = field(default_factory=dict)
    """The source record's fields, kept in the predictions file (image bytes left out)."""

    def messages(self) -> list[dict]:
        """The question as one user message: an `<image>` tag per image, then the prompt (LLaVA's order)."""
        return [{"role": "user", "content": f"{IMAGE_TOKEN}\n" * len(self.images) + self.prompt}]


@dataclass
class Scores:
    """What a benchmark's scorer makes of the predictions."""

    rows: list[dict]
    """Per item, in item order: how its prediction was read and scored (merged into the predictions file)."""
    metrics: dict[str, float]
    """Over the whole set."""
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """How many units (questions, circular groups, images) each category has; "all" for the whole set."""
    unit: str = "questions"


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how its local files are read into items, and how predictions are scored."""

    name: str
    title: str
    """One line: what it is and what it reports."""
    layouts: str
    """The local files it reads (named in errors and in `--help`)."""
    read: Callable[..., list[Item]]
    """(data path, image root or None, limit) -> items; `limit` > 0 keeps the first that many questions."""
    score: Callable[[list[Item], list[str]], Scores]
    headline: str
    """The metric that sums it up: the last line of the summary, compare-projectors' column, training's score."""
    max_new_tokens: int = 16
    points: tuple[str, ...] = ()
    """Metrics in points rather than fractions (MME's scores)."""


# ------------------------------------------------------------------------------------------------ images


def open_image(source: ImageSource) -> Image.Image:
    """An item's image as RGB (the same loading as training: EXIF orientation, every mode to RGB)."""
    return load_image(io.BytesIO(source) if isinstance(source, bytes) else source)


def image_file(name: str, image_root: Path | None, where: str) -> Path:
    """`name` under the image root; a clear error when no root was given or the file is missing."""
    if image_root is None:
        raise BenchmarkFileError(f"{where}: the questions name image files ({name!r}); give --image-root DIR, the "
                                 "folder they are in")
    try:
        return resolve_image_path(str(name), image_root)
    except ImageLoadError as err:
        raise BenchmarkFileError(f"{where}: {err}") from None


def decode_base64_image(text: str, where: str) -> bytes:
    """The bytes of a base64 image (MMBench and VLMEvalKit TSVs)."""
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise BenchmarkFileError(f"{where}: the `image` column is not base64") from None


def row_image(value: Any, image_root: Path | None, where: str) -> ImageSource:
    """The image of a row: bytes (a parquet image {bytes, path}), or a file name under the image root."""
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return image_file(value["path"], image_root, where)
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return image_file(value, image_root, where)
    raise BenchmarkFileError(f"{where}: no image (an `image` file name, or image bytes)")


def json_safe(record: dict) -> dict:
    """The record without image bytes or base64 (what the predictions file keeps of it)."""
    kept = {}
    for key, value in record.items():
        if isinstance(value, bytes) or (isinstance(value, dict) and "bytes" in value):
            continue
        if key == "image" and isinstance(value, str) and len(value) > 512:  # base64
            continue
        kept[key] = value
    return kept


# ------------------------------------------------------------------------------------------------ files


def read_rows(path: Path) -> list[dict]:
    """The records of a table file: .jsonl, .json (an array, or JSON Lines under a .json name, as POPE's files),
    .tsv (MMBench's and VLMEvalKit's) or .parquet (the Hugging Face copies lmms-eval reads; needs pyarrow). A
    folder of .parquet files (a dataset's `data/` folder) is read in name order."""
    if not path.exists():
        raise PathNotFoundError(f"benchmark data {str(path)!r} does not exist")
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise BenchmarkFileError(f"{path} is a folder without .parquet files")
        return [row for part in parts for row in _read_parquet(part)]
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".json", ".jsonl"):
        raise BenchmarkFileError(f"{path}: benchmark files are .jsonl, .json, .tsv or .parquet")
    data = read_json(path)
    if isinstance(data, dict):  # JSON Lines of one line
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise BenchmarkFileError(f"{path}: every record must be a JSON object")
    return data


def read_json(path: Path) -> Any:
    """A JSON file's value; a file of JSON Lines (under either suffix) is a list of its lines' values."""
    if not path.is_file():
        raise PathNotFoundError(f"benchmark data {str(path)!r} does not exist" if not path.exists() else
                                f"{path} is a folder; this benchmark reads a .json or .jsonl file here")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON Lines under a .json name (POPE's coco_pope_*.json)
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BenchmarkFileError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


def _read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes long
    with path.open(encoding="utf-8", newline="") as f:
        rows = [dict(row) for row in csv.DictReader(f, delimiter="\t")]
    # VLMEvalKit's TSVs store each image once: a row whose `image` is short holds the `index` of the row that has it.
    images = {row.get("index"): row.get("image") for row in rows}
    for n, row in enumerate(rows, 2):
        image = row.get("image")
        if isinstance(image, str) and 0 < len(image) <= 64:
            target = images.get(image)
            if not target or len(target) <= 64:
                raise BenchmarkFileError(f"{path.name}:{n}: `image` is {image!r}, neither base64 nor the index of a "
                                         "row with an image")
            row["image"] = target
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkFileError(f"reading {path.name} needs pyarrow: pip install 'llava-kit[eval]' (or pip install "
                                 "pyarrow)") from None
    return pq.read_table(path).to_pylist()


def require_keys(row: dict, keys: tuple[str, ...], where: str, layout: str) -> None:
    """Refuse a row without `keys`, naming the expected layout."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise BenchmarkFileError(f"{where}: no {', '.join(f'`{k}`' for k in missing)}; expected {layout} (this row "
                                 f"has: {', '.join(map(str, row))})")


def first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    """The first of `keys` that `row` has with a value."""
    return next((k for k in keys if row.get(k) not in (None, "")), None)


def pick(row: dict, keys: tuple[str, ...], where: str, layout: str) -> str:
    """The first of `keys` (alternative names of one field) that `row` has with a value; refuses a row with none."""
    key = first_key(row, keys)
    if key is None:
        raise BenchmarkFileError(f"{where}: no {' or '.join(f'`{k}`' for k in keys)}; expected {layout} (this row "
                                 f"has: {', '.join(map(str, row))})")
    return key


# ------------------------------------------------------------------------------------------------ metrics


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0 when the denominator is 0 (precision with no positive prediction)."""
    return numerator / denominator if denominator else 0.0
