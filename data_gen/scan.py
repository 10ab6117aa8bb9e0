"""Find the images under a folder: recursive scan, content hashes, exact duplicates, unreadable files.

The scan reads every file once to hash it and opens it with PIL to check that it is an image (header
only: decoding every pixel twice would double the cost of a large folder). The full decode, with
EXIF orientation applied, happens in `images.load_image` just before upload; a failure there is
reported like a failure here (reason `unreadable`).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class ImageFile:
    """One unique image found by the scan."""

    path: Path
    """Absolute path on disk."""
    rel: str
    """Path relative to the scanned folder, with forward slashes (what the dataset stores)."""
    sha256: str
    """Hex digest of the file's bytes: the identity of the image for dedupe and resume."""
    width: int
    height: int


@dataclass(frozen=True)
class Problem:
    """A file the scan dropped, and why."""

    rel: str
    reason: str
    """`unreadable` or `duplicate`."""
    detail: str
    sha256: str | None = None


@dataclass
class ScanResult:
    """What a scan found: unique images in a stable order, plus the files it dropped."""

    images: list[ImageFile] = field(default_factory=list)
    unreadable: list[Problem] = field(default_factory=list)
    duplicates: list[Problem] = field(default_factory=list)
    files_seen: int = 0


def list_image_files(root: Path) -> list[Path]:
    """Every file under `root` with an image extension (any case), sorted; symlinked folders are not followed."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    # sorted by relative path: a stable order makes runs, logs and the choice among duplicates reproducible
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _inspect(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(sha256, (width, height), error) for one file; error is None when it opened as an image."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, None, f"cannot read file: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
    except Image.DecompressionBombError as exc:
        return digest, None, f"image too large: {exc}"
    except Exception as exc:  # PIL raises many types for broken files; all mean "not an image we can use"
        return digest, None, f"not a readable image: {type(exc).__name__}: {exc}"
    return digest, size, None


def scan_folder(root: Path, *, workers: int = 4, progress: Callable[[int], None] | None = None) -> ScanResult:
    """Scan `root` recursively; the first file (in sorted order) of a set of identical files is kept.

    `progress(n)` is called after each file, for a progress bar.
    """
    root = root.resolve()
    paths = list_image_files(root)
    result = ScanResult(files_seen=len(paths))
    first_by_hash: dict[str, str] = {}
    # Hashing is I/O bound and hashlib releases the GIL: a few threads help on network disks.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, (digest, size, error) in zip(paths, pool.map(_inspect, paths), strict=True):
            rel = path.relative_to(root).as_posix()
            if progress is not None:
                progress(1)
            if digest is not None and digest in first_by_hash:
                result.duplicates.append(Problem(rel, "duplicate", f"same bytes as {first_by_hash[digest]}", digest))
                continue
            if error is not None or size is None:
                result.unreadable.append(Problem(rel, "unreadable", error or "unknown error", digest))
                continue
            first_by_hash[digest] = rel
            result.images.append(ImageFile(path, rel, digest, size[0], size[1]))
    return result

