"""The data of the preference stages (dpo, text-dpo): pairs -> checked images, two encoded answers, one report.

    dataset = build_preference_dataset(cfg, tokenizer, image_token_id, tokens_per_image, image_settings)
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])

Each pair is read by the preference readers (llava_kit/data/readers/preference.py), its images decoded whole once,
and both conversations (prompt + chosen, prompt + rejected) go through the one tokenizer step (`encode_sample`), so
the labels cover exactly the answer of each. A pair is kept or skipped whole (reported by reason, as every stage's
records are). An item carries the pair's images once; the collator lays a batch of B pairs out as 2B rows, the B
chosen conversations first, then the B rejected ones in the same order, and the images of the B pairs once: the
model encodes them once and uses the features for both rows of a pair (llava_kit/train/preference.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from llava_kit.config import RunConfig
from llava_kit.data.dataset import (
    Collator,
    DataReport,
    Example,
    LlavaDataset,
    check_images,
    check_lengths,
    no_usable_records,
    reject,
    reject_unencodable,
)
from llava_kit.data.encode import NO_IMAGE_TOKEN, OVERLONG, EncodeError, EncodeSettings, encode_sample
from llava_kit.data.images import ImageLoadError
from llava_kit.data.readers import BadRecord
from llava_kit.data.readers.preference import PreferencePair, read_pairs

logger = logging.getLogger(__name__)


@dataclass
class PairExample(Example):
    """An encoded pair: `input_ids`/`labels` are prompt + chosen; `rejected_*` prompt + rejected."""

    rejected_input_ids: list[int] = field(default_factory=list)
    rejected_labels: list[int] = field(default_factory=list)


class PreferenceDataset(LlavaDataset):
    """Encoded pairs; an item is {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels} plus the
    pair's images once (`pixel_values` or cached `vision_features`)."""

    @property
    def lengths(self) -> list[int]:
        return [max(len(e.input_ids), len(e.rejected_input_ids)) for e in self.examples]

    def item(self, index: int) -> dict | None:
        item = super().item(index)  # the chosen conversation and the images (None when an image fails)
        if item is None:
            return None
        example = self.examples[index]
        item["chosen_input_ids"], item["chosen_labels"] = item.pop("input_ids"), item.pop("labels")
        item["rejected_input_ids"] = torch.tensor(example.rejected_input_ids)
        item["rejected_labels"] = torch.tensor(example.rejected_labels)
        return item


def encode_pair(pair: PreferencePair, settings: EncodeSettings) -> tuple[PairExample, int]:
    """Both conversations of a pair through the one tokenizer step; (example, the longer one's whole length).

    Raises EncodeError (kind OVERLONG with `.length` when either is longer than max_seq_len under skip or error, or
    when truncation would drop an image from one of them)."""
    encoded = {}
    for which in ("chosen", "rejected"):
        sample = pair.sample(which)
        encoded[which] = encode_sample(sample.messages, len(pair.images), sample.tools, settings)
    chosen, rejected = encoded["chosen"], encoded["rejected"]
    length = max(chosen.length, rejected.length)
    if chosen.n_images != len(pair.images) or rejected.n_images != len(pair.images):
        error = EncodeError(f"over-long pair: {length} tokens > data.max_seq_len {settings.max_seq_len} and "
                            "truncation would cut into the prompt's images", kind=OVERLONG)
        error.length = length
        raise error
    example = PairExample(chosen.input_ids, chosen.labels, [], source=pair.source, id=pair.id,
                          rejected_input_ids=rejected.input_ids, rejected_labels=rejected.labels)
    return example, length


def prepare_pairs(pairs: list[PreferencePair], settings: EncodeSettings, image_root: str, bad_records: str,
                  prior_bad: list[BadRecord]) -> tuple[list[PairExample], DataReport]:
    """Check the images and encode every pair; bad pairs follow `bad_records`, over-long ones are counted."""
    report = DataReport(total=len(pairs) + len(prior_bad), max_seq_len=settings.max_seq_len,
                        overlong=settings.overlong)
    for bad in prior_bad:
        reject(report, bad, bad_records)
    images = check_images([pair.sample("chosen") for pair in pairs], image_root)
    examples = []
    for pair in pairs:
        try:
            paths = []
            for image in pair.images:
                if isinstance(images[image], ImageLoadError):
                    raise images[image]
                paths.append(images[image])
            example, length = encode_pair(pair, settings)
        except ValueError as err:  # EncodeError, ImageLoadError, TemplateError: a user-data problem of this pair
            reject_unencodable(report, pair.source, pair.id, err, bad_records)
            continue
        example.image_paths = paths
        report.lengths.append(length)
        examples.append(example)
    report.kept = len(examples)
    return examples, report


def build_preference_dataset(cfg: RunConfig, tokenizer, image_token_id: int = NO_IMAGE_TOKEN,
                             tokens_per_image: int = 0, image_settings: dict | None = None) -> PreferenceDataset:
    """Read and encode the pairs of a dpo / text-dpo run (`data.path`); bad pairs are skipped and reported, or stop
    the run. `image_settings` are LlavaDataset's (image_aspect, image_preprocess, image_mean) for dpo."""
    d = cfg.data
    result = read_pairs(d.path, d.format, cfg.stage)
    settings = EncodeSettings(tokenizer, d.template, d.max_seq_len, d.overlong, d.system_prompt, image_token_id,
                              tokens_per_image)
    examples, report = prepare_pairs(result.pairs, settings, d.image_root, d.bad_records, result.bad)
    report.formats = result.formats
    dataset = PreferenceDataset(examples, report, bad_records=d.bad_records, **(image_settings or {}))
    check_lengths(report, d.min_kept_fraction)
    if not examples:
        raise no_usable_records(report)
    if d.cache:
        logger.info("data: preference pairs are encoded on every run (the token cache holds single conversations)")
    return dataset


@dataclass
class PreferenceCollator:
    """B pairs -> one batch of 2B rows (chosen rows 0..B-1, rejected rows B..2B-1, pair order kept) and the B
    pairs' images once, in pair order (`pixel_values` [n_images, 3, H, W] or `vision_features`)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        rows = [{"input_ids": i[f"{which}_input_ids"], "labels": i[f"{which}_labels"]}
                for which in ("chosen", "rejected") for i in items]
        batch = Collator(self.pad_token_id)(rows)
        for key in ("pixel_values", "vision_features"):
            images = [i[key] for i in items if key in i]
            if images:
                batch[key] = torch.cat(images)
        return batch
