"""The synthetic shapes task: one filled shape on a plain background, with questions and a scorer.

    from llava_kit.demo.shapes import write_shapes_dataset
    write_shapes_dataset("work/shapes", n_train=3000, n_eval=100, seed=0)

Images have any size and aspect ratio (each side drawn from `min_side`..`max_side`), a white or
light-gray background and exactly one shape (circle, square, triangle or star) in one of six colours,
each RGB channel jittered by up to ±15. The shape's circumscribed circle has a diameter of 30-60% of
the shorter side and lies at least one pixel inside the canvas, so any rotation stays inside.

The demo and the tests use it: a pipeline that works learns the colour and shape questions in minutes
on CPU with tiny models; a broken one (image not reaching the LLM, labels masked wrong) stays near
chance (25% for shape, 17% for colour).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from llava_kit.errors import UsageError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""The shape classes."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
"""Colour name -> base RGB; each drawn shape jitters every channel by up to `COLOR_JITTER`."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (220, 220, 220),
}
"""Background name (as it appears in answers) -> RGB."""

QUESTIONS: dict[str, str] = {
    "shape": "What shape is in the image?",
    "color": "What color is the shape?",
    "describe": "Describe the image.",
}
"""Question kind -> question text."""

CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short caption of the image.",
    "What is in this picture?",
    "Summarize the visual content of the image.",
)
"""Instructions of the pretraining (captioning) samples; the `plain` template usually drops them."""

COLOR_JITTER = 15
"""Maximum absolute change of each RGB channel of a shape's colour."""

SIZE_FRACTION = (0.3, 0.6)
"""Range of the shape's circumscribed-circle diameter, as a fraction of the image's shorter side."""

STAR_INNER_RATIO = 0.45
"""Inner / outer radius of the five-pointed star (0.38 is the regular star; fatter reads better small)."""

AREA_PER_RADIUS2 = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4,
                    "star": 5 * STAR_INNER_RATIO * math.sin(math.pi / 5)}
"""Each shape's area over its circumradius squared (the star: ten triangles between outer and inner vertices)."""


@dataclass(frozen=True)
class ShapeSize:
    """How large shapes are drawn: a diameter drawn from low..high times the canvas's short side.

    `equal_area` False (the demo's): the diameter is the shape's circumscribed circle's, so at one diameter a circle
    covers 2.4x a triangle's area. True: the diameter is that of the circle of the shape's area, so the four shapes
    cover the same area and only their outline tells them apart: a blurred or squashed copy then carries no cue to
    the shape in how much colour it holds (the small-shapes task of docs/high-resolution.md)."""

    low: float = SIZE_FRACTION[0]
    high: float = SIZE_FRACTION[1]
    equal_area: bool = False

    def __post_init__(self):
        if not 0 < self.low <= self.high <= 0.9:
            raise UsageError(f"shape size must be (low, high) fractions of the short side with 0 < low <= high <= 0.9, "
                             f"got ({self.low}, {self.high})")

    def radius(self, rng: random.Random, shape: str, short_side: int) -> float:
        """The circumradius in pixels of one `shape` on a canvas whose short side is `short_side`."""
        radius = rng.uniform(self.low, self.high) * short_side / 2
        if self.equal_area:  # the radius of a circle of the same area -> this shape's circumradius
            radius *= math.sqrt(math.pi / AREA_PER_RADIUS2[shape])
        return min(radius, short_side / 2 - 3)  # stays inside the canvas with its margin

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows: the ground truth of its questions."""

    shape: str
    """One of `SHAPES`."""
    color: str
    """One of `COLORS`."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    background: str = "white"
    """One of `BACKGROUNDS`."""


def _check_choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(valid)}")


def _jittered(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at equal angular steps around (cx, cy), the first at `angle` (radians, 0 = up)."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.sin(angle + i * step), cy - r * math.cos(angle + i * step)) for i, r in enumerate(radii)]


def draw_shape_image(
    rng: random.Random, shape: str, color: str, width: int, height: int, background: str = "white",
    size: ShapeSize = ShapeSize(),
) -> Image.Image:
    """Draw one filled `shape` in a jittered `color` on a `width` x `height` RGB canvas.

    The shape's size follows `size` (default: a circumscribed circle 30-60% of the shorter side, drawn from `rng`)
    and a random centre at least one pixel from every edge; squares, triangles and stars get a random
    rotation. Drawing is not anti-aliased, so every shape pixel has exactly the jittered colour.
    """
    _check_choice("shape", shape, SHAPES)
    _check_choice("color", color, COLORS)
    _check_choice("background", background, BACKGROUNDS)
    if width < 16 or height < 16:
        raise UsageError(f"image size {width}x{height} is too small; both sides must be at least 16 px")

    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    fill = _jittered(rng, COLORS[color])
    radius = size.radius(rng, shape, min(width, height))
    # Keep a one-pixel margin (plus one for rounding) so the outermost rows and columns stay background.
    margin = radius + 2
    cx = rng.uniform(margin, width - margin)
    cy = rng.uniform(margin, height - margin)
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [radius] * 4, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [radius] * 3, angle), fill=fill)
    else:  # star
        radii = [radius if i % 2 == 0 else radius * STAR_INNER_RATIO for i in range(10)]
        draw.polygon(_polygon(cx, cy, radii, angle), fill=fill)
    return image


def random_spec(rng: random.Random, shape: str, color: str, min_side: int = 96, max_side: int = 256,
                aspect: tuple[float, float] | None = None) -> ShapeSpec:
    """A `ShapeSpec` for `shape` and `color` with random width, height and background.

    `aspect` None: width and height each drawn from min_side..max_side. Else (low, high): the short side from
    min_side..max_side, the long side that times a ratio drawn from low..high, wide or tall at random.
    """
    if not 16 <= min_side <= max_side:
        raise UsageError(f"need 16 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if aspect is None:
        width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    else:
        low, high = aspect
        if not 1 <= low <= high:
            raise UsageError(f"aspect must be (low, high) with 1 <= low <= high, got {aspect}")
        short = rng.randint(min_side, max_side)
        long_side = round(short * rng.uniform(low, high))
        width, height = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    return ShapeSpec(shape=shape, color=color, width=width, height=height, background=rng.choice(list(BACKGROUNDS)))


def draw_spec(rng: random.Random, spec: ShapeSpec, size: ShapeSize = ShapeSize()) -> Image.Image:
    """Draw the image described by `spec` (position, size, rotation and jitter come from `rng`)."""
    return draw_shape_image(rng, spec.shape, spec.color, spec.width, spec.height, spec.background, size)


def answer_for(kind: str, spec: ShapeSpec) -> str:
    """The reference answer to question `kind` (`shape`, `color` or `describe`) about `spec`."""
    _check_choice("question kind", kind, QUESTIONS)
    if kind == "shape":
        return f"It is a {spec.shape}."
    if kind == "color":
        return f"The shape is {spec.color}."
    return f"A {spec.color} {spec.shape} on a {spec.background} background."


# Words that count as naming a shape or a colour. Other colour words (pink, black, ...) count as a wrong
# colour; a background phrase ("on a light gray background") is removed before colours are looked for.
_SHAPE_WORDS = {shape: re.compile(rf"\b{shape}s?\b", re.IGNORECASE) for shape in SHAPES}
_COLOR_WORDS = {
    name: re.compile(rf"\b{name}\b", re.IGNORECASE)
    for name in (*COLORS, "white", "gray", "grey", "black", "pink", "brown", "cyan", "magenta", "violet")
}
_BACKGROUND_PHRASE = re.compile(
    r"\b(?:(?:white|(?:light|pale)[\s-]*gr[ae]y|gr[ae]y|plain)\s+)+backgrounds?\b", re.IGNORECASE
)


def _named(words: dict[str, re.Pattern], text: str) -> set[str]:
    return {name for name, pattern in words.items() if pattern.search(text)}


def score_answer(kind: str, answer: str, spec: ShapeSpec) -> bool:
    """Whether `answer` to question `kind` is right about `spec`.

    Right means it names the true shape (kind `shape`), the true colour (kind `color`) or both (kind
    `describe`), and no other shape or colour, matched case-insensitively on word boundaries (plurals
    such as "circles" count). The background phrase ("light gray background") is not a colour.
    """
    _check_choice("question kind", kind, QUESTIONS)
    text = _BACKGROUND_PHRASE.sub(" ", answer)
    shapes = _named(_SHAPE_WORDS, text)
    colors = {"gray" if c == "grey" else c for c in _named(_COLOR_WORDS, text)}
    shape_ok = shapes == {spec.shape}
    color_ok = colors == {spec.color}
    if kind == "shape":
        return shape_ok and not (colors - {spec.color})
    if kind == "color":
        return color_ok and not (shapes - {spec.shape})
    return shape_ok and color_ok


def score_record(record: dict, answer: str) -> bool:
    """The eval scorer of the shapes task (`llava-kit eval --scorer shapes`): an eval.jsonl record with `kind`,
    `shape`, `color` (and `background`) against the model's answer, by `score_answer`."""
    spec = ShapeSpec(shape=record["shape"], color=record["color"], width=0, height=0,
                     background=record.get("background", "white"))
    return score_answer(record.get("kind", "describe"), answer, spec)


score_record.required_fields = ("question", "shape", "color")


def _balanced_combos(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` (shape, colour) pairs cycling through all combinations, shuffled: classes stay balanced."""
    combos = [(shape, color) for shape in SHAPES for color in COLORS]
    out: list[tuple[str, str]] = []
    while len(out) < n:
        block = combos[:]
        rng.shuffle(block)
        out.extend(block)
    out = out[:n]
    rng.shuffle(out)
    return out


def _write_split(
    rng: random.Random, image_dir: Path, split: str, n: int, min_side: int, max_side: int,
    aspect: tuple[float, float] | None = None, size: ShapeSize = ShapeSize(),
) -> list[tuple[str, ShapeSpec]]:
    (image_dir / split).mkdir(parents=True, exist_ok=True)
    samples = []
    for index, (shape, color) in enumerate(_balanced_combos(rng, n)):
        spec = random_spec(rng, shape, color, min_side, max_side, aspect)
        rel = f"{split}/{index:06d}.png"
        draw_spec(rng, spec, size).save(image_dir / rel, compress_level=1)
        samples.append((rel, spec))
    return samples


def write_shapes_dataset(
    out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0, min_side: int = 96, max_side: int = 256,
    aspect: tuple[float, float] | None = None, size: ShapeSize = ShapeSize(),
) -> dict[str, Path]:
    """Write the shapes dataset under `out_dir`; the same `seed` gives the same files.

    `aspect` (low, high): canvases whose long side is low..high times the short one, wide or tall (`random_spec`);
    the high-resolution task of docs/high-resolution.md. None: the demo's own images. `size`: how large the shapes
    are (`ShapeSize`; small equal-area shapes on large canvases: the small-shapes task).

    Layout: `images/train/NNNNNN.png`, `images/eval/NNNNNN.png` (image paths in the JSON files are
    relative to `images/`), `pretrain.json` (LLaVA JSON: one caption sample per training image),
    `sft.json` (LLaVA JSON: per training image one conversation asking the three questions in random
    order) and `eval.jsonl` (one line per held-out image and question kind, with the ground truth).
    Returns the paths under the keys `images`, `pretrain`, `sft` and `eval`.
    """
    if n_train < 1 or n_eval < 0:
        raise UsageError(f"need n_train >= 1 and n_eval >= 0, got n_train={n_train}, n_eval={n_eval}")
    out = Path(out_dir)
    image_dir = out / "images"
    rng = random.Random(seed)
    train = _write_split(rng, image_dir, "train", n_train, min_side, max_side, aspect, size)
    held_out = _write_split(rng, image_dir, "eval", n_eval, min_side, max_side, aspect, size)

    pretrain, sft = [], []
    for rel, spec in train:
        sample_id = Path(rel).stem
        caption = rng.choice(CAPTION_INSTRUCTIONS)
        pretrain.append(
            {
                "id": f"pretrain-{sample_id}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{caption}"},
                    {"from": "gpt", "value": answer_for("describe", spec)},
                ],
            }
        )
        kinds = list(QUESTIONS)
        rng.shuffle(kinds)
        turns = []
        for turn, kind in enumerate(kinds):
            question = QUESTIONS[kind] if turn else f"{IMAGE_TOKEN}\n{QUESTIONS[kind]}"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer_for(kind, spec)}]
        sft.append({"id": f"sft-{sample_id}", "image": rel, "conversations": turns})

    paths = {
        "images": image_dir,
        "pretrain": out / "pretrain.json",
        "sft": out / "sft.json",
        "eval": out / "eval.jsonl",
    }
    paths["pretrain"].write_text(json.dumps(pretrain, indent=1) + "\n")
    paths["sft"].write_text(json.dumps(sft, indent=1) + "\n")
    with paths["eval"].open("w") as f:
        for rel, spec in held_out:
            for kind, question in QUESTIONS.items():
                record = {"id": f"eval-{Path(rel).stem}-{kind}", "image": rel, "kind": kind, "question": question}
                record.update({k: v for k, v in asdict(spec).items() if k in ("shape", "color", "background")})
                record.update(width=spec.width, height=spec.height, answer=answer_for(kind, spec))
                f.write(json.dumps(record) + "\n")
    return paths
