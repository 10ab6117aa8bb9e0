"""Training dataset: canonical samples -> tokenized, length-checked examples; images load lazily.

Samples are encoded once when the dataset is built (cheap next to training), so every bad record
is known, counted and reported before the first step. Images are decoded in `__getitem__`
(DataLoader workers), after their existence and header were checked up front.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava_kit.data.encode import IGNORE_INDEX, EncodeError, encode_messages
from llava_kit.data.formats import BadRecord, Sample
from llava_kit.data.images import ImageLoadError, load_image, prepare_image, resolve_image_path
from llava_kit.errors import DataError

logger = logging.getLogger(__name__)


class BadRecordError(DataError):
    """Raised under the strict policy (`data.bad_records: error`) at the first bad record."""


@dataclass
class DataReport:
    """What happened to every record: kept, truncated, or skipped with a reason."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: list[BadRecord] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        """Skip counts by reason (the reason text before any per-record detail)."""
        return dict(Counter(b.reason.split(":")[0] for b in self.skipped).most_common())

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "truncated": self.truncated, "skipped": len(self.skipped),
                "skipped_by_reason": self.reasons(),
                "skipped_records": [vars(b) for b in self.skipped[:1000]]}

    def log(self) -> None:
        logger.info("data: %d records, %d kept, %d truncated, %d skipped", self.total, self.kept, self.truncated,
                    len(self.skipped))
        for reason, count in self.reasons().items():
            logger.warning("data: skipped %d record(s): %s", count, reason)


def check_image_file(image: str, image_root: str) -> str:
    """Resolve and sniff an image without decoding it; returns the absolute path or raises ImageLoadError."""
    path = resolve_image_path(image, image_root)
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # PIL raises many types for broken files
        raise ImageLoadError(f"cannot read image {image!r}: {err}") from None
    return str(path)


def reject(report: DataReport, bad: BadRecord, policy: str) -> None:
    """Apply the bad-record policy: record it in the report (`skip`) or stop the run (`error`)."""
    if policy == "error":
        raise BadRecordError(f"bad record {bad.source} (id {bad.id}): {bad.reason}; "
                             "fix it, or set data.bad_records=skip to skip and report bad records")
    report.skipped.append(bad)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image_paths: list[str]


class LlavaDataset(Dataset):
    """Encoded multimodal (or text-only) examples; `__getitem__` returns tensors and loaded images."""

    def __init__(self, samples: list[Sample], tokenizer, template: str, image_token_id: int, tokens_per_image: int,
                 max_seq_len: int, image_root: str = "", image_aspect: str = "pad", image_preprocess=None,
                 image_mean=(0.5, 0.5, 0.5), system_prompt: str | None = None, bad_records: str = "skip",
                 prior_bad: list[BadRecord] | None = None):
        self.image_aspect = image_aspect
        self.feature_reader = None  # set by use_feature_cache(): items then carry tower features, not pixels
        self.image_preprocess = image_preprocess  # list[PIL] -> [n, 3, H, W]
        self.image_mean = image_mean
        self.report = DataReport(total=len(samples) + len(prior_bad or []))
        self.examples: list[Example] = []
        for bad in prior_bad or []:
            self._reject(bad, bad_records)
        for sample in samples:
            try:
                paths = [check_image_file(i, image_root) for i in sample.images]
                enc = encode_messages(sample.messages, tokenizer, template, image_token_id, tokens_per_image,
                                      max_seq_len, n_images=len(sample.images), system_prompt=system_prompt)
            except (EncodeError, ImageLoadError, ValueError) as err:
                self._reject(BadRecord(sample.source, sample.id, str(err)), bad_records)
                continue
            self.report.truncated += enc.truncated
            self.examples.append(Example(enc.input_ids, enc.labels, paths[: enc.n_images]))
        self.report.kept = len(self.examples)
        if not self.examples:
            raise BadRecordError("no usable records: every record was skipped (see the reasons above); "
                                 "run `llava-kit data check` on the data")

    def to_encoded(self):
        """The tokenised examples and the report, for the token cache (data/token_cache.py)."""
        from llava_kit.data.token_cache import EncodedExamples

        meta = {"image_paths": [e.image_paths for e in self.examples], "total": self.report.total,
                "truncated": self.report.truncated, "skipped": [vars(b) for b in self.report.skipped]}
        return EncodedExamples([e.input_ids for e in self.examples], [e.labels for e in self.examples], meta)

    @classmethod
    def from_encoded(cls, encoded, image_aspect: str = "pad", image_preprocess=None,
                     image_mean=(0.5, 0.5, 0.5)) -> LlavaDataset:
        """Rebuild a dataset saved by `to_encoded` without reading or tokenising the data again."""
        dataset = cls.__new__(cls)
        Dataset.__init__(dataset)
        dataset.image_aspect, dataset.image_preprocess, dataset.image_mean = image_aspect, image_preprocess, image_mean
        dataset.feature_reader = None
        meta = encoded.meta
        dataset.examples = [Example(ids, labels, paths) for ids, labels, paths in
                            zip(encoded.input_ids, encoded.labels, meta["image_paths"], strict=True)]
        dataset.report = DataReport(total=meta["total"], kept=len(dataset.examples), truncated=meta["truncated"],
                                    skipped=[BadRecord(**b) for b in meta["skipped"]])
        return dataset

    def _reject(self, bad: BadRecord, policy: str) -> None:
        reject(self.report, bad, policy)

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

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        item = {"input_ids": torch.tensor(example.input_ids), "labels": torch.tensor(example.labels)}
        if example.image_paths and self.feature_reader is not None:
            # [n_images, num_tokens, width] float16: the frozen tower's output, read from the memory map
            item["vision_features"] = torch.stack([self.feature_reader(p) for p in example.image_paths])
        elif example.image_paths:
            images = []
            for path in example.image_paths:
                try:
                    images.append(prepare_image(load_image(path), self.image_aspect, self.image_mean))
                except ImageLoadError as err:
                    raise ImageLoadError(f"{path}: {err}; run `llava-kit data check` to find such files") from None
            item["pixel_values"] = self.image_preprocess(images)  # [n_images, 3, H, W]
        return item


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
        return batch
