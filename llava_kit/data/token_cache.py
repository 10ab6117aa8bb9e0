"""A cache of tokenised examples, so that a second run on the same data starts without re-tokenising.

    cache = TokenCache()                          # $LLAVA_KIT_HOME/cache/tokens
    key = cache_key(files=[file_fingerprint(p)], tokenizer=tokenizer_fingerprint(tok), template="chatml", ...)
    encoded, hit = cache.get_or_build(key, lambda: Encoded(input_ids, labels, meta))

The key is a hash of everything the tokens depend on: the data files' contents (not their names or
times), the tokenizer (vocabulary, merges, special tokens, chat template), and whatever the caller adds
(template, system prompt, max_seq_len, format, stage). Nothing else is trusted, so a changed file or
tokenizer simply misses. Any per-example data that is not tokens (image paths, report counts) travels
in `meta` as JSON, which is how the multimodal dataset could use the same cache.

Entries are one `.npz` file each (flat int arrays + offsets, loaded without pickle). When several
processes start together (torchrun), the first takes a file lock and builds; the others wait for the
lock and then read what it wrote. Writes go to a temporary file and are renamed into place, so a
reader never sees half an entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 3: readers with tool calls, over-long policy, reason kinds. Bump when the stored layout or the encoding code changes meaning


@dataclass
class EncodedExamples:
    input_ids: list[list[int]]
    labels: list[list[int]]
    meta: dict = field(default_factory=dict)
    """JSON-serialisable extras (bad records, truncation counts, per-example fields)."""


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its full serialisation, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             str(getattr(tokenizer, "chat_template", None)), str(len(tokenizer))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(**parts) -> str:
    """A short stable hash of keyword parts (any JSON-serialisable values)."""
    text = json.dumps({"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_KIT_HOME", Path.home() / ".cache" / "llava-kit")) / "cache" / "tokens"


def _flatten(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))  # ids and -100 fit
    return flat, offsets


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    values = flat.tolist()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


class TokenCache:
    """Tokenised examples on disk, keyed by `cache_key`; safe when several processes start at once."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str) -> EncodedExamples | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                offsets = data["offsets"]
                return EncodedExamples(_unflatten(data["input_ids"], offsets), _unflatten(data["labels"], offsets),
                                       json.loads(str(data["meta"])))
        except (OSError, ValueError, KeyError) as err:  # a damaged entry is rebuilt, not trusted
            logger.warning("token cache: ignoring unreadable entry %s (%s)", path, err)
            return None

    def save(self, key: str, encoded: EncodedExamples) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ids, offsets = _flatten(encoded.input_ids)
        labels, _ = _flatten(encoded.labels)
        tmp = self.root / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, input_ids=ids, labels=labels, offsets=offsets, meta=np.array(json.dumps(encoded.meta)))
        os.replace(tmp, self.path(key))  # atomic: readers see the old state or the whole entry

    def get_or_build(self, key: str, build: Callable[[], EncodedExamples]) -> tuple[EncodedExamples, bool]:
        """The cached entry for `key`, or `build()` saved under it; returns (examples, whether it was a hit)."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then find its entry
            try:
                cached = self.load(key)
                if cached is not None:
                    return cached, True
                encoded = build()
                self.save(key, encoded)
                return encoded, False
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
