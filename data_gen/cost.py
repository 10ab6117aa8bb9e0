"""Token and cost estimates before spending (--dry-run), and the cost of what a run used.

Prices are USD per million tokens, published list prices as of 2025; they change, so the table is a
starting point: `--price IN,OUT` or `--price-table FILE.json` override it. A model name matches the
longest table key it starts with (`gpt-4o-2024-08-06` -> `gpt-4o`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from data_gen.images import image_tokens, upload_size


@dataclass(frozen=True)
class Price:
    """List price of one model."""

    input: float
    """USD per 1M input tokens."""
    output: float
    """USD per 1M output tokens."""
    image_multiplier: float = 1.0
    """Image tokens are multiplied by this (gpt-4o-mini bills an image like ~33x the tiles)."""
    image_patches: bool = False
    """Images counted in 32-px patches (gpt-4.1-mini/nano, o4-mini) instead of 512-px tiles."""


PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-2024-05-13": Price(5.00, 15.00),
    "gpt-4o-mini": Price(0.15, 0.60, image_multiplier=2833 / 85),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60, image_multiplier=1.62, image_patches=True),
    "gpt-4.1-nano": Price(0.10, 0.40, image_multiplier=2.46, image_patches=True),
    "o4-mini": Price(1.10, 4.40, image_multiplier=1.72, image_patches=True),
}
BATCH_DISCOUNT = 0.5


class PriceTableError(ValueError):
    """A --price or --price-table value that cannot be used; the message says how to write it."""


def parse_price(text: str) -> Price:
    """`"2.5,10"` -> Price(input=2.5, output=10)."""
    try:
        input_price, output_price = (float(part) for part in text.split(","))
    except ValueError:
        raise PriceTableError(
            f"--price {text!r}: expected INPUT,OUTPUT in USD per 1M tokens, e.g. --price 2.5,10") from None
    if input_price < 0 or output_price < 0:
        raise PriceTableError(f"--price {text!r}: prices cannot be negative")
    return Price(input_price, output_price)


def load_price_table(path: Path) -> dict[str, Price]:
    """The built-in table updated from a JSON file `{"model": {"input": 2.5, "output": 10}, ...}`."""
    example = '{"my-model": {"input": 2.5, "output": 10.0, "image_multiplier": 1.0}}'
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PriceTableError(f"cannot read --price-table {path}: {exc}. Expected JSON like {example}") from exc
    if not isinstance(raw, dict):
        raise PriceTableError(f"--price-table {path}: expected a JSON object like {example}")
    table = dict(PRICES)
    for model, entry in raw.items():
        try:
            table[model] = Price(**entry)
        except TypeError as exc:
            raise PriceTableError(f"--price-table {path}, entry {model!r}: {exc}. Expected {example}") from exc
    return table


def find_price(model: str, table: dict[str, Price]) -> Price | None:
    """The price of `model`: exact key, else the longest key it starts with, else None."""
    if model in table:
        return table[model]
    matches = [key for key in table if model.startswith(key)]
    return table[max(matches, key=len)] if matches else None


def _patch_tokens(width: int, height: int) -> int:
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches > 1536:  # the API scales the image down until it fits 1536 patches
        scale = math.sqrt(1536 / patches)
        patches = min(1536, math.ceil(width * scale / 32) * math.ceil(height * scale / 32))
    return patches


def request_image_tokens(width: int, height: int, detail: str, price: Price | None) -> int:
    """Billed input tokens of one image for this model."""
    if price is not None and price.image_patches:
        w, h = upload_size(width, height, "low" if detail == "low" else "high")
        return math.ceil(_patch_tokens(w, h) * price.image_multiplier)
    multiplier = price.image_multiplier if price is not None else 1.0
    return math.ceil(image_tokens(width, height, detail) * multiplier)


@dataclass
class Estimate:
    """What a run would send and roughly cost."""

    requests: int
    input_tokens: int
    output_tokens: int
    usd: float | None
    """None when the model has no price."""


def estimate(sizes: list[tuple[int, int]], detail: str, prompt_chars: int, output_tokens: int,
             price: Price | None, batch: bool) -> Estimate:
    """Estimate for one request per image size; text tokens are counted as characters / 4."""
    text_tokens = prompt_chars // 4 + 10  # +10: message framing
    input_tokens = sum(request_image_tokens(w, h, detail, price) + text_tokens for w, h in sizes)
    total_output = output_tokens * len(sizes)
    return Estimate(len(sizes), input_tokens, total_output, cost(input_tokens, total_output, price, batch))


def cost(input_tokens: int, output_tokens: int, price: Price | None, batch: bool) -> float | None:
    """USD for these token counts (None without a price)."""
    if price is None:
        return None
    usd = (input_tokens * price.input + output_tokens * price.output) / 1e6
    return usd * (BATCH_DISCOUNT if batch else 1.0)
