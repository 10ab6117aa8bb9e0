"""Records of a data file: a JSON array (`.json`) or one JSON value per line (`.jsonl`), each with its source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llava_kit.errors import DataError

RecordLine = tuple[str, object, str | None]
"""(source `file:line` or `file[index]`, the record or None, the error when the line is not JSON)."""


def iter_file_records(path: Path) -> Iterator[RecordLine]:
    """Yield (source, record or None, error) for a .jsonl file (one record per line) or a .json array."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path.name}:{line_no}", json.loads(line), None
                except json.JSONDecodeError as err:
                    yield f"{path.name}:{line_no}", None, f"broken JSON line: {err.msg}"
        return
    if path.suffix != ".json":
        raise DataError(f"{path}: data files are .json (an array of records) or .jsonl (one record per line)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); give a JSON array of records, or a .jsonl file "
                        "with one record per line") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) and ("file_name" in v or "hf_hub_url" in v)
                                               for v in data.values()):
        from llava_kit.data.readers.dataset_info import entries_hint

        raise DataError(f"{path} is a LLaMA-Factory dataset_info.json; {entries_hint(path)}")
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected an array of records")
    for index, record in enumerate(data):
        yield f"{path.name}[{index}]", record, None
