"""The synthetic shapes dataset: geometry, colours, determinism, file layout and the answer scorer."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest

from llava_kit.demo.shapes import (
    BACKGROUNDS,
    COLOR_JITTER,
    COLORS,
    QUESTIONS,
    SHAPES,
    ShapeSize,
    ShapeSpec,
    answer_for,
    draw_shape_image,
    score_answer,
    write_shapes_dataset,
)
from llava_kit.errors import UsageError


def _shape_pixels(image, background):
    width, height = image.size
    pixels = image.load()
    return [(x, y) for y in range(height) for x in range(width) if pixels[x, y] != background]


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_inside_canvas_with_its_colour_and_plausible_area(shape):
    rng = random.Random(1)
    for trial in range(12):
        color = list(COLORS)[trial % len(COLORS)]
        background = list(BACKGROUNDS)[trial % 2]
        width, height = rng.randint(96, 256), rng.randint(96, 256)
        image = draw_shape_image(rng, shape, color, width, height, background)
        assert image.mode == "RGB" and image.size == (width, height)
        bg = BACKGROUNDS[background]
        pixels = image.load()
        border = [(x, 0) for x in range(width)] + [(x, height - 1) for x in range(width)]
        border += [(0, y) for y in range(height)] + [(width - 1, y) for y in range(height)]
        assert all(pixels[p] == bg for p in border), f"{shape} touches the edge of a {width}x{height} image"

        inside = _shape_pixels(image, bg)
        area = len(inside) / min(width, height) ** 2
        # Circumscribed diameter 30-60% of the shorter side: the smallest shape here (a triangle or star
        # at 30%) covers ~0.03 of shorter_side**2, the largest (a circle at 60%) ~0.28.
        assert 0.02 < area < 0.3, f"{shape} covers {area:.3f} of shorter_side**2"

        cx = round(sum(x for x, _ in inside) / len(inside))
        cy = round(sum(y for _, y in inside) / len(inside))
        centre = pixels[cx, cy]
        assert all(abs(c - b) <= COLOR_JITTER for c, b in zip(centre, COLORS[color], strict=True)), (
            f"{shape} centroid pixel {centre} is not {color} {COLORS[color]}"
        )


def test_drawing_is_deterministic_for_a_seed():
    first = draw_shape_image(random.Random(7), "star", "blue", 120, 200).tobytes()
    again = draw_shape_image(random.Random(7), "star", "blue", 120, 200).tobytes()
    other = draw_shape_image(random.Random(8), "star", "blue", 120, 200).tobytes()
    assert first == again
    assert first != other


def test_unknown_shape_or_colour_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="circle, square, triangle, star"):
        draw_shape_image(random.Random(0), "hexagon", "red", 100, 100)
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        draw_shape_image(random.Random(0), "circle", "pink", 100, 100)


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_dataset_files_layout_and_determinism(tmp_path):
    paths = write_shapes_dataset(tmp_path / "a", n_train=30, n_eval=6, seed=3, min_side=64, max_side=96)
    write_shapes_dataset(tmp_path / "b", n_train=30, n_eval=6, seed=3, min_side=64, max_side=96)
    write_shapes_dataset(tmp_path / "c", n_train=30, n_eval=6, seed=4, min_side=64, max_side=96)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")

    assert len(list((paths["images"] / "train").glob("*.png"))) == 30
    assert len(list((paths["images"] / "eval").glob("*.png"))) == 6

    pretrain = json.loads(paths["pretrain"].read_text())
    assert len(pretrain) == 30
    for sample in pretrain:
        assert (paths["images"] / sample["image"]).is_file()
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert gpt["from"] == "gpt" and gpt["value"].startswith("A ")

    sft = json.loads(paths["sft"].read_text())
    assert len(sft) == 30
    for sample in sft:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        asked = {t["value"].removeprefix("<image>\n") for t in turns[::2]}
        assert asked == set(QUESTIONS.values())
    # Balanced: 30 images over 24 shape x colour combinations -> each shape 7 or 8 times.
    shape_counts = {s: sum(f"{s} on" in x["conversations"][1]["value"] for x in pretrain) for s in SHAPES}
    assert set(shape_counts.values()) <= {7, 8}

    records = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert len(records) == 6 * len(QUESTIONS)
    assert len({r["image"] for r in records}) == 6
    for record in records:
        assert record["question"] == QUESTIONS[record["kind"]]
        assert record["image"].startswith("eval/") and "<image>" not in record["question"]
        spec = ShapeSpec(record["shape"], record["color"], record["width"], record["height"], record["background"])
        assert score_answer(record["kind"], answer_for(record["kind"], spec), spec)


RED_CIRCLE = ShapeSpec("circle", "red", 120, 100, "light gray")

SCORE_TABLE = [
    # kind, answer, expected
    ("shape", "It is a circle.", True),
    ("shape", "CIRCLE", True),
    ("shape", "It is a red circle.", True),
    ("shape", "There are two circles.", True),
    ("shape", "It is a square.", False),
    ("shape", "It is a circle or a square.", False),
    ("shape", "A circle next to stars.", False),
    ("shape", "It is a blue circle.", False),
    ("shape", "It is a circular thing.", False),
    ("shape", "", False),
    ("color", "The shape is red.", True),
    ("color", "Red.", True),
    ("color", "The circle is red.", True),
    ("color", "The shape is red on a light gray background.", True),
    ("color", "The shape is orange.", False),
    ("color", "The shape is red and yellow.", False),
    ("color", "The shape is reddish.", False),
    ("color", "The shape is gray.", False),
    ("color", "The triangle is red.", False),
    ("describe", "A red circle on a light gray background.", True),
    ("describe", "A red circle on a white background.", True),
    ("describe", "A red circle on a light grey background.", True),
    ("describe", "Red circles.", True),
    ("describe", "A red circle.", True),
    ("describe", "A circle on a light gray background.", False),
    ("describe", "A red square on a light gray background.", False),
    ("describe", "A red circle and a blue square.", False),
    ("describe", "A red and white circle.", False),
    ("describe", "A red circle in a red circle.", True),
]


@pytest.mark.parametrize(("kind", "answer", "expected"), SCORE_TABLE)
def test_score_answer(kind, answer, expected):
    assert score_answer(kind, answer, RED_CIRCLE) is expected


def test_reference_answers_score_right_and_other_classes_wrong():
    for shape in SHAPES:
        for color in COLORS:
            spec = ShapeSpec(shape, color, 100, 100, "white")
            for kind in QUESTIONS:
                assert score_answer(kind, answer_for(kind, spec), spec)
            wrong_shape = ShapeSpec(SHAPES[(SHAPES.index(shape) + 1) % 4], color, 100, 100)
            assert not score_answer("shape", answer_for("shape", spec), wrong_shape)
            assert not score_answer("describe", answer_for("describe", spec), wrong_shape)
    assert answer_for("describe", RED_CIRCLE) == "A red circle on a light gray background."
    assert answer_for("shape", RED_CIRCLE) == "It is a circle."
    assert answer_for("color", RED_CIRCLE) == "The shape is red."


def test_wide_canvases_keep_their_aspect_range_either_way():
    import random

    from llava_kit.demo.shapes import random_spec

    rng = random.Random(0)
    specs = [random_spec(rng, "star", "red", aspect=(2.0, 3.0)) for _ in range(200)]
    ratios = [max(s.width, s.height) / min(s.width, s.height) for s in specs]
    assert all(1.98 <= r <= 3.02 for r in ratios) and 96 <= min(min(s.width, s.height) for s in specs)
    wide = sum(s.width > s.height for s in specs)
    assert 60 < wide < 140  # wide and tall both


def test_small_shapes_span_their_size_fraction_of_the_short_side():
    rng = random.Random(2)
    spans = []
    for trial in range(24):
        image = draw_shape_image(rng, SHAPES[trial % 4], "blue", 320, 256, "white", ShapeSize(0.06, 0.10))
        inside = _shape_pixels(image, BACKGROUNDS["white"])
        xs, ys = [x for x, _ in inside], [y for _, y in inside]
        spans.append(max(max(xs) - min(xs), max(ys) - min(ys)) + 1)
    # the circumscribed diameter is 15-26 px of the 256 px short side; a shape spans at most that (+1 for rounding),
    # and a triangle at its narrowest still ~0.75 of it
    assert all(10 <= span <= 27 for span in spans) and max(spans) > 20
    with pytest.raises(UsageError, match=r"shape size must be \(low, high\) fractions .* got \(0.5, 0.2\)"):
        ShapeSize(0.5, 0.2)


def test_equal_area_shapes_cover_the_same_area():
    rng = random.Random(3)
    areas = {shape: [] for shape in SHAPES}
    for trial in range(40):
        shape = SHAPES[trial % 4]
        image = draw_shape_image(rng, shape, "red", 200, 200, "white", ShapeSize(0.3, 0.3, equal_area=True))
        areas[shape].append(len(_shape_pixels(image, BACKGROUNDS["white"])))
    circle = math.pi * 30**2  # a circle 30% of 200 px across
    assert all(abs(sum(a) / len(a) / circle - 1) < 0.05 for a in areas.values()), areas
