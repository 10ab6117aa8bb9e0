"""Text-only data for `text-pt` and `text-sft`: datasets -> encoded examples -> mixed -> packed.

    dataset = build_text_dataset(cfg.data, cfg.stage, tokenizer, seed=cfg.seed)

- `text-pt` reads `.txt` (documents separated by blank lines) and JSON/JSONL records with a `text`
  field. Each document becomes `<bos> text <eos>` with a label on every token; the EOS is supervised,
  so the model learns where a passage ends.
- `text-sft` reads conversations (Alpaca, ShareGPT, OpenAI messages, MOSS; see text_formats.py) and
  encodes them with the chat template through the same `encode_messages` as the multimodal stages:
  labels on the assistant's answers and their end-of-turn marker, on every turn.
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
from llava_kit.data.dataset import BadRecordError, DataReport, reject
from llava_kit.data.encode import NO_IMAGE_TOKEN, EncodeError, encode_messages
from llava_kit.data.formats import BadRecord
from llava_kit.data.packing import pack_examples
from llava_kit.data.text_formats import iter_file_records, read_conversation_records
from llava_kit.data.token_cache import EncodedExamples, TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint
from llava_kit.errors import DataError, PathNotFoundError

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
    """Yield (source, record or None, error) from a local file or a `datasets` hub name."""
    path = Path(spec.path)
    if path.is_file():
        if path.suffix == ".txt":
            for i, block in enumerate(path.read_text(encoding="utf-8").split("\n\n")):
                if block.strip():
                    yield f"{path.name}#{i + 1}", {"text": block.strip()}, None
            return
        if path.suffix not in (".json", ".jsonl"):
            raise DataError(f"{path}: text stages read .txt, .json or .jsonl files (or a `datasets` hub name)")
        yield from iter_file_records(path)
        return
    if not looks_like_hub_name(spec.path):
        raise PathNotFoundError(f"data file {spec.path!r} does not exist")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec.path!r} is not a local file, and loading it as a hub dataset needs the `datasets` "
                         "library: pip install datasets (or download the data and give its file path)") from None
    hub = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    for index, record in enumerate(hub):
        yield f"{spec.path}[{index}]", dict(record), None


def _source_fingerprint(spec: DatasetSpec) -> str:
    path = Path(spec.path)
    if path.is_file():
        return file_fingerprint(path)
    return f"hub:{spec.path}:{spec.subset}:{spec.split}"  # the hub copy is cached by `datasets` itself


def encode_document(text: str, tokenizer, max_seq_len: int | None) -> tuple[list[int], list[int], bool]:
    """`<bos> text <eos>` token ids, labels (all supervised), and whether it was truncated (None: never)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + ids + [tokenizer.eos_token_id]
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    ids = ids[:max_seq_len] if truncated else ids
    return ids, list(ids), truncated


def _encode_pt(spec: DatasetSpec, tokenizer, data: DataConfig) -> EncodedExamples:
    ids_rows, label_rows, bad, truncated = [], [], [], 0
    for source, record, error in iter_records(spec):
        if error is None:
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                error = "missing or empty `text`"
        if error:
            bad.append(vars(BadRecord(source, None, error)))
            continue
        # packed documents are never cut: a long one continues in the next block
        ids, labels, cut = encode_document(text, tokenizer, None if data.packing else data.max_seq_len)
        truncated += cut
        ids_rows.append(ids)
        label_rows.append(labels)
    return EncodedExamples(ids_rows, label_rows, {"bad": bad, "truncated": truncated})


def _encode_sft(spec: DatasetSpec, tokenizer, data: DataConfig) -> EncodedExamples:
    samples, bad_records = read_conversation_records(iter_records(spec), spec.format)
    bad = [vars(b) for b in bad_records]
    ids_rows, label_rows = [], []
    for sample in samples:
        try:
            enc = encode_messages(sample.messages, tokenizer, data.template, NO_IMAGE_TOKEN, 0, max_seq_len=None,
                                  system_prompt=data.system_prompt)
            if len(enc.input_ids) > data.max_seq_len:  # cutting an answer would teach answers that stop mid-way
                raise EncodeError(f"over-long: {len(enc.input_ids)} tokens > data.max_seq_len {data.max_seq_len}")
        except ValueError as err:  # EncodeError, TemplateError
            bad.append(vars(BadRecord(sample.source, sample.id, str(err))))
            continue
        ids_rows.append(enc.input_ids)
        label_rows.append(enc.labels)
    return EncodedExamples(ids_rows, label_rows, {"bad": bad, "truncated": 0})


def encode_dataset(spec: DatasetSpec, tokenizer, data: DataConfig, stage: str,
                   cache: TokenCache | None) -> tuple[EncodedExamples, bool]:
    """Encode one dataset for `stage`, through the token cache when given; returns (examples, cache hit)."""
    encode = _encode_pt if stage == "text-pt" else _encode_sft
    if cache is None:
        return encode(spec, tokenizer, data), False
    key = cache_key(stage=stage, source=_source_fingerprint(spec), format=spec.format,
                    tokenizer=tokenizer_fingerprint(tokenizer), template=data.template,
                    system_prompt=data.system_prompt, max_seq_len=data.max_seq_len, packing=data.packing)
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


def build_text_dataset(data: DataConfig, stage: str, tokenizer, seed: int = 0) -> TextDataset:
    """Read, encode (cached), mix and pack the datasets of a text run; bad records follow `data.bad_records`."""
    cache = TokenCache() if data.cache else None
    rng = random.Random(seed)
    report = TextDataReport()
    mixed: list[tuple[list[int], list[int]]] = []
    for spec in dataset_specs(data):
        encoded, hit = encode_dataset(spec, tokenizer, data, stage, cache)
        rows = list(zip(encoded.input_ids, encoded.labels, strict=True))
        bad = [BadRecord(**b) for b in encoded.meta["bad"]]
        report.total += len(rows) + len(bad)
        report.truncated += encoded.meta["truncated"]
        for b in bad:
            reject(report, b, data.bad_records)
        taken = mix(rows, spec.weight, rng)
        mixed += taken
        report.datasets.append({"path": spec.path, "format": spec.format, "weight": spec.weight,
                                "examples": len(rows), "skipped": len(bad), "in_mixture": len(taken),
                                "cache": "hit" if hit else ("miss" if cache else "off")})
        logger.info("data %s: %d examples, %d skipped, weight %g -> %d in the mixture (token cache: %s)", spec.path,
                    len(rows), len(bad), spec.weight, len(taken), report.datasets[-1]["cache"])
    report.kept = report.total - len(report.skipped)
    if not mixed:
        raise BadRecordError(f"no usable records: every record was skipped (by reason: {report.reasons()}); "
                             "run `llava-kit data check` with the training config to list them")
    if data.packing:
        rng.shuffle(mixed)  # interleave the datasets before laying examples into blocks
        blocks = pack_examples(mixed, data.max_seq_len, split_documents=stage == "text-pt")
        logger.info("packing: %d examples, %d tokens -> %d blocks of up to %d tokens", len(mixed),
                    sum(len(ids) for ids, _ in mixed), len(blocks), data.max_seq_len)
        items = [vars(b) for b in blocks]
    else:
        items = [{"input_ids": ids, "labels": labels} for ids, labels in mixed]
    return TextDataset(items, report)
