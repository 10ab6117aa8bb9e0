"""Text-only data for `text-pt` and `text-sft`: datasets -> encoded examples -> mixed -> packed.

    dataset = build_text_dataset(cfg.data, cfg.stage, tokenizer, seed=cfg.seed)

- `text-pt` reads `.txt` (documents separated by blank lines) and JSON/JSONL records with a `text`
  field. Each document becomes `<bos> text <eos>` with a label on every token; the EOS is supervised,
  so the model learns where a passage ends. Records with images or videos are refused.
- `text-sft` reads conversations in any format the readers know (llava_kit/data/readers/: Alpaca, ShareGPT,
  OpenAI messages, MOSS, LLaVA without images, LLaMA-Factory entries), tool calls included, and encodes them
  through the same `encode_sample` as the multimodal stages: labels on the assistant's answers and calls and their
  end-of-turn marker, on every turn; never on tool results. Records with images are refused, counted.
- Records longer than `max_seq_len` follow `data.overlong`; when too few of a dataset fit, the run stops before
  step 1 with the max_seq_len that keeps 99% (`data.min_kept_fraction`).
- Several datasets (`data.datasets`) are encoded separately (each cached, see token_cache.py), then
  mixed: weight w gives floor(w) full copies plus a random fraction w - floor(w) of the dataset.
- With packing (default for text-pt), examples are laid into blocks of `max_seq_len` tokens.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from llava_kit.config import DataConfig, looks_like_hub_name
from llava_kit.data.dataset import DataReport, check_lengths, no_usable_records, reject
from llava_kit.data.encode import OVERLONG, EncodeError, EncodeSettings, encode_sample
from llava_kit.data.packing import pack_examples
from llava_kit.data.readers import BadRecord, ReadResult, read_records
from llava_kit.data.readers.dataset_info import data_source, split_entry
from llava_kit.data.readers.files import iter_file_records
from llava_kit.data.readers.sample import count_formats
from llava_kit.data.token_cache import EncodedExamples, TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint
from llava_kit.errors import DataError

logger = logging.getLogger(__name__)

@dataclass
class DatasetSpec:
    path: str
    format: str = "auto"
    weight: float = 1.0
    split: str = "train"
    subset: str | None = None


def dataset_specs(data: DataConfig) -> list[DatasetSpec]:
    """The datasets of a run: `data.datasets` entries, or each `data.path` with weight 1 and `data.format`."""
    if data.datasets:
        entries = [{"path": d} if isinstance(d, str) else d for d in data.datasets]
        return [DatasetSpec(**{"format": data.format, **d}) for d in entries]
    paths = data.path if isinstance(data.path, list) else [data.path]
    return [DatasetSpec(p, data.format) for p in paths if p]


def iter_records(spec: DatasetSpec):
    """Yield (source, record or None, error) from local files or a `datasets` hub name."""
    path = Path(spec.path)
    if path.is_file() or split_entry(spec.path):
        for file in data_source(spec.path).files:
            if file.suffix == ".txt":
                blocks = file.read_text(encoding="utf-8").split("\n\n")
                lines = blocks[0].count("\n") + 1
                if len(blocks) == 1 and lines > 1:
                    logger.warning("%s has no blank line, so it is one document of %d lines; llava-kit separates "
                                   "documents by a blank line (a file of one document per line, as LLaMA-Factory "
                                   "reads .txt, needs one between them, or a JSONL of {\"text\"} records)", file,
                                   lines)
                for i, block in enumerate(blocks):
                    if block.strip():
                        yield f"{file.name}#{i + 1}", {"text": block.strip()}, None
            else:
                yield from iter_file_records(file)
        return
    if not looks_like_hub_name(spec.path):
        data_source(spec.path)  # raises the error that says what the path is (missing file, LLaMA-Factory folder)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec.path!r} is not a local file, and loading it as a hub dataset needs the `datasets` "
                         "library: pip install datasets (or download the data and give its file path)") from None
    hub = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    for index, record in enumerate(hub):
        yield f"{spec.path}[{index}]", dict(record), None


def _source_fingerprint(spec: DatasetSpec) -> str:
    if Path(spec.path).is_file() or split_entry(spec.path):
        return spec.path.partition("#")[2] + ":" + ",".join(file_fingerprint(f) for f in data_source(spec.path).files)
    return f"hub:{spec.path}:{spec.subset}:{spec.split}"  # the hub copy is cached by `datasets` itself


def encode_document(text: str, tokenizer, max_seq_len: int | None) -> tuple[list[int], list[int], bool]:
    """`<bos> text <eos>` token ids, labels (all supervised), and whether it was truncated (None: never)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + ids + [tokenizer.eos_token_id]
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    ids = ids[:max_seq_len] if truncated else ids
    return ids, list(ids), truncated


def document_text(record) -> str:
    """The text of a text-pt record; raises RecordError for records with media or without a `text` string."""
    from llava_kit.data.readers import detect_format
    from llava_kit.errors import RecordError

    if isinstance(record, dict):
        for key in ("image", "images", "videos", "video", "audios"):
            if record.get(key):
                raise RecordError(f"the record has `{key}`; text-pt trains on raw text only (images train with stage "
                                  "pretrain or sft)", kind="images in a text stage" if "image" in key else
                                  "video not supported" if "video" in key else "audio not supported")
        text = record.get("text")
        if isinstance(text, str) and text.strip():
            return text
    try:
        hint = f" (the record looks like {detect_format(record)}: conversations train with stage text-sft)"
    except ValueError:
        hint = ""
    raise RecordError(f"missing or empty `text`{hint}", kind="missing or empty `text`")


def _encode_pt(spec: DatasetSpec, tokenizer, data: DataConfig) -> EncodedExamples:
    ids_rows, label_rows, bad, truncated, lengths = [], [], [], 0, []
    for source, record, error in iter_records(spec):
        if error:
            bad.append(vars(BadRecord(source, None, error, "broken JSON line")))
            continue
        try:
            text = document_text(record)
        except ValueError as err:
            bad.append(vars(BadRecord(source, None, str(err), err.kind)))
            continue
        ids, labels, _ = encode_document(text, tokenizer, None)
        lengths.append(len(ids))
        # packed documents are never cut: a long one continues in the next block
        if not data.packing and len(ids) > data.max_seq_len:
            if data.overlong != "truncate":
                bad.append(vars(BadRecord(source, None, f"over-long document: {len(ids)} tokens > data.max_seq_len "
                                          f"{data.max_seq_len} (data.overlong: {data.overlong})", OVERLONG)))
                continue
            ids, labels, truncated = ids[:data.max_seq_len], labels[:data.max_seq_len], truncated + 1
        ids_rows.append(ids)
        label_rows.append(labels)
    return EncodedExamples(ids_rows, label_rows, {"bad": bad, "truncated": truncated, "lengths": lengths,
                                                  "formats": {}})


def read_conversations(spec: DatasetSpec) -> ReadResult:
    """The conversations of one text-sft dataset through the readers (logged: the formats read)."""
    fmt, columns, tags, name = spec.format, None, None, Path(spec.path).name
    if split_entry(spec.path):  # a LLaMA-Factory entry: its format and column mapping
        source = data_source(spec.path, spec.format)
        fmt, columns, tags, name = source.format, source.columns, source.tags, source.name
    result = read_records(iter_records(spec), fmt, "text-sft", columns, tags, name)
    logger.info("data %s: %d records read as %s (format %s), %d refused", spec.path, len(result.samples),
                count_formats(result.formats), "detected" if fmt == "auto" else "as set", len(result.bad))
    return result


def _encode_sft(spec: DatasetSpec, tokenizer, data: DataConfig) -> EncodedExamples:
    result = read_conversations(spec)
    bad = [vars(b) for b in result.bad]
    settings = EncodeSettings(tokenizer, data.template, data.max_seq_len, data.overlong, data.system_prompt)
    ids_rows, label_rows, lengths, truncated = [], [], [], 0
    for sample in result.samples:
        try:
            enc = encode_sample(sample.messages, 0, sample.tools, settings)
        except EncodeError as err:
            if err.kind == OVERLONG:
                lengths.append(err.length)
            bad.append(vars(BadRecord(sample.source, sample.id, str(err), err.kind)))
            continue
        except ValueError as err:  # TemplateError
            bad.append(vars(BadRecord(sample.source, sample.id, str(err), getattr(err, "kind", ""))))
            continue
        lengths.append(enc.length)
        truncated += enc.truncated
        ids_rows.append(enc.input_ids)
        label_rows.append(enc.labels)
    return EncodedExamples(ids_rows, label_rows, {"bad": bad, "truncated": truncated, "lengths": lengths,
                                                  "formats": result.formats})


def encode_dataset(spec: DatasetSpec, tokenizer, data: DataConfig, stage: str,
                   cache: TokenCache | None) -> tuple[EncodedExamples, bool]:
    """Encode one dataset for `stage`, through the token cache when given; returns (examples, cache hit)."""
    encode = _encode_pt if stage == "text-pt" else _encode_sft
    if cache is None:
        return encode(spec, tokenizer, data), False
    key = cache_key(stage=stage, source=_source_fingerprint(spec), format=spec.format,
                    tokenizer=tokenizer_fingerprint(tokenizer), template=data.template,
                    system_prompt=data.system_prompt, max_seq_len=data.max_seq_len, packing=data.packing,
                    overlong=data.overlong)
    return cache.get_or_build(key, lambda: encode(spec, tokenizer, data))


def mix(rows: list, weight: float, rng: random.Random) -> list:
    """floor(weight) copies of `rows` plus a random fraction weight - floor(weight) of them."""
    whole = int(weight)
    extra = rng.sample(range(len(rows)), round((weight - whole) * len(rows)))
    return rows * whole + [rows[i] for i in sorted(extra)]


@dataclass
class TextDataReport(DataReport):
    """DataReport plus, per dataset, how many examples it gave and how many the mixture took."""

    datasets: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "datasets": self.datasets}


class TextDataset(Dataset):
    """Encoded (and possibly packed) text examples; items are tensors, plus position_ids when packed."""

    def __init__(self, items: list[dict], report: TextDataReport):
        self.items, self.report = items, report

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {k: torch.tensor(v) for k, v in self.items[index].items()}


def dataset_report(encoded: EncodedExamples, data: DataConfig) -> DataReport:
    """The DataReport of one encoded dataset (bad records not yet through the bad-record policy)."""
    meta = encoded.meta
    bad = [BadRecord(**b) for b in meta["bad"]]
    return DataReport(total=len(encoded.input_ids) + len(bad), kept=len(encoded.input_ids),
                      truncated=meta["truncated"], skipped=bad, formats=meta["formats"], lengths=meta["lengths"],
                      max_seq_len=data.max_seq_len, overlong=data.overlong)


def build_text_dataset(data: DataConfig, stage: str, tokenizer, seed: int = 0) -> TextDataset:
    """Read, encode (cached), mix and pack the datasets of a text run; bad records follow `data.bad_records`.

    Raises BadRecordError (no usable record) or OverlongError (too few of a dataset fit max_seq_len), each with
    the report so far."""
    cache = TokenCache() if data.cache else None
    rng = random.Random(seed)
    report = TextDataReport(max_seq_len=data.max_seq_len, overlong=data.overlong)
    mixed: list[tuple[list[int], list[int]]] = []
    for spec in dataset_specs(data):
        encoded, hit = encode_dataset(spec, tokenizer, data, stage, cache)
        rows = list(zip(encoded.input_ids, encoded.labels, strict=True))
        part = dataset_report(encoded, data)
        report.total += part.total
        report.truncated += part.truncated
        report.formats.update(part.formats)
        report.lengths += part.lengths
        for b in part.skipped:
            if b.kind == OVERLONG:  # the length policy, not a bad record: check_lengths decides
                report.skipped.append(b)
            else:
                reject(report, b, data.bad_records)
        taken = mix(rows, spec.weight, rng)
        mixed += taken
        report.datasets.append({"path": spec.path, "format": spec.format, "weight": spec.weight,
                                "examples": len(rows), "skipped": len(part.skipped), "in_mixture": len(taken),
                                "cache": "hit" if hit else ("miss" if cache else "off")})
        logger.info("data %s: %d examples, %d skipped, weight %g -> %d in the mixture (token cache: %s)", spec.path,
                    len(rows), len(part.skipped), spec.weight, len(taken), report.datasets[-1]["cache"])
        try:
            check_lengths(part, data.min_kept_fraction, what=f"data {spec.path}")
        except DataError as err:
            report.kept = report.total - len(report.skipped)
            err.report = report
            raise
    report.kept = report.total - len(report.skipped)
    if not mixed:
        raise no_usable_records(report, "run `llava-kit data check` with the training config to list them")
    if data.packing:
        rng.shuffle(mixed)  # interleave the datasets before laying examples into blocks
        blocks = pack_examples(mixed, data.max_seq_len, split_documents=stage == "text-pt")
        logger.info("packing: %d examples, %d tokens -> %d blocks of up to %d tokens", len(mixed),
                    sum(len(ids) for ids, _ in mixed), len(blocks), data.max_seq_len)
        items = [vars(b) for b in blocks]
    else:
        items = [{"input_ids": ids, "labels": labels} for ids, labels in mixed]
    return TextDataset(items, report)
