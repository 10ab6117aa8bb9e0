"""Text-only data for `text-pt` (incremental pretraining): documents -> token blocks, loss on every token.

Formats: `.txt` (documents separated by blank lines) and JSONL with a `text` field. Each document
becomes `<bos> text <eos>`; the EOS is supervised, so the model learns where a passage ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_kit.data.formats import BadRecord


def read_text_documents(paths: str | list[str]) -> tuple[list[tuple[str, str]], list[BadRecord]]:
    """Return ([(source, text)], bad records) from .txt / .jsonl files (other files raise ValueError)."""
    documents, bad = [], []
    for p in [paths] if isinstance(paths, str) else paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist")
        if path.suffix == ".txt":
            for i, block in enumerate(path.read_text(encoding="utf-8").split("\n\n")):
                if block.strip():
                    documents.append((f"{path.name}#{i + 1}", block.strip()))
            continue
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: text-pt reads .txt (documents separated by blank lines) or .jsonl "
                             "with a `text` field")
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            source = f"{path.name}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(BadRecord(source, None, f"broken JSON line: {err.msg}"))
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                bad.append(BadRecord(source, None, "missing or empty `text`"))
                continue
            documents.append((source, text))
    return documents, bad


def encode_document(text: str, tokenizer, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """`<bos> text <eos>` token ids, labels (all supervised), and whether it was truncated."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + ids + [tokenizer.eos_token_id]
    truncated = len(ids) > max_seq_len
    ids = ids[:max_seq_len]
    return ids, list(ids), truncated
