"""Training data in the studio: uploads (a JSONL, JSON or text file, or a zip of one with its images), checked by the
data readers when they arrive, and the look at a data file the Train page shows.

    record = add_upload(store, Path("studio/files"), stream, "shapes.jsonl", "fine-tune", max_bytes=512 * 2**20)
    summary = inspect_data("data/train.jsonl", image_root="data/images")   # kind, formats, bad records, a preview

An upload is checked as `llava-kit data check FILE --image-root FOLDER` checks it (the same readers, every image
decoded whole; `data:` URLs inside the records are images too), and refused at once, naming the records and their
reasons, when any record cannot be trained on. A zip is extracted safely into the upload's folder: no member may leave
it (absolute paths, `..`, links), the extracted bytes and the number of members are capped (a small zip may claim to
hold terabytes), and it must hold exactly one data file, whose image paths are relative to its own folder.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from llava_kit.config import PREFERENCE_FORMATS
from llava_kit.errors import LlavaKitError, UsageError
from llava_kit.studio.store import FileRecord, Store

logger = logging.getLogger(__name__)

PURPOSES = ("fine-tune",)
DATA_SUFFIXES = (".jsonl", ".json", ".txt")
UPLOAD_SUFFIXES = (*DATA_SUFFIXES, ".zip")
ZIP_EXPANSION = 10
"""A zip may extract to at most this many times the upload limit."""
MAX_ZIP_MEMBERS = 200_000
PREVIEW_RECORDS = 3
LISTED_PROBLEMS = 5
CHUNK = 1 << 20


class UploadError(UsageError):
    """An upload refused, with the reason (the API answers 400 in OpenAI's shape; `param` names the field)."""

    def __init__(self, message: str, param: str | None = "file", status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class DataSummary:
    """What a data file holds, as the readers see it."""

    kind: str
    """`conversations` (the sft stages read them), `preference` (chosen/rejected pairs: dpo, text-dpo) or `text`
    (text-pt)."""
    total: int
    records: int
    """Records that can be trained on."""
    formats: dict[str, int] = field(default_factory=dict)
    """Records read per format (llava, sharegpt, openai, ...), summed over the files."""
    with_images: int = 0
    """Records with images (only multimodal stages train on them)."""
    problems: list[str] = field(default_factory=list)
    """`source: reason` of each record that cannot be trained on."""
    preview: list[dict] = field(default_factory=list)
    """The first few records as canonical samples ({source, images, messages}), pairs ({source, images, messages: the
    prompt, chosen, rejected: the answers' texts}) or texts ({source, text})."""

    def to_dict(self) -> dict:
        """A JSON-ready dict (stored with an upload; the preview is left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("preview", "problems")}

    def describe(self) -> str:
        """One paragraph: records, formats, images, problems (the Train page's data check line)."""
        formats = ", ".join(f"{name} {count}" for name, count in self.formats.items()) or "none"
        text = (f"{self.records} of {self.total} records can be trained on ({self.kind}; formats: {formats}; "
                f"{self.with_images} with images)")
        if self.problems:
            text += f"; {len(self.problems)} cannot: " + "; ".join(self.problems[:LISTED_PROBLEMS])
            if len(self.problems) > LISTED_PROBLEMS:
                text += f"; ... (`llava-kit data check` lists all {len(self.problems)})"
        return text


# ---------------------------------------------------------------------------------------------- inspecting

def inspect_data(path: str | Path, image_root: str | Path | None = None, fmt: str = "auto") -> DataSummary:
    """Read a data file (any format the readers take, or raw text) as `llava-kit data check` does: every record,
    every image decoded; returns the summary with a preview of the first records. DataError/UsageError when the file
    cannot be read at all."""
    from llava_kit.config import DataConfig
    from llava_kit.data.check import check_records, check_text_records
    from llava_kit.data.readers import iter_file_records, read_data

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {str(path)!r} does not exist")
    if fmt == "text" or (fmt == "auto" and _looks_like_text(path)):
        report = check_text_records([str(path)], DataConfig(format="auto"), "text-pt")
        preview = [{"source": source, "text": str(record.get("text", "") if isinstance(record, dict) else record)[:500]}
                   for source, record, error in _first_records(path, iter_file_records) if not error]
        return DataSummary("text", report.total, report.kept, {"text": report.kept}, 0,
                           [f"{b.source}: {b.reason}" for b in report.skipped], preview)
    root = str(image_root if image_root is not None else path.parent)
    if fmt in PREFERENCE_FORMATS or (fmt == "auto" and _looks_like_pairs(path)):
        return _inspect_pairs(path, root, fmt)
    report = check_records([str(path)], fmt, None, root)
    samples = read_data([str(path)], fmt).samples
    formats = _summed_formats(report.formats)
    preview = [{"source": s.source, "images": [_short(i) for i in s.images],
                "messages": [{"role": m["role"], "content": m["content"]} for m in s.messages]}
               for s in samples[:PREVIEW_RECORDS]]
    return DataSummary("conversations", report.total, report.kept, formats, sum(bool(s.images) for s in samples),
                       [f"{b.source}: {b.reason}" for b in report.skipped], preview)


def _inspect_pairs(path: Path, image_root: str, fmt: str) -> DataSummary:
    """A preference file (stages dpo, text-dpo) checked as `llava-kit data check --stage dpo` checks it."""
    from llava_kit.data.check import check_pairs
    from llava_kit.data.readers.preference import read_pairs

    report = check_pairs([str(path)], fmt, "dpo", image_root)
    pairs = read_pairs([str(path)], fmt, "dpo").pairs
    formats = _summed_formats(report.formats)
    preview = [{"source": p.source, "images": [_short(i) for i in p.images],
                "messages": [{"role": m["role"], "content": m["content"]} for m in p.prompt],
                "chosen": p.chosen["content"], "rejected": p.rejected["content"]}
               for p in pairs[:PREVIEW_RECORDS]]
    return DataSummary("preference", report.total, report.kept, formats, sum(bool(p.images) for p in pairs),
                       [f"{b.source}: {b.reason}" for b in report.skipped], preview)


def _summed_formats(per_file: dict[str, dict[str, int]]) -> dict[str, int]:
    """Records read per format, summed over the files (a report counts them per file)."""
    formats: Counter = Counter()
    for counts in per_file.values():
        formats.update(counts)
    return dict(formats)


def _looks_like_pairs(path: Path) -> bool:
    """JSON records whose first one has a preference format's shape (chosen/rejected answers)."""
    if path.suffix == ".txt":
        return False
    from llava_kit.data.readers import iter_file_records
    from llava_kit.data.readers.preference import is_pair_record

    return any(not error and is_pair_record(record) for _, record, error in _first_records(path, iter_file_records, 1))


def _looks_like_text(path: Path) -> bool:
    """A .txt file, or JSON records with `text` and none of the conversation formats' keys (text-pt data)."""
    if path.suffix == ".txt":
        return True
    from llava_kit.data.readers import detect_format, iter_file_records
    from llava_kit.errors import RecordError

    for _, record, error in _first_records(path, iter_file_records, 1):
        if error or not isinstance(record, dict) or "text" not in record:
            return False
        try:
            detect_format(record)
        except RecordError:
            return True
    return False


def _first_records(path: Path, iter_file_records, count: int = PREVIEW_RECORDS) -> list:
    if path.suffix == ".txt":
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        return [(f"{path.name}:{i + 1}", line, None) for i, line in enumerate(lines[:count])]
    records = []
    for item in iter_file_records(path):
        records.append(item)
        if len(records) == count:
            break
    return records


def _short(image: str) -> str:
    return image[:40] + "..." if image.startswith("data:") else image


# ---------------------------------------------------------------------------------------------- uploads

def add_upload(store: Store, files_dir: Path, stream: BinaryIO, filename: str, purpose: str,
               max_bytes: int) -> FileRecord:
    """Store an upload under FILES_DIR/ID/, check it, and record it; UploadError (nothing kept) when it is refused."""
    if purpose not in PURPOSES:
        raise UploadError(f"purpose {purpose!r} is not supported; this server takes training data: purpose "
                          f"{' or '.join(map(repr, PURPOSES))}", param="purpose")
    name = safe_filename(filename)
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise UploadError(f"{filename!r}: upload a {', '.join(DATA_SUFFIXES)} data file (any format llava-kit reads: "
                          "LLaVA, ShareGPT, OpenAI messages, Alpaca, MOSS, or raw text), or a .zip of one with its "
                          "images")
    file_id = Store.new_id("file")
    folder = files_dir / file_id
    folder.mkdir(parents=True)
    try:
        upload = folder / name
        size = save_stream(stream, upload, max_bytes)
        if size == 0:
            raise UploadError(f"{filename!r} is empty")
        data_file = extract_zip(upload, folder / "data", max_bytes * ZIP_EXPANSION) if name.endswith(".zip") \
            else upload
        try:
            summary = inspect_data(data_file, data_file.parent)
        except LlavaKitError as err:
            raise UploadError(f"{filename!r} cannot be read: {err}") from None
        if summary.total == 0:
            raise UploadError(f"{filename!r} holds no records")
        if summary.problems:
            raise UploadError(f"{filename!r}: {len(summary.problems)} of {summary.total} records cannot be trained on: "
                              + "; ".join(summary.problems[:LISTED_PROBLEMS])
                              + ("; ..." if len(summary.problems) > LISTED_PROBLEMS else "")
                              + " (`llava-kit data check FILE` lists every one); fix them and upload again")
        record = FileRecord(id=file_id, filename=filename, purpose=purpose, bytes=size, path=str(data_file),
                            image_root=str(data_file.parent), summary=summary.to_dict())
        logger.info("studio: upload %s (%s) accepted as %s: %s", filename, file_id, summary.kind, summary.describe())
        return store.add_file(record)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def safe_filename(filename: str) -> str:
    """The name an upload is stored under: its last path component, with only letters, digits, `.`, `-`, `_`."""
    name = re.sub(r"[^\w.-]", "_", PurePosixPath(str(filename).replace("\\", "/")).name).lstrip(".")
    return name or "upload"


def save_stream(stream: BinaryIO, path: Path, max_bytes: int) -> int:
    """Copy `stream` to `path`; UploadError (413) past `max_bytes`. Returns the bytes written."""
    written = 0
    with path.open("wb") as out:
        while chunk := stream.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise UploadError(f"the file is over this server's upload limit of {max_bytes // 2**20} MB "
                                  "(--max-upload-mb)", status=413)
            out.write(chunk)
    return written


def extract_zip(zip_path: Path, folder: Path, max_bytes: int) -> Path:
    """Extract `zip_path` into `folder` safely and return its one data file; UploadError when the archive is
    damaged, a member would leave the folder or is a link, it expands past `max_bytes`, or it does not hold exactly
    one data file."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UploadError(f"not a readable zip archive ({err})") from None
    data_files = []
    written = 0
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise UploadError(f"the zip holds {len(members)} members, over the limit of {MAX_ZIP_MEMBERS}")
        for member in members:
            relative = _member_path(member)
            if relative is None:
                continue
            target = folder.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(member) as source, target.open("wb") as out:
                    while chunk := source.read(CHUNK):  # counted as written: a member's declared size may lie
                        written += len(chunk)
                        if written > max_bytes:
                            raise UploadError(f"the zip expands past {max_bytes // 2**20} MB, this server's limit "
                                              f"({ZIP_EXPANSION} x --max-upload-mb)", status=413)
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError) as err:
                raise UploadError(f"zip member {member.filename!r} cannot be extracted ({err})") from None
            if target.suffix.lower() in DATA_SUFFIXES:
                data_files.append(target)
    if len(data_files) != 1:
        found = ", ".join(str(p.relative_to(folder)) for p in data_files) or "none"
        raise UploadError(f"a zip must hold exactly one data file ({', '.join(DATA_SUFFIXES)}) beside its images; "
                          f"found: {found}")
    return data_files[0]


def _member_path(member: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's path inside the archive's folder; None for what is skipped (folders, macOS metadata); UploadError
    for a path that would leave the folder, or a link."""
    name = member.filename.replace("\\", "/")
    if member.is_dir() or name.startswith("__MACOSX/") or PurePosixPath(name).name == ".DS_Store":
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(part in ("..", "") for part in path.parts) or ":" in path.parts[0]:
        raise UploadError(f"zip member {member.filename!r} has a path that leaves the archive's folder")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise UploadError(f"zip member {member.filename!r} is a symbolic link; put the files themselves in the zip")
    return path
