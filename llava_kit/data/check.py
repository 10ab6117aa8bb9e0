"""Pre-flight check of training data: every bad record with its reason, as training would see it.

    llava-kit data check [FILE ...] [--config CFG] [key=value ...] [--format F] [--image-root DIR]

With a training config the check runs that stage's own steps on FILE (or on the config's data when no FILE is
given): the same readers, the same full decode of every image, the same tokenizer step with the config's template,
max_seq_len and over-long policy (`encode_sample`), and the same stop when too few records fit. It prints the token
lengths' percentiles. Without a config only the readers run (and the images, given an image root). Ends with
`valid: N invalid: M`.
"""

from __future__ import annotations

from llava_kit.data.dataset import DataReport, check_images, prepare_examples
from llava_kit.data.encode import EncodeSettings
from llava_kit.data.readers import BadRecord, read_data
from llava_kit.errors import UsageError


def check_records(paths: str | list[str], fmt: str = "auto", stage: str | None = None, image_root: str | None = None,
                  settings: EncodeSettings | None = None) -> DataReport:
    """Conversation data (any stage but text-pt; `stage` None: any format, images allowed): the report of what
    training would keep and skip. With `settings` every sample is encoded as training does."""
    result = read_data(paths, fmt, stage)
    with_images = [s for s in result.samples if s.images]
    if with_images and image_root is None:
        raise UsageError(f"{len(with_images)} record(s) have images (e.g. {with_images[0].source}); give --image-root "
                         "DIR, the directory their paths are relative to")
    if settings is not None:
        _, report = prepare_examples(result.samples, settings, image_root or "", prior_bad=result.bad)
    else:
        report = DataReport(total=len(result.samples) + len(result.bad), skipped=list(result.bad))
        images = check_images(with_images, image_root) if with_images else {}
        for sample in result.samples:
            error = next((images[i] for i in sample.images if not isinstance(images[i], str)), None)
            if error is not None:
                report.skipped.append(BadRecord(sample.source, sample.id, str(error), error.kind))
        report.kept = report.total - len(report.skipped)
    report.formats = result.formats
    return report


def check_text_records(paths: list[str] | None, data, stage: str, tokenizer=None) -> DataReport:
    """Text-stage data (`text-pt` / `text-sft`) as training would see it: with a tokenizer (from a config) encoded
    like training, so over-long and fully masked conversations are found too; without one only the readers run.
    `paths` None checks `data`'s own path or datasets."""
    from llava_kit.data.text import (
        dataset_report,
        dataset_specs,
        document_text,
        encode_dataset,
        iter_records,
        read_conversations,
    )

    data = data.model_copy(update={"packing": False, **({"path": list(paths), "datasets": []} if paths else {})})
    report = DataReport(max_seq_len=data.max_seq_len if tokenizer is not None else None, overlong=data.overlong)
    for spec in dataset_specs(data):
        if tokenizer is not None:
            encoded, _ = encode_dataset(spec, tokenizer, data, stage, cache=None)
            part = dataset_report(encoded, data)
        elif stage == "text-pt":
            part = DataReport()
            for source, record, error in iter_records(spec):
                part.total += 1
                try:
                    if error:
                        raise ValueError(error)
                    document_text(record)
                except ValueError as err:
                    kind = "broken JSON line" if error else getattr(err, "kind", "")
                    part.skipped.append(BadRecord(source, None, str(err), kind))
            part.kept = part.total - len(part.skipped)
        else:
            result = read_conversations(spec)
            part = DataReport(total=len(result.samples) + len(result.bad), kept=len(result.samples),
                              skipped=result.bad, formats=result.formats)
        report.total, report.kept, report.truncated = (report.total + part.total, report.kept + part.kept,
                                                       report.truncated + part.truncated)
        report.skipped += part.skipped
        report.lengths += part.lengths
        report.formats.update(part.formats)
    return report


def check_pairs(paths: str | list[str], fmt: str = "auto", stage: str = "dpo", image_root: str | None = None,
                settings: EncodeSettings | None = None) -> DataReport:
    """Preference pairs (stages dpo, text-dpo) as training would read them; with `settings` (from a config) every
    pair is also image-checked and encoded as training does, over-long pairs included."""
    from llava_kit.data.preference import prepare_pairs
    from llava_kit.data.readers.preference import read_pairs

    result = read_pairs(paths, fmt, stage)
    with_images = [p for p in result.pairs if p.images]
    if with_images and image_root is None:
        raise UsageError(f"{len(with_images)} pair(s) have images (e.g. {with_images[0].source}); give --image-root "
                         "DIR, the directory their paths are relative to")
    if settings is not None:
        _, report = prepare_pairs(result.pairs, settings, image_root or "", "skip", result.bad)
    else:
        report = DataReport(total=len(result.pairs) + len(result.bad), skipped=list(result.bad))
        images = check_images([p.sample("chosen") for p in with_images], image_root) if with_images else {}
        for pair in result.pairs:
            error = next((images[i] for i in pair.images if not isinstance(images[i], str)), None)
            if error is not None:
                report.skipped.append(BadRecord(pair.source, pair.id, str(error), error.kind))
        report.kept = report.total - len(report.skipped)
    report.formats = result.formats
    return report
