"""Pre-flight check of LLaVA data: every bad record with its reason, before any training.

    llava-kit data check data.json --image-root images/ [--model DIR_OR_CONFIG]

Checks what training would refuse: broken JSON lines, bad roles, empty answers, `<image>` counts
that do not match the images, missing, unreadable or escaping image paths, and (with a tokenizer)
samples that are too long or whose answers are all masked. Ends with `valid: N invalid: M`.

Text data (`--format text|alpaca|sharegpt|openai|moss|auto`, or a text-stage `--config`) goes through
the text readers, and with a config through the same encoding as `text-pt` / `text-sft` training.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_kit.data.encode import EncodeError, encode_messages
from llava_kit.data.formats import BadRecord, read_llava
from llava_kit.data.images import ImageLoadError, load_image, resolve_image_path


@dataclass
class TokenCheck:
    """What is needed to check lengths and label masks like training does."""

    tokenizer: object
    template: str
    image_token_id: int
    tokens_per_image: int
    max_seq_len: int


def check_records(paths: str | list[str], image_root: str, tokens: TokenCheck | None = None,
                  decode_images: bool = True) -> tuple[int, list[BadRecord]]:
    """Return (number of valid records, bad records with reasons)."""
    result = read_llava(paths)
    bad = list(result.bad)
    valid = 0
    for sample in result.samples:
        try:
            for image in sample.images:
                path = resolve_image_path(image, image_root)
                if decode_images:
                    load_image(path)
            if tokens is not None:
                enc = encode_messages(sample.messages, tokens.tokenizer, tokens.template, tokens.image_token_id,
                                      tokens.tokens_per_image, tokens.max_seq_len, n_images=len(sample.images))
                if enc.truncated:
                    raise EncodeError(f"over-long sample: more than max_seq_len={tokens.max_seq_len} tokens "
                                      f"(would be truncated, keeping {enc.n_images} of {len(sample.images)} image(s))")
        except (ImageLoadError, EncodeError, ValueError) as err:
            bad.append(BadRecord(sample.source, sample.id, str(err)))
            continue
        valid += 1
    return valid, bad



def check_text_records(paths: list[str], data, stage: str, tokenizer=None) -> tuple[int, list[BadRecord]]:
    """Text data (`text-pt` / `text-sft` formats): (valid records, bad records) as training would see them.

    With a tokenizer (from a config) the records are also encoded like training does, so over-long and fully
    masked conversations are found too; without one only the readers run.
    """
    from llava_kit.data.text import dataset_specs, encode_dataset, iter_records
    from llava_kit.data.text_formats import read_conversation_records

    data = data.model_copy(update={"path": list(paths), "datasets": [], "packing": False})
    valid, bad = 0, []
    for spec in dataset_specs(data):
        if tokenizer is not None:
            encoded, _ = encode_dataset(spec, tokenizer, data, stage, cache=None)
            valid += len(encoded.input_ids)
            bad += [BadRecord(**b) for b in encoded.meta["bad"]]
        elif stage == "text-pt":
            for source, record, error in iter_records(spec):
                text = record.get("text") if isinstance(record, dict) else None
                if error or not isinstance(text, str) or not text.strip():
                    bad.append(BadRecord(source, None, error or "missing or empty `text`"))
                else:
                    valid += 1
        else:
            samples, wrong = read_conversation_records(iter_records(spec), spec.format)
            valid, bad = valid + len(samples), bad + wrong
    return valid, bad
