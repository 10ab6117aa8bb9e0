"""Readers: data files in the ecosystem's formats -> canonical samples, every bad record kept with its reason.

    result = read_data(["data/mllm_demo.json", "data/dataset_info.json#identity"], fmt="auto", stage="sft")
    result.samples, result.bad, result.formats        # formats: per file, what each format read

The canonical sample (`Sample`, readers/sample.py) is what every reader produces and every stage consumes:

    Sample(id="r1", source="mllm.json[0]",
           images=["a.jpg"],                                          # one per `<image>` tag, in tag order
           tools=[{"type": "function", "function": {"name": "weather", "description": ..., "parameters": {...}}}],
           messages=[
               {"role": "system", "content": "You are helpful."},                  # optional, first only
               {"role": "user", "content": "<image>\\nWhat is the weather there?"},  # `<image>`: user turns only
               {"role": "assistant", "content": "",                                # text, tool calls, or both
                "tool_calls": [{"type": "function", "id": "c1",                   # id: optional
                                "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "{\\"temp\\": 21}", "tool_call_id": "c1"},  # a result, never trained on
               {"role": "assistant", "content": "21 degrees.", "weight": 1},      # weight 0: not trained on
           ])

Rules every sample passes (sample.check_sample): an optional first system message, then user; the assistant
answers each user turn; an assistant message with tool_calls is followed by the tools' results, then the assistant
again; the last message is an answer; no empty answer; `<image>` only in user turns, as many as images.

Formats (config.CONVERSATION_FORMATS; config.STAGE_FORMATS says which stage reads which):

| name     | module      | a record                                                                             |
|----------|-------------|--------------------------------------------------------------------------------------|
| alpaca   | alpaca.py   | instruction, input, output, system, history, images                                  |
| llava    | sharegpt.py | conversations (from human/gpt), image (a path or a list)                             |
| sharegpt | sharegpt.py | conversations or messages, LLaMA-Factory roles and tags, images, system, tools       |
| openai   | openai.py   | messages with content parts (image_url, image), tool_calls, role tool, tools, weight |
| moss     | moss.py     | meta_instruction, chat {turn_N: {Human, MOSS}}                                       |

Adding a format is one module with a `looks_like(record)` and a `read(record, columns, tags, text_only)` (and a
`write(sample)` for `llava-kit data convert`), one entry in READERS below, and its name in config.py.

`auto` detects each record's format from its keys (the first reader of READERS whose `looks_like` holds) and logs,
per file, how many records each format read. A record that fits no reader, or not the format set, is refused
naming what it looks like and the setting to use. A LLaMA-Factory `dataset_info.json#NAME` entry fixes the format
and renames columns (dataset_info.py). Records with video or audio are refused everywhere; under a text stage,
records with images are refused (never trained on as a literal `<image>`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llava_kit.config import STAGE_FORMATS, STAGE_MODALITY
from llava_kit.data.readers.alpaca import looks_like_alpaca, read_alpaca
from llava_kit.data.readers.chat import Tags, refuse_video
from llava_kit.data.readers.dataset_info import DataSource, data_source
from llava_kit.data.readers.files import RecordLine, iter_file_records
from llava_kit.data.readers.moss import looks_like_moss, read_moss
from llava_kit.data.readers.openai import looks_like_openai, read_openai, write_openai
from llava_kit.data.readers.sample import BadRecord, ReadResult, Sample, bad_record, check_sample, count_formats
from llava_kit.data.readers.sharegpt import (
    looks_like_llava,
    looks_like_sharegpt,
    read_sharegpt,
    write_llava,
    write_sharegpt,
)
from llava_kit.errors import RecordError

__all__ = ["READERS", "BadRecord", "DataSource", "ReadResult", "Reader", "Sample", "data_source", "detect_format",
           "iter_file_records", "read_data", "read_record", "read_records"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reader:
    """One record format: how its records look, how one is read, and (for `data convert`) written."""

    name: str
    looks_like: Callable[[object], bool]
    """True when a record has this format's keys (what `auto` detects with; the first match wins)."""
    read: Callable[[dict, dict, Tags | None, bool], Sample]
    """(record, column renames, tags, text_only) -> Sample; raises RecordError with the reason."""
    shape: str
    """How its records look, for messages."""
    write: Callable[[Sample], dict] | None = None
    fits: Callable[[object], bool] | None = None
    """Whether a record can be this format when it is set explicitly (default: looks_like)."""


READERS = {  # in detection order: the stricter looks_like first
    "alpaca": Reader("alpaca", looks_like_alpaca, read_alpaca, "instruction/output keys"),
    "llava": Reader("llava", looks_like_llava, read_sharegpt, "`conversations` and `image`", write_llava,
                    fits=looks_like_sharegpt),
    "sharegpt": Reader("sharegpt", looks_like_sharegpt, read_sharegpt, "a `conversations` list", write_sharegpt,
                       fits=lambda r: looks_like_sharegpt(r) or isinstance(r, dict) and "messages" in r),
    "openai": Reader("openai", looks_like_openai, read_openai, "a `messages` list", write_openai),
    "moss": Reader("moss", looks_like_moss, read_moss, "a `chat` object"),
}


def _looks_like(record) -> str | None:
    return next((name for name, reader in READERS.items() if reader.looks_like(record)), None)


def _describe(record) -> str:
    """What a record that no reader takes looks like, with the setting to use."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}"
    keys = ", ".join(sorted(map(str, record))[:8])
    if "chosen" in record and "rejected" in record:
        return f"preference data (chosen/rejected; keys: {keys}), which the sft stages do not train on"
    if "text" in record:
        return f"raw text (keys: {keys}): train it with stage text-pt"
    return f"keys: {keys}"


def refuse_unsupervised(record) -> None:
    """Preference pairs and KTO-tagged records are not one answer to learn: refused rather than trained wrongly."""
    if not isinstance(record, dict):
        return
    keys = " ".join(map(str, record))
    if "chosen" in keys and "rejected" in keys:
        raise RecordError("a preference record (chosen/rejected answers); the sft stages train on one answer per "
                          "conversation: keep the chosen answer as the assistant's turn to train on it",
                          kind="preference data (chosen/rejected)")
    for key in ("kto_tag", "label"):
        if isinstance(record.get(key), bool):
            raise RecordError(f"a KTO record (boolean `{key}`: a desirable or undesirable answer); sft would learn "
                              f"the undesirable answers too: keep the records with {key} true and drop the key",
                              kind="KTO data (desirable/undesirable tag)")


def detect_format(record) -> str:
    """The format of one record, from its keys; raises RecordError (`unknown record format`) when none fits."""
    name = _looks_like(record)
    if name is None:
        raise RecordError(f"unknown record format ({_describe(record)}); expected alpaca (instruction/output), "
                          "llava or sharegpt (conversations), openai (messages) or moss (chat); set data.format to "
                          "say which", kind="unknown record format")
    return name


def read_record(record, source: str, fmt: str = "auto", stage: str | None = None, columns: dict | None = None,
                tags: Tags | None = None) -> tuple[Sample, str]:
    """One record -> (checked Sample, the format that read it); raises RecordError with the reason.

    `stage` (None: any) decides which formats are read (config.STAGE_FORMATS) and whether images are allowed.
    `columns` and `tags` come from a LLaMA-Factory entry and rename the keys the reader looks for.
    """
    if not isinstance(record, dict | list):
        raise RecordError(f"record is a {type(record).__name__}, not an object", kind="record not an object")
    refuse_unsupervised(record)
    refuse_video(record, columns or {})
    if fmt == "auto":
        name = detect_format(record)
    else:
        name = fmt
        reader = READERS.get(fmt)
        if reader is None:
            raise RecordError(f"unknown conversation format {fmt!r}; valid: {', '.join(READERS)}")
        if not columns and not (reader.fits or reader.looks_like)(record):
            other = _looks_like(record)
            hint = (f"it looks like {other}: set data.format: {other} (or auto)" if other
                    else f"it has {_describe(record)}")
            raise RecordError(f"the record does not fit format {fmt} ({reader.shape}); {hint}",
                              kind=f"does not fit format {fmt}" + (f" (looks like {other})" if other else ""))
    allowed = STAGE_FORMATS.get(stage, ()) if stage else ()
    if allowed and name not in allowed:
        readers = ", ".join(f for f in allowed if f != "auto")
        raise RecordError(f"the record looks like {name}, which stage {stage} does not read (it reads {readers})",
                          kind=f"{name} not read by stage {stage}")
    text_only = stage is not None and STAGE_MODALITY[stage] == "text"
    image_keys = ("image", "images", (columns or {}).get("images"))
    if text_only and isinstance(record, dict) and any(k and record.get(k) for k in image_keys):
        # whatever the format: an image a text stage would drop is a refused record, not a silent text-only one
        raise RecordError("the record has images; text stages train on text only (use stage sft for images)",
                          kind="images in a text stage")
    sample = READERS[name].read(record, columns or {}, tags, text_only)
    sample.messages = check_sample(sample.messages, sample.images)
    rid = record.get("id") if isinstance(record, dict) else None
    sample.id, sample.source = (None if rid is None else str(rid)), source
    return sample, name


def read_records(records: Iterable[RecordLine], fmt: str = "auto", stage: str | None = None,
                 columns: dict | None = None, tags: Tags | None = None, name: str = "") -> ReadResult:
    """(source, record, error) triples -> samples and bad records; `formats[name]` counts what each format read."""
    result, counts = ReadResult(), Counter()
    for source, record, error in records:
        if error:
            result.bad.append(BadRecord(source, None, error, "broken JSON line"))
            continue
        try:
            sample, used = read_record(record, source, fmt, stage, columns, tags)
        except ValueError as err:  # RecordError, TemplateError (roles), and any other user-data error
            result.bad.append(bad_record(source, record, err))
            continue
        result.samples.append(sample)
        counts[used] += 1
    result.formats[name] = dict(counts)
    return result


def read_source(source: DataSource, stage: str | None = None) -> ReadResult:
    """Every record of one data source (a file, or a LLaMA-Factory entry's files)."""
    result = ReadResult()
    for path in source.files:
        part = read_records(iter_file_records(path), source.format, stage, source.columns, source.tags,
                            name=path.name if len(source.files) > 1 or not source.name else source.name)
        result.extend(part)
    return result


def read_data(paths: str | list[str], fmt: str = "auto", stage: str | None = None) -> ReadResult:
    """Read data paths (files or LLaMA-Factory entries) into samples and bad records; logs the formats read."""
    result = ReadResult()
    for path in [paths] if isinstance(paths, str) else paths:
        source = data_source(path, fmt)
        part = read_source(source, stage)
        how = "as set" if source.format != "auto" else "detected"
        if part.samples:
            logger.info("data %s: %d records read as %s (format %s), %d refused", path, len(part.samples),
                        count_formats(part.formats), how, len(part.bad))
        else:
            logger.warning("data %s: no record read, %d refused (the reasons follow)", path, len(part.bad))
        result.extend(part)
    return result
