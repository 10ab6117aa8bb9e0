"""Preference pairs: one prompt, a chosen answer and a rejected one -> `PreferencePair`, bad records with reasons.

    result = read_pairs(["data/rlaif_v.jsonl"], fmt="auto", stage="dpo")
    result.pairs, result.bad, result.formats

Formats (config.PREFERENCE_FORMATS; `auto` detects each record's from its keys, as the conversation readers do):

| name              | a record                                                                                      |
|-------------------|-----------------------------------------------------------------------------------------------|
| pairwise          | LLaMA-Factory's pairwise data: `conversations` (or `messages`) ending with the user's turn,    |
|                   | `chosen` and `rejected` (a turn `{"from": "gpt", "value"}` or a string), `images`, `system`,   |
|                   | `tools`; or its alpaca form `instruction`, `input`, `chosen`, `rejected`                       |
| rlaif-v           | RLAIF-V / VLFeedback (and TRL's) layout: `question` (or `prompt`: a string or a list of        |
|                   | messages), `chosen`, `rejected` (strings or lists of messages), `image` (or `images`)          |
| openai-preference | OpenAI's preference fine-tuning JSONL: `input: {"messages", "tools"}`, `preferred_output` and  |
|                   | `non_preferred_output` (lists with one assistant message)                                     |

In `rlaif-v` records an image without an `<image>` tag in the prompt (RLAIF-V's questions have none) is placed
before the first user text; the other formats need the tags (or image parts), as the conversation readers do. Every pair passes the conversation rules twice (sample.check_sample): prompt + chosen, prompt + rejected.
LLaMA-Factory entries with `ranking: true` are read as `pairwise` by the preference stages (dataset_info.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llava_kit.config import STAGE_FORMATS, STAGE_MODALITY
from llava_kit.data.readers.chat import Tags, Turns, refuse_video
from llava_kit.data.readers.dataset_info import DataSource, data_source
from llava_kit.data.readers.files import RecordLine, iter_file_records
from llava_kit.data.readers.openai import merge_user_turns
from llava_kit.data.readers.sample import BadRecord, Sample, bad_record, check_sample, count_formats, tool_schemas
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.errors import RecordError

logger = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    """One prompt (messages ending with the user's turn) and two answers to it, the chosen one preferred."""

    id: str | None
    images: list[str]
    """Image paths (or `data:` URLs), one per `<image>` tag of the prompt, shared by both answers."""
    prompt: list[dict]
    chosen: dict
    """The preferred assistant message."""
    rejected: dict
    source: str = ""
    tools: list[dict] = field(default_factory=list)

    def sample(self, which: str) -> Sample:
        """The conversation prompt + the `chosen` or `rejected` answer, as a canonical sample."""
        answer = self.chosen if which == "chosen" else self.rejected
        return Sample(self.id, self.images, [*self.prompt, answer], self.source, self.tools)


@dataclass
class PairResult:
    pairs: list[PreferencePair] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    formats: dict[str, dict[str, int]] = field(default_factory=dict)

    def extend(self, other: PairResult) -> None:
        self.pairs += other.pairs
        self.bad += other.bad
        self.formats.update(other.formats)


def _answer(value, key: str, parser: Turns) -> dict:
    """An answer given as a string, one turn, or a list of messages (the last one, an assistant's)."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"`{key}` is empty", kind="empty answer")
        return {"role": "assistant", "content": value}
    if isinstance(value, list) and value:
        value = value[-1]
    if not isinstance(value, dict):
        raise RecordError(f"`{key}` must be an answer: a string, a turn ({{\"from\": \"gpt\", \"value\": ...}}) or a "
                          f"list of messages; got {type(value).__name__}", kind="answer not a string or turn")
    message = parser.turn(value, 0)
    if message["role"] != "assistant":
        raise RecordError(f"`{key}` is a {message['role']} turn; the answers of a pair are the assistant's",
                          kind="answer not an assistant turn")
    return message


def _pair(prompt: list[dict], record: dict, chosen_key: str, rejected_key: str, parser: Turns,
          images_value, images_key: str, tools: list[dict], untagged_images: bool = False) -> PreferencePair:
    chosen = _answer(record.get(chosen_key), chosen_key, parser)
    rejected = _answer(record.get(rejected_key), rejected_key, parser)
    if IMAGE_TOKEN in chosen["content"] or IMAGE_TOKEN in rejected["content"]:
        raise RecordError("`<image>` appears in an answer; images belong in the prompt",
                          kind="`<image>` outside a user turn")
    prompt = merge_user_turns(prompt)
    listed = [images_value] if isinstance(images_value, str) else images_value
    if untagged_images and listed and not parser.slots and isinstance(listed, list):
        # RLAIF-V and VLFeedback questions carry no tag: the images go before the first user text
        first = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
        if first is not None:
            prompt[first] = {**prompt[first], "content": IMAGE_TOKEN * len(listed) + "\n" + prompt[first]["content"]}
            parser.slots += [None] * len(listed)
    images = parser.images(images_value, images_key)
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("the prompt must end with the user's turn (the answers follow it)",
                          kind="prompt does not end with a user turn")
    return PreferencePair(None, images, prompt, chosen, rejected, tools=tools)


def looks_like_pairwise(record) -> bool:
    return isinstance(record, dict) and "chosen" in record and "rejected" in record and \
        any(k in record for k in ("conversations", "messages", "instruction"))


def read_pairwise(record: dict, columns: dict, tags: Tags | None, text_only: bool) -> PreferencePair:
    """LLaMA-Factory's pairwise record (ShareGPT or alpaca form) -> PreferencePair."""
    parser = Turns(tags, text_only)
    if (columns.get("prompt") or "instruction") in record and not columns.get("messages"):
        text = record.get(columns.get("prompt") or "instruction")
        query = record.get(columns.get("query") or "input")
        if not isinstance(text, str) or not text.strip():
            raise RecordError("`instruction` is empty", kind="empty prompt")
        text = text + ("\n\n" + query if isinstance(query, str) and query.strip() else "")
        prompt = [parser.turn({"role": "user", "content": text}, 1)]
    else:
        key = columns.get("messages") or ("conversations" if "conversations" in record else "messages")
        turns = record.get(key)
        if not isinstance(turns, list) or not turns:
            raise RecordError(f"missing or empty `{key}` list", kind="missing or empty list of turns")
        prompt = parser.messages(turns)
    system = record.get(columns.get("system") or "system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in prompt):
        prompt.insert(0, {"role": "system", "content": system})
    images_key = columns.get("images") or ("images" if "images" in record else "image")
    tools_key = columns.get("tools") or "tools"
    return _pair(prompt, record, columns.get("chosen") or "chosen", columns.get("rejected") or "rejected", parser,
                 record.get(images_key), images_key, tool_schemas(record.get(tools_key), tools_key))


def looks_like_rlaif_v(record) -> bool:
    return isinstance(record, dict) and "chosen" in record and "rejected" in record and \
        any(k in record for k in ("question", "prompt"))


def read_rlaif_v(record: dict, columns: dict, tags: Tags | None, text_only: bool) -> PreferencePair:
    """RLAIF-V / VLFeedback / TRL layout -> PreferencePair."""
    parser = Turns(tags, text_only)
    key = "question" if "question" in record else "prompt"
    question = record.get(key)
    if isinstance(question, str):
        if not question.strip():
            raise RecordError(f"`{key}` is empty", kind="empty prompt")
        prompt = [parser.turn({"role": "user", "content": question}, 1)]
    elif isinstance(question, list) and question:
        prompt = parser.messages(question)
    else:
        raise RecordError(f"`{key}` must be the question (a string) or a list of messages",
                          kind="prompt not a string or messages")
    images_key = "images" if "images" in record else "image"
    images = record.get(images_key)
    if isinstance(images, dict) or isinstance(images, list) and any(isinstance(i, dict) for i in images):
        raise RecordError(f"`{images_key}` holds image data (the hub's parquet form); write the images to files and "
                          "give their paths", kind="image data instead of a path")
    return _pair(prompt, record, "chosen", "rejected", parser, images, images_key, [], untagged_images=True)


def looks_like_openai_preference(record) -> bool:
    return isinstance(record, dict) and "input" in record and "preferred_output" in record


def read_openai_preference(record: dict, columns: dict, tags: Tags | None, text_only: bool) -> PreferencePair:
    """OpenAI's preference fine-tuning record -> PreferencePair."""
    parser = Turns(tags, text_only)
    given = record.get("input")
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list) or not given["messages"]:
        raise RecordError("`input` must be an object with a non-empty `messages` list",
                          kind="missing or empty list of turns")
    prompt = parser.messages(given["messages"])
    if "non_preferred_output" not in record:
        raise RecordError("`non_preferred_output` is missing", kind="missing rejected answer")
    return _pair(prompt, record, "preferred_output", "non_preferred_output", parser, given.get("images"), "images",
                 tool_schemas(given.get("tools"), "input.tools"))


@dataclass(frozen=True)
class PairReader:
    """One preference format: how its records look and how one is read."""

    name: str
    looks_like: Callable[[object], bool]
    read: Callable[[dict, dict, Tags | None, bool], PreferencePair]
    shape: str


PREFERENCE_READERS = {  # in detection order
    "openai-preference": PairReader("openai-preference", looks_like_openai_preference, read_openai_preference,
                                    "`input`, `preferred_output`, `non_preferred_output`"),
    "pairwise": PairReader("pairwise", looks_like_pairwise, read_pairwise,
                           "`conversations` (or `instruction`) with `chosen` and `rejected`"),
    "rlaif-v": PairReader("rlaif-v", looks_like_rlaif_v, read_rlaif_v, "`question` (or `prompt`), `chosen`, `rejected`"),
}


def _looks_like(record) -> str | None:
    return next((name for name, reader in PREFERENCE_READERS.items() if reader.looks_like(record)), None)


def is_pair_record(record) -> bool:
    """Whether a record has the shape of one of the preference formats (what `auto` would read as a pair)."""
    return isinstance(record, dict) and _looks_like(record) is not None


def _not_a_pair(record) -> str:
    """Why a record is no preference pair, naming what it looks like."""
    from llava_kit.data.readers import _looks_like as conversation_format

    shapes = "; ".join(f"{name} ({reader.shape})" for name, reader in PREFERENCE_READERS.items())
    other = conversation_format(record)
    what = (f"the record is {other} data (one answer per conversation): it trains with stage sft (text-sft) "
            if other else f"the record has keys {', '.join(sorted(map(str, record))[:8])}; "
            if isinstance(record, dict) else f"the record is a JSON {type(record).__name__}; ")
    return f"{what}the preference stages read pairs: {shapes}"


def read_pair(record, source: str, fmt: str = "auto", stage: str | None = None, columns: dict | None = None,
              tags: Tags | None = None) -> tuple[PreferencePair, str]:
    """One record -> (checked PreferencePair, the format that read it); raises RecordError with the reason."""
    if not isinstance(record, dict):
        raise RecordError(_not_a_pair(record), kind="not a preference pair")
    refuse_video(record, columns or {})
    name = _looks_like(record) if fmt == "auto" else fmt
    if name is None:
        raise RecordError(_not_a_pair(record), kind="not a preference pair")
    reader = PREFERENCE_READERS.get(name)
    if reader is None:
        raise RecordError(f"{name!r} is no preference format; valid: {', '.join(PREFERENCE_READERS)}",
                          kind=f"{name} not a preference format")
    if fmt != "auto" and not columns and not reader.looks_like(record):
        other = _looks_like(record)
        hint = f"it looks like {other}: set data.format: {other} (or auto)" if other else _not_a_pair(record)
        raise RecordError(f"the record does not fit format {fmt} ({reader.shape}); {hint}",
                          kind=f"does not fit format {fmt}")
    allowed = STAGE_FORMATS.get(stage, ()) if stage else ()
    if allowed and name not in allowed:
        raise RecordError(f"the record is {name}, which stage {stage} does not read", kind=f"{name} not read by {stage}")
    text_only = stage is not None and STAGE_MODALITY[stage] == "text"
    pair = reader.read(record, columns or {}, tags, text_only)
    if text_only and pair.images:
        raise RecordError("the record has images; text-dpo trains on text only (use stage dpo for images)",
                          kind="images in a text stage")
    for which in ("chosen", "rejected"):
        try:
            messages = check_sample(pair.sample(which).messages, pair.images)
        except RecordError as err:
            raise RecordError(f"{which}: {err}", kind=err.kind) from None
    pair.prompt = messages[:-1]  # check_sample may drop an empty system message
    if pair.chosen["content"] == pair.rejected["content"] and not pair.chosen.get("tool_calls"):
        raise RecordError("the chosen and rejected answers are the same text: nothing to prefer",
                          kind="chosen equals rejected")
    rid = record.get("id")
    pair.id, pair.source = (None if rid is None else str(rid)), source
    return pair, name


def read_pair_records(records: Iterable[RecordLine], fmt: str = "auto", stage: str | None = None,
                      columns: dict | None = None, tags: Tags | None = None, name: str = "") -> PairResult:
    """(source, record, error) triples -> pairs and bad records; `formats[name]` counts what each format read."""
    result, counts = PairResult(), Counter()
    for source, record, error in records:
        if error:
            result.bad.append(BadRecord(source, None, error, "broken JSON line"))
            continue
        try:
            pair, used = read_pair(record, source, fmt, stage, columns, tags)
        except ValueError as err:
            result.bad.append(bad_record(source, record, err))
            continue
        result.pairs.append(pair)
        counts[used] += 1
    result.formats[name] = dict(counts)
    return result


def read_pairs(paths: str | list[str], fmt: str = "auto", stage: str | None = None) -> PairResult:
    """Read data paths (files or LLaMA-Factory `ranking` entries) into pairs and bad records; logs the formats."""
    result = PairResult()
    for path in [paths] if isinstance(paths, str) else paths:
        source: DataSource = data_source(path, fmt, preference=True)
        for file in source.files:
            label = file.name if len(source.files) > 1 or not source.name else source.name
            part = read_pair_records(iter_file_records(file), source.format, stage, source.columns, source.tags,
                                     name=label)
            result.extend(part)
        how = "as set" if source.format != "auto" else "detected"
        n_pairs = sum(sum(c.values()) for c in result.formats.values())
        logger.info("data %s: %d pairs read as %s (format %s), %d refused so far", path, n_pairs,
                    count_formats(result.formats), how, len(result.bad))
    return result
