"""Convert the LLaVA JSONL dataset into what trainers read.

- `llava-json`: one JSON array of `{"id", "image", "conversations"}` (LLaVA, xtuner).
- `sharegpt`: LLaMA-Factory's ShareGPT with an `images` list, plus its `dataset_info.json` entry, both
  in one folder, so `--dataset_dir THAT_FOLDER --dataset NAME` works as is. Image paths are written
  relative to that folder, which is where LLaMA-Factory looks (its `media_dir` defaults to it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data_gen.store import read_jsonl

EXPORT_FORMATS = ("llava-json", "sharegpt")
_SUFFIX = {"llava-json": ".llava.json", "sharegpt": ".sharegpt.json"}


def default_export_path(output: Path, fmt: str) -> Path:
    """`OUT.jsonl` -> `OUT.llava.json` or `OUT.sharegpt.json`."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + _SUFFIX[fmt])


def _write_json(path: Path, data: Any) -> None:
    """Write through a temporary file so that a crash never leaves half a JSON file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_dataset(output: Path) -> list[dict[str, Any]]:
    """The records of a caption output file, first occurrence of each id only."""
    seen: set[str] = set()
    records = []
    for record in read_jsonl(output):
        if record.get("id") in seen or "conversations" not in record or "image" not in record:
            continue
        seen.add(record["id"])
        records.append(record)
    return records


def to_llava_json(records: list[dict[str, Any]], dest: Path) -> Path:
    """Write the records as one LLaVA JSON array; `image` stays relative to the image folder."""
    _write_json(dest, [{"id": r["id"], "image": r["image"], "conversations": r["conversations"]} for r in records])
    return dest


def _media_path(image_dir: Path, rel: str, dest_dir: Path) -> str:
    target = (image_dir / rel).resolve()
    try:
        return Path(os.path.relpath(target, dest_dir.resolve())).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return target.as_posix()


def to_sharegpt(records: list[dict[str, Any]], dest: Path, image_dir: Path, dataset_name: str) -> Path:
    """Write LLaMA-Factory ShareGPT (`conversations` + `images`) and register it in dataset_info.json.

    Returns the path of dataset_info.json (an existing one is updated, other entries kept).
    """
    rows = [
        {"id": r["id"], "conversations": r["conversations"], "images": [_media_path(image_dir, r["image"], dest.parent)]}
        for r in records
    ]
    _write_json(dest, rows)
    info_path = dest.parent / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{info_path} exists but is not valid JSON ({exc}); fix or move it, then rerun") from exc
    info[dataset_name] = {
        "file_name": dest.name,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }
    _write_json(info_path, info)
    return info_path


def export(output: Path, fmt: str, image_dir: Path, dest: Path | None = None,
           dataset_name: str | None = None) -> tuple[int, list[Path]]:
    """Export `output` (LLaVA JSONL) to `fmt`; returns the record count and the files written."""
    records = load_dataset(output)
    dest = dest or default_export_path(output, fmt)
    if fmt == "llava-json":
        return len(records), [to_llava_json(records, dest)]
    if fmt == "sharegpt":
        name = dataset_name or default_export_path(output, fmt).name.split(".")[0]
        return len(records), [dest, to_sharegpt(records, dest, image_dir, name)]
    raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
