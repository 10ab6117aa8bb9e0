"""Training dataset: canonical samples -> checked images, encoded examples, and a report of every record.

Samples are prepared once when the dataset is built (cheap next to training), so every bad record is known,
counted and reported before the first step: each image is decoded whole (a truncated JPEG is found here, by
name), each conversation goes through the one tokenizer step with the over-long policy (`encode_sample`).
Images are decoded again in `__getitem__` (DataLoader workers); one that fails there after all is skipped and
added to the run's data_report.json (or stops the run under `data.bad_records: error`), never a crash.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from llava_kit.data.encode import IGNORE_INDEX, OVERLONG, EncodeError, EncodeSettings, encode_sample
from llava_kit.data.images import ImageLoadError, checked_image, load_image, prepare_image
from llava_kit.data.readers import BadRecord, Sample
from llava_kit.errors import DataError

logger = logging.getLogger(__name__)

MAX_LISTED = 1000
"""Skipped records listed one by one in data_report.json (all are counted)."""


class BadRecordError(DataError):
    """Raised under the strict policy (`data.bad_records: error`) at the first bad record, and when no record is
    usable; `report` (when set) is what was read so far."""

    report = None


class OverlongError(DataError):
    """Too many records are longer than data.max_seq_len (or any, under `data.overlong: error`)."""

    report = None


@dataclass
class DataReport:
    """What happened to every record: kept, truncated, or skipped with a reason."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: list[BadRecord] = field(default_factory=list)
    formats: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per data file: how many records each format read (what `auto` detected)."""
    lengths: list[int] = field(default_factory=list)
    """Token counts of every record that encoded, whole (before any truncation), kept or skipped as over-long."""
    max_seq_len: int | None = None
    overlong: str | None = None

    def reasons(self) -> dict[str, int]:
        """Skip counts by reason: each record's `kind` (a whole, stable reason), most frequent first."""
        return dict(Counter(b.kind or b.reason for b in self.skipped).most_common())

    def length_summary(self) -> dict:
        """Token-length percentiles of the records that encoded, and the fraction that fits max_seq_len."""
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        summary = {f"p{q}": ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 90, 99)}
        summary["max"] = ordered[-1]
        if self.max_seq_len:
            summary["fit_max_seq_len"] = round(sum(n <= self.max_seq_len for n in ordered) / len(ordered), 4)
        return summary

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "truncated": self.truncated, "skipped": len(self.skipped),
                "skipped_by_reason": self.reasons(), "formats": self.formats, "max_seq_len": self.max_seq_len,
                "overlong": self.overlong, "token_lengths": self.length_summary(),
                "skipped_records": [vars(b) for b in self.skipped[:MAX_LISTED]]}

    def log(self) -> None:
        logger.info("data: %d records, %d kept, %d truncated, %d skipped", self.total, self.kept, self.truncated,
                    len(self.skipped))
        for reason, count in self.reasons().items():
            example = next(b for b in self.skipped if (b.kind or b.reason) == reason)
            logger.warning("data: skipped %d record(s): %s (e.g. %s%s: %s)", count, reason, example.source,
                           f" id {example.id}" if example.id else "", example.reason)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def reject(report: DataReport, bad: BadRecord, policy: str) -> None:
    """Apply the bad-record policy: record it in the report (`skip`) or stop the run (`error`)."""
    if policy == "error":
        raise BadRecordError(f"bad record {bad.source} (id {bad.id}): {bad.reason}; "
                             "fix it, or set data.bad_records=skip to skip and report bad records")
    report.skipped.append(bad)


def reject_unencodable(report: DataReport, source: str, record_id, err: ValueError, policy: str) -> None:
    """A record (or pair) that failed to encode: an over-long one is skipped and its length kept for the report's
    length summary; any other reason (an image, a template, an encode error) goes through the bad-record policy."""
    if isinstance(err, EncodeError) and err.kind == OVERLONG:
        report.lengths.append(err.length)
        report.skipped.append(BadRecord(source, record_id, str(err), OVERLONG))
    else:
        reject(report, BadRecord(source, record_id, str(err), getattr(err, "kind", "")), policy)


def suggest_max_seq_len(lengths: list[int], keep: float = 0.99) -> tuple[int, float]:
    """The max_seq_len (a multiple of 128) that keeps at least `keep` of `lengths`, and the fraction it keeps."""
    ordered = sorted(lengths)
    needed = ordered[max(0, math.ceil(keep * len(ordered)) - 1)]
    suggestion = math.ceil(needed / 128) * 128
    return suggestion, sum(n <= suggestion for n in ordered) / len(ordered)


def check_lengths(report: DataReport, min_kept_fraction: float, what: str = "data") -> None:
    """Stop before step 1 when over-long records are refused too often: any of them under `data.overlong: error`,
    or under `skip` when fewer than `min_kept_fraction` of the usable records fit. The message has the numbers and
    the max_seq_len that keeps 99%."""
    over = sum(1 for b in report.skipped if b.kind == OVERLONG)
    usable = report.kept + over
    if not over or not usable:
        return
    stop = report.overlong == "error" or (report.overlong == "skip" and report.kept / usable < min_kept_fraction)
    if not stop:
        return
    suggestion, keeps = suggest_max_seq_len(report.lengths)
    if report.overlong == "error":
        head = f"{what}: {over} of {usable} usable records are longer than data.max_seq_len {report.max_seq_len} " \
               "(data.overlong: error)"
        fix = "or set data.overlong: skip or truncate"
    else:
        head = (f"{what}: only {report.kept} of {usable} usable records ({report.kept / usable:.1%}) fit "
                f"data.max_seq_len {report.max_seq_len}; {over} over-long ones would be skipped "
                f"(data.overlong: skip), below data.min_kept_fraction {min_kept_fraction:g}")
        fix = "set data.overlong: truncate, or lower data.min_kept_fraction"
    error = OverlongError(f"{head}. max_seq_len {suggestion} keeps {keeps:.1%} (the longest record has "
                          f"{max(report.lengths)} tokens): raise data.max_seq_len, {fix}")
    error.report = report
    raise error


def no_usable_records(report: DataReport, hint: str = "run `llava-kit data check` on the data") -> BadRecordError:
    """The error of a dataset without one usable record; its message has the skip reasons by count."""
    reasons = "; ".join(f"{reason}: {count}" for reason, count in report.reasons().items()) or "no records"
    error = BadRecordError(f"no usable records: all {report.total} were skipped ({reasons}); {hint}")
    error.report = report
    return error


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image_paths: list[str]
    source: str = ""
    id: str | None = None
    image_sizes: list[tuple[int, int]] | None = None
    """Each image's (height, width): AnyRes lays its tiles out and counts its tokens from it."""
    image_caps: list[int] | None = None
    """AnyRes: each image's token cap as it was encoded (0: the model's own), the sample's budget shared."""


def check_images(samples: list[Sample], image_root: str) -> dict[str, str | ImageLoadError]:
    """Every image of `samples`, decoded whole once (a few threads: decoding releases the GIL): image -> its path,
    or the error that refuses it."""
    return {image: checked if isinstance(checked, ImageLoadError) else checked[0]
            for image, checked in checked_images(samples, image_root).items()}


def checked_images(samples: list[Sample], image_root: str) -> dict[str, tuple[str, tuple[int, int]] | ImageLoadError]:
    """`check_images` with each image's (height, width) beside its path (AnyRes counts tokens from it)."""
    def one(image: str) -> tuple[str, tuple[int, int]] | ImageLoadError:
        try:
            return checked_image(image, image_root)
        except ImageLoadError as err:
            return err

    unique = list(dict.fromkeys(image for sample in samples for image in sample.images))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(one, unique), strict=True))


def prepare_examples(samples: list[Sample], settings: EncodeSettings, image_root: str, bad_records: str = "skip",
                     prior_bad: list[BadRecord] | None = None) -> tuple[list[Example], DataReport]:
    """Check the images and encode every sample (the one tokenizer step, with the over-long policy).

    Over-long records are counted under `over-long` whatever `bad_records` says (check_lengths decides if that
    stops the run); other bad records follow `bad_records`.
    """
    report = DataReport(total=len(samples) + len(prior_bad or []), max_seq_len=settings.max_seq_len,
                        overlong=settings.overlong)
    for bad in prior_bad or []:
        reject(report, bad, bad_records)
    images = checked_images(samples, image_root)
    examples = []
    for sample in samples:
        try:
            paths, sizes = [], []
            for image in sample.images:
                if isinstance(images[image], ImageLoadError):
                    raise images[image]
                paths.append(images[image][0])
                sizes.append(images[image][1])
            enc = encode_sample(sample.messages, len(sample.images), sample.tools, settings, sizes)
        except ValueError as err:  # EncodeError, ImageLoadError, TemplateError: a user-data problem of this record
            reject_unencodable(report, sample.source, sample.id, err, bad_records)
            continue
        report.lengths.append(enc.length)
        report.truncated += enc.truncated
        caps = settings.anyres.sample_caps(len(sizes))[: enc.n_images] if settings.anyres is not None else None
        examples.append(Example(enc.input_ids, enc.labels, paths[: enc.n_images], sample.source, sample.id,
                                sizes[: enc.n_images], caps))
    report.kept = len(examples)
    return examples, report


class LlavaDataset(Dataset):
    """Encoded multimodal (or text-only) examples; `__getitem__` returns tensors and loaded images."""

    def __init__(self, examples: list[Example], report: DataReport, image_aspect: str = "pad",
                 image_preprocess=None, image_mean=(0.5, 0.5, 0.5), bad_records: str = "skip", anyres=None):
        self.examples, self.report = examples, report
        self.image_aspect = image_aspect
        self.image_preprocess = image_preprocess  # list[PIL] -> [n, 3, H, W]
        # AnyRes (llava_kit.model.anyres.AnyRes, given by the model): `anyres.views(image)` is an image's views (base,
        # then tiles); items then carry every view and the images' sizes and caps. None: one view per image.
        self.anyres = anyres
        self.image_mean = image_mean
        self.bad_records = bad_records
        self.feature_reader = None  # set by use_feature_cache(): items then carry tower features, not pixels
        self.report_path: Path | None = None
        """The run's data_report.json: images that fail to decode during training are added to it."""
        self.failed: set[int] = set()  # examples whose images failed in this process: never tried again

    def to_encoded(self):
        """The tokenised examples and the report, for the token cache (data/token_cache.py)."""
        from llava_kit.data.token_cache import EncodedExamples

        report = self.report
        meta = {"image_paths": [e.image_paths for e in self.examples], "sources": [e.source for e in self.examples],
                "ids": [e.id for e in self.examples], "image_sizes": [e.image_sizes for e in self.examples],
                "image_caps": [e.image_caps for e in self.examples], "total": report.total, "truncated": report.truncated,
                "skipped": [vars(b) for b in report.skipped], "formats": report.formats, "lengths": report.lengths,
                "max_seq_len": report.max_seq_len, "overlong": report.overlong}
        return EncodedExamples([e.input_ids for e in self.examples], [e.labels for e in self.examples], meta)

    @classmethod
    def from_encoded(cls, encoded, **settings) -> LlavaDataset:
        """Rebuild a dataset saved by `to_encoded` without reading or tokenising the data again."""
        meta = encoded.meta
        n = len(encoded.input_ids)
        examples = [Example(ids, labels, paths, source, rid, sizes, caps) for ids, labels, paths, source, rid, sizes,
                    caps in zip(encoded.input_ids, encoded.labels, meta["image_paths"], meta["sources"], meta["ids"],
                                meta.get("image_sizes", [None] * n), meta.get("image_caps", [None] * n), strict=True)]
        report = DataReport(total=meta["total"], kept=len(examples), truncated=meta["truncated"],
                            skipped=[BadRecord(**b) for b in meta["skipped"]], formats=meta["formats"],
                            lengths=meta["lengths"], max_seq_len=meta["max_seq_len"], overlong=meta["overlong"])
        return cls(examples, report, **settings)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Token counts, for length-grouped sampling."""
        return [len(e.input_ids) for e in self.examples]

    @property
    def has_images(self) -> list[bool]:
        """Per example: does it carry images (for modality-grouped sampling)."""
        return [bool(e.image_paths) for e in self.examples]

    @property
    def image_paths(self) -> list[str]:
        """Every image the kept examples use (with repeats)."""
        return [path for e in self.examples for path in e.image_paths]

    def use_feature_cache(self, reader) -> None:
        """Serve cached tower features (`vision_features`) instead of pixels; see data/feature_cache.py."""
        missing = [p for p in self.image_paths if p not in reader]
        if missing:
            raise ValueError(f"the feature cache lacks {len(missing)} image(s) of this dataset, e.g. {missing[0]}")
        self.feature_reader = reader

    def item(self, index: int) -> dict | None:
        """Example `index` as tensors with its images, or None when an image fails to decode (then reported)."""
        if index in self.failed:
            return None
        example = self.examples[index]
        item = {"input_ids": torch.tensor(example.input_ids), "labels": torch.tensor(example.labels)}
        if example.image_paths and self.feature_reader is not None:
            # float16 tower output read from the memory map: [n_images, num_tokens, width], one view per image, or
            # (AnyRes) every image's views one image after the other, [n_views, num_tokens, width]
            features = [self.feature_reader(p) for p in example.image_paths]
            item["vision_features"] = torch.cat(features) if self.anyres is not None else torch.stack(features)
        elif example.image_paths:
            images = []
            for path, size in zip(example.image_paths, example.image_sizes or [None] * len(example.image_paths),
                                  strict=True):
                try:
                    image = load_image(path)
                    if self.anyres is not None and (image.height, image.width) != tuple(size):
                        raise ImageLoadError(f"it is {image.width}x{image.height} now, {size[1]}x{size[0]} when the "
                                             "data was checked (its tokens were counted from that size)")
                    images.append(image if self.anyres is not None else
                                  prepare_image(image, self.image_aspect, self.image_mean))
                except ImageLoadError as err:
                    self.skip_during_training(index, path, err)
                    return None
            if self.anyres is None:
                item["pixel_values"] = self.image_preprocess(images)  # [n_images, 3, H, W]
            else:  # [n_views, 3, H, W]: each image's base view and tiles, one image after the other
                item["pixel_values"] = self.image_preprocess([v for image in images for v in self.anyres.views(image)])
        if example.image_paths and self.anyres is not None:
            item["image_sizes"] = torch.tensor(example.image_sizes, dtype=torch.long)  # [n_images, 2] (height, width)
            item["image_token_caps"] = torch.tensor(example.image_caps, dtype=torch.long)  # [n_images]
        return item

    def __getitem__(self, index: int) -> dict:
        # An example whose image fails now (changed or damaged since the check) is replaced by the next good one,
        # so the batch keeps its size; it is reported once and not tried again in this process.
        for step in range(len(self.examples)):
            item = self.item((index + step) % len(self.examples))
            if item is not None:
                return item
        raise BadRecordError("no example left whose images decode; run `llava-kit data check` on the data")

    def skip_during_training(self, index: int, path: str, err: ImageLoadError) -> None:
        """Report an example whose image failed to decode during training (or stop, under bad_records: error)."""
        example = self.examples[index]
        bad = BadRecord(example.source, example.id, f"cannot read image {path}: {err} (found during training)",
                        "unreadable image")
        if self.bad_records == "error":
            raise BadRecordError(f"bad record {bad.source} (id {bad.id}): {bad.reason}; fix it, or set "
                                 "data.bad_records=skip to skip and report bad records")
        self.failed.add(index)
        logger.warning("data: skipped %s during training: %s", bad.source, bad.reason)
        if self.report_path is not None:
            add_to_report(self.report_path, bad)


def add_to_report(path: Path, bad: BadRecord) -> None:
    """Add a record skipped during training to a written data_report.json (DataLoader workers are separate
    processes: a file lock keeps their updates whole; a record is added once)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(path.read_text()) if path.is_file() else {}
        listed = report.setdefault("skipped_records", [])
        if any(r["source"] == bad.source for r in listed if r.get("kind") == bad.kind):
            return
        listed.append(vars(bad))
        report["skipped"] = report.get("skipped", 0) + 1
        report["kept"] = report.get("kept", 1) - 1
        by_reason = report.setdefault("skipped_by_reason", {})
        by_reason[bad.kind] = by_reason.get(bad.kind, 0) + 1
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        os.replace(tmp, path)


@dataclass
class Collator:
    """Pads a list of examples into a batch; concatenates their images in order."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(i["input_ids"]) for i in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [i["pixel_values"] for i in items if "pixel_values" in i]
        if images:
            batch["pixel_values"] = torch.cat(images)  # [total_images, 3, H, W], batch order
        features = [i["vision_features"] for i in items if "vision_features" in i]
        if features:
            batch["vision_features"] = torch.cat(features)  # [total_images, num_tokens, width], batch order
        for key in ANYRES_KEYS:  # AnyRes: [total_images, 2] sizes, [total_images] caps, batch order
            parts = [i[key] for i in items if key in i]
            if parts:
                batch[key] = torch.cat(parts)
        return batch


ANYRES_KEYS = ("image_sizes", "image_token_caps")
"""What AnyRes items carry besides their views: each image's (height, width) and token cap."""
