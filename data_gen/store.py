"""Append-only JSONL files that make a run resumable and crash-safe.

Each record is written with one `os.write` on a file opened with O_APPEND: the kernel has the whole
line as soon as the call returns, so `kill -9` loses only requests in flight. A line cut by a full
disk or a power loss can only be the last one; `OutputStore` cuts it off when it opens the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("data_gen")


class CorruptOutputError(ValueError):
    """An output file with a damaged line that is not the last one (not something a crash produces)."""


def errors_path(output: Path) -> Path:
    """`OUT.jsonl` -> `OUT.errors.jsonl`."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.errors.jsonl")


def _append_line(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:  # a regular file takes it in one call; the loop only guards the exotic cases
        written = os.write(fd, view)
        view = view[written:]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file; a trailing partial line is ignored (see module docstring)."""
    records = []
    if not path.exists():
        return records
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # the last line, with no newline after it: a cut write
                break
            raise CorruptOutputError(
                f"{path}:{number} is not valid JSON ({exc}). This is not what an interrupted run leaves; "
                f"fix or delete that line, then rerun."
            ) from exc
        if not isinstance(record, dict):
            raise CorruptOutputError(f"{path}:{number} is not a JSON object; fix or delete that line, then rerun.")
        records.append(record)
    return records


class OutputStore:
    """The dataset file: which ids are done, and appending new records exactly once."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly  # a dry run must not touch the files
        if not readonly:
            self._repair_tail()
        self.done: set[str] = {str(r["id"]) for r in read_jsonl(path) if "id" in r}
        self._fd: int | None = None

    def _repair_tail(self) -> None:
        """Cut a partial last line (no newline at the end) so that new lines start on their own line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            log.warning("%s: removing a partial last line (%d bytes) left by an interrupted write",
                        self.path, len(data) - keep)
            f.truncate(keep)

    def append(self, record: dict[str, Any]) -> bool:
        """Write one record unless its id is already done; True when written."""
        record_id = str(record["id"])
        if record_id in self.done:
            return False
        if self.readonly:
            raise RuntimeError("OutputStore opened read-only")
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _append_line(self._fd, record)
        self.done.add(record_id)
        return True

    def close(self) -> None:
        """Flush to disk and close."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


class ErrorLog:
    """`OUT.errors.jsonl`: the failures of the latest run (it starts empty each run, as failures are retried)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # What failed last time is retried now: read it for the log, then start over.
        try:
            self.previous = read_jsonl(path)
        except CorruptOutputError as exc:  # only a report: not worth stopping the run for
            log.warning("ignoring the previous errors file: %s", exc)
            self.previous = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.written: set[str] = set()

    def write(self, record: dict[str, Any]) -> None:
        """Append one failure: at least `image` (relative path) and `reason`."""
        key = f"{record.get('id') or record['image']}"
        if key in self.written:
            return
        self.written.add(key)
        _append_line(self._fd, record)

    def close(self) -> None:
        """Flush to disk and close."""
        os.fsync(self._fd)
        os.close(self._fd)
