"""The one tokenizer step: template -> token ids, labels, `<image>` expansion, safe truncation.

    enc = encode_messages(messages, tokenizer, "chatml", image_token_id=..., tokens_per_image=576,
                          max_seq_len=2048)

- Labels are IGNORE_INDEX everywhere except the tokens overlapping the template's answer spans.
- Each `<image>` token becomes `tokens_per_image` copies of itself; the model later scatters the
  projector's output into exactly those positions (transformers llava does the same). Under AnyRes each image has
  its own count, from its size (`tokens_per_image` a list, one count per image in order; `EncodeSettings.anyres`).
- Truncation cuts text from the end and never splits an image: an image whose tokens do not fit
  is dropped whole, with its tokens, and `n_images` says how many images the sample keeps.

`encode_sample` is the step every caller shares (the training datasets, `llava-kit data check`): one canonical
sample, encoded whole, then the over-long policy (`data.overlong`: skip, truncate, error) applied to it, so a check
reports exactly what training does.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_kit.data.templates import IMAGE_TOKEN, render
from llava_kit.errors import DataError

IGNORE_INDEX = -100
NO_IMAGE_TOKEN = -1
"""The image token id of text-only models: no token has it, so no text is ever treated as an image."""


OVERLONG = "over-long"
"""The kind under which over-long samples are reported (llava_kit/errors.py `DataError.kind`)."""


class EncodeError(DataError):
    """A sample that cannot be trained on; the message is the reason reported for it."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int
    """Images whose tokens are in `input_ids` (the first n of the sample's images)."""
    truncated: bool
    length: int = 0
    """Tokens of the whole sample, before any truncation (what max_seq_len is compared with)."""


@dataclass
class EncodeSettings:
    """Everything the one tokenizer step needs besides the sample, as a stage's config sets it."""

    tokenizer: object
    template: str
    max_seq_len: int
    overlong: str = "skip"
    """skip | truncate | error (data.overlong); skip and error both raise EncodeError (kind OVERLONG) here."""
    system_prompt: str | None = None
    image_token_id: int = NO_IMAGE_TOKEN
    tokens_per_image: int = 0
    anyres: object | None = None
    """AnyRes (llava_kit.model.anyres.AnyRes, given by the model): `anyres.sample_tokens(sizes)` is the token count
    of each of a sample's images from their (height, width); None: every image takes `tokens_per_image`."""

    def image_tokens(self, n_images: int, image_sizes: list | None = None) -> list[int]:
        """The token count of each of a sample's images."""
        if self.anyres is None:
            return [self.tokens_per_image] * n_images
        if image_sizes is None or len(image_sizes) != n_images:
            raise ValueError("AnyRes needs each image's size to count its tokens")
        return self.anyres.sample_tokens([tuple(size) for size in image_sizes])


def add_image_token(tokenizer) -> int:
    """Add `<image>` to the tokenizer as a special token if missing; return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _labels_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], ids: list[int]) -> list[int]:
    """Supervise each token whose characters overlap an answer span."""
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for i, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]:
            labels[i] = ids[i]
    return labels


def _expand_images(ids: list[int], labels: list[int], image_token_id: int,
                   counts: list[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Each `<image>` -> its count of placeholders (the i-th image: counts[i]); also each image's (start, stop)."""
    out_ids, out_labels, blocks = [], [], []
    images = iter(counts)
    for token, label in zip(ids, labels, strict=True):
        if token == image_token_id:
            count = next(images)
            blocks.append((len(out_ids), len(out_ids) + count))
            out_ids.extend([image_token_id] * count)
            out_labels.extend([IGNORE_INDEX] * count)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels, blocks


def _truncate(ids: list[int], labels: list[int], blocks: list[tuple[int, int]], max_seq_len: int) -> tuple[list, list,
                                                                                                          int]:
    """Cut to max_seq_len, moving the cut before an image whose tokens it would split; also the images kept."""
    cut = max_seq_len
    for start, stop in blocks:
        if start < cut < stop:
            cut = start
    return ids[:cut], labels[:cut], sum(1 for _, stop in blocks if stop <= cut)


def encode_messages(messages: list[dict], tokenizer, template: str, image_token_id: int,
                    tokens_per_image: int | list[int], max_seq_len: int | None, n_images: int = 0,
                    system_prompt: str | None = None, add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> Encoded:
    """Tokenize one conversation for training (or, with add_generation_prompt, for chat).

    `n_images` is how many images the sample carries; it must equal the number of `<image>` tags.
    `tokens_per_image`: the placeholders of every image, or a list with each image's own (AnyRes).
    `max_seq_len` None never truncates (prompts at inference: the caller checks the model's position limit).
    `tools` are the JSON schemas the conversation's tool calls refer to (rendered by the template).
    Raises EncodeError with the reason when the sample is unusable.
    """
    rendered = render(messages, tokenizer, template, system_prompt, add_generation_prompt, tools)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = _labels_from_spans(enc["offset_mapping"], rendered.label_spans, ids)
    found = ids.count(image_token_id)
    if found != n_images:
        raise EncodeError(f"{found} `<image>` tag(s) in the text but {n_images} image(s) in the record",
                          kind="`<image>` tags do not match the images")
    counts = list(tokens_per_image) if isinstance(tokens_per_image, list | tuple) else [tokens_per_image] * found
    if len(counts) != found:
        raise ValueError(f"{len(counts)} token counts for {found} images")
    ids, labels, blocks = _expand_images(ids, labels, image_token_id, counts)
    length = len(ids)

    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels, n_images = _truncate(ids, labels, blocks, max_seq_len)
    if not add_generation_prompt and all(label == IGNORE_INDEX for label in labels):
        why = "truncated away by max_seq_len" if truncated else "the answers are empty or the template matched none"
        raise EncodeError(f"no supervised tokens left ({why})", kind="no supervised tokens left")
    return Encoded(ids, labels, n_images, truncated, length)


def encode_sample(messages: list[dict], n_images: int, tools: list[dict] | None,
                  settings: EncodeSettings, image_sizes: list | None = None) -> Encoded:
    """Encode one training sample whole, then apply the over-long policy (`image_sizes`: each image's (height,
    width), which AnyRes counts tokens from).

    Under `truncate` a longer sample is cut (text from the end, images whole); under `skip` and `error` it raises
    EncodeError of kind OVERLONG, whose caller skips it or stops the run. `Encoded.length` is the whole sample's
    token count either way (the over-long check of a dataset suggests a max_seq_len from these).
    """
    s = settings
    limit = s.max_seq_len if s.overlong == "truncate" else None
    counts = s.image_tokens(n_images, image_sizes) if s.anyres is not None else s.tokens_per_image
    enc = encode_messages(messages, s.tokenizer, s.template, s.image_token_id, counts, limit,
                          n_images=n_images, system_prompt=s.system_prompt, tools=tools)
    if enc.length > s.max_seq_len and s.overlong != "truncate":
        error = EncodeError(f"over-long sample: {enc.length} tokens > data.max_seq_len {s.max_seq_len} "
                            f"(data.overlong: {s.overlong})", kind=OVERLONG)
        error.length = enc.length
        raise error
    return enc
