"""LLaMA-Factory's `dataset_info.json`: one named entry -> the files to read, their format and column mapping.

    data.path: data/dataset_info.json#mllm_demo        (or data#mllm_demo: the folder holding dataset_info.json)

An entry is `{"file_name", "formatting": "alpaca" | "sharegpt", "columns": {...}, "tags": {...}}`; its columns
(prompt, query, response, history, messages, system, tools, images, videos, audios) and tags (role_tag,
content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag) rename what the readers look for,
with LLaMA-Factory's defaults. Entries that load from a hub, preference (`ranking`, chosen/rejected) and KTO
entries are refused with the reason. Image paths are relative to data.image_root (LLaMA-Factory's media_dir,
by default the folder itself).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llava_kit.data.readers.chat import Tags
from llava_kit.errors import DataError, PathNotFoundError

logger = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class DataSource:
    """What to read for one `data.path` entry: files, the format they are in, and any column mapping."""

    files: list[Path]
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    tags: Tags | None = None
    name: str = ""


def split_entry(path: str) -> tuple[Path, str] | None:
    """(dataset_info.json, entry name) of `DIR/dataset_info.json#NAME` or `DIR#NAME`; None for a plain path."""
    location, sep, entry = path.partition("#")
    if not sep:
        return None
    info = Path(location)
    return (info if info.name == INFO_FILE or info.is_file() else info / INFO_FILE), entry


def entries_hint(info: Path) -> str:
    """`DIR/dataset_info.json#NAME (entries with local files: a, b, ...)` for messages."""
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        entries = {}
    local = [name for name, e in entries.items() if isinstance(e, dict) and "file_name" in e
             and not any(k in e for k in HUB_KEYS)]
    listed = ", ".join(local[:12]) + (", ..." if len(local) > 12 else "")
    return f"name an entry: {info}#NAME (entries with local files: {listed or 'none'})"


def data_source(path: str, fmt: str = "auto", preference: bool = False) -> DataSource:
    """The files and format of one data path: a data file, or a LLaMA-Factory entry `.../dataset_info.json#NAME`.

    `preference` (stages dpo, text-dpo): entries with `ranking: true` are read as `pairwise`, others refused."""
    entry = split_entry(path)
    if entry is None:
        p = Path(path)
        if p.is_dir() and (p / INFO_FILE).is_file() or p.name == INFO_FILE:
            raise DataError(f"{path} is a LLaMA-Factory dataset folder; {entries_hint(p if p.is_file() else p / INFO_FILE)}")
        if not p.is_file():
            raise PathNotFoundError(f"data file {path!r} does not exist")
        return DataSource([p], fmt, name=p.name)
    info, name = entry
    if not info.is_file():
        raise PathNotFoundError(f"{info} does not exist; a LLaMA-Factory entry is DIR/{INFO_FILE}#NAME")
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{info} is not valid JSON ({err})") from None
    if not isinstance(entries, dict) or not isinstance(entries.get(name), dict):
        raise DataError(f"{info} has no entry {name!r}; {entries_hint(info)}")
    return _entry_source(entries[name], info, name, fmt, preference)


def _entry_source(entry: dict, info: Path, name: str, fmt: str, preference: bool = False) -> DataSource:
    label = f"{info.name}#{name}"
    hub = next((k for k in HUB_KEYS if entry.get(k)), None)
    if hub:
        raise DataError(f"{label} loads from {hub} ({entry[hub]}); llava-kit reads an entry's local `file_name`: "
                        "download the data next to dataset_info.json and give the entry a file_name (text stages can "
                        "also name a hub dataset directly in data.path)")
    columns = entry.get("columns") or {}
    ranked = bool(entry.get("ranking") or "chosen" in columns or "rejected" in columns)
    if preference and not ranked:
        raise DataError(f"{label} is not preference data (no `ranking: true`, no chosen/rejected columns); the "
                        "preference stages train on pairs of answers: name a ranking entry, or train this one with "
                        "stage sft (text-sft)")
    if ranked and not preference:
        raise DataError(f"{label} is preference data (chosen/rejected answers); the sft stages train on one answer "
                        "per conversation, so it is not read")
    if "kto_tag" in columns:
        raise DataError(f"{label} is KTO data (answers tagged desirable or not); training on it as sft would teach "
                        "the undesirable answers too, so it is not read")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{label} has formatting {formatting!r}; LLaMA-Factory entries are alpaca or sharegpt")
    if preference and fmt not in ("auto", "pairwise"):
        raise DataError(f"{label} is LLaMA-Factory pairwise data (`ranking: true`); leave data.format at auto for it")
    if not preference and fmt not in ("auto", formatting):
        raise DataError(f"{label} is {formatting} data (its `formatting`); leave data.format at auto for it")
    if not isinstance(entry.get("file_name"), str):
        raise DataError(f"{label} has no `file_name`")
    target = info.parent / entry["file_name"]
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix in (".json", ".jsonl", ".txt"))
    elif target.is_file():
        files = [target]
    else:
        raise PathNotFoundError(f"{label}: file_name {entry['file_name']!r} does not exist in {info.parent}")
    if entry.get("num_samples"):
        logger.warning("%s asks for num_samples %s; llava-kit reads every record (use data.datasets weights to "
                       "take a part)", label, entry["num_samples"])
    tags = None
    if formatting == "sharegpt":
        t = {**DEFAULT_TAGS, **(entry.get("tags") or {})}
        roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["observation_tag"]: "tool",
                 t["function_tag"]: "call", t["system_tag"]: "system"}
        tags = Tags(t["role_tag"], t["content_tag"], roles)
        columns = {"messages": "conversations", **columns}
    if preference:  # the pairwise reader takes both forms; the alpaca form keys on `prompt`
        columns = {"prompt": "instruction", **columns} if formatting == "alpaca" else columns
        return DataSource(files, "pairwise", columns, tags, label)
    return DataSource(files, formatting, columns, tags, label)


def write_entry(info: Path, name: str, file_name: str, fmt: str, has: dict[str, bool]) -> None:
    """Add (or replace) entry `name` in `info` describing `file_name`, written by `llava-kit data convert` as `fmt`
    (sharegpt); `has` says which optional columns (system, tools, images) the file uses."""
    entries = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    columns = {"messages": "conversations", **{k: k for k in ("system", "tools", "images") if has.get(k)}}
    entries[name] = {"file_name": file_name, "formatting": fmt, "columns": columns}
    info.write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
