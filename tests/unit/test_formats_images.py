"""Readers keep every bad record with its reason; images load safely into RGB."""

import json

import numpy as np
import pytest
from PIL import Image

from llava_kit.data.images import ImageLoadError, load_image, pad_to_square, resolve_image_path
from llava_kit.data.readers import read_data


def read_llava(paths):
    return read_data(paths, "llava")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


def test_llava_json_and_jsonl_multi_turn_multi_image(tmp_path):
    records = [
        {"id": "a", "image": "x.png", "conversations": conv(("human", "<image>\nQ1"), ("gpt", "A1"),
                                                             ("human", "Q2"), ("gpt", "A2"))},
        {"id": "b", "image": ["x.png", "y.png"], "conversations": conv(("human", "<image><image> same?"), ("gpt", "no"))},
        {"id": "c", "conversations": conv(("system", "be nice"), ("human", "hi"), ("gpt", "hello"))},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    result = read_llava(str(tmp_path / "d.json"))
    assert [s.id for s in result.samples] == ["a", "b", "c"] and not result.bad
    assert result.samples[1].images == ["x.png", "y.png"]
    assert [m["role"] for m in result.samples[2].messages] == ["system", "user", "assistant"]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    assert len(read_llava(jsonl).samples) == 3


@pytest.mark.parametrize("line, reason", [
    ("{not json", "broken JSON line"),
    (json.dumps({"image": "x.png", "conversations": conv(("human", "<image>"), ("robot", "A"))}), "unknown role"),
    (json.dumps({"image": "x.png", "conversations": conv(("human", "<image>"), ("gpt", "  "))}), "empty answer"),
    (json.dumps({"image": "x.png", "conversations": conv(("human", "no tag"), ("gpt", "A"))}), "0 `<image>` tag"),
    (json.dumps({"conversations": conv(("gpt", "A"), ("human", "Q"))}), "bad roles"),
    (json.dumps({"conversations": conv(("human", "Q"))}), "does not end with an answer"),
    (json.dumps({"conversations": []}), "missing or empty"),
])
def test_bad_records_are_kept_with_reasons(tmp_path, line, reason):
    good = json.dumps({"id": "ok", "conversations": conv(("human", "Q"), ("gpt", "A"))})
    result = read_llava(write_jsonl(tmp_path / "d.jsonl", [good, line]))
    assert [s.id for s in result.samples] == ["ok"]
    assert len(result.bad) == 1 and reason in result.bad[0].reason and result.bad[0].source == "d.jsonl:2"


def test_image_path_must_stay_inside_root(tmp_path):
    (tmp_path / "root").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    with pytest.raises(ImageLoadError, match="outside the image root"):
        resolve_image_path("../outside.png", tmp_path / "root")
    with pytest.raises(ImageLoadError, match="not found"):
        resolve_image_path("missing.png", tmp_path / "root")


def test_modes_become_rgb_alpha_composited_16bit_scaled(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # half of 16-bit range
    sixteen.save(tmp_path / "b.png")
    value = load_image(tmp_path / "b.png").getpixel((0, 0))
    assert value[0] == value[1] == value[2] and 120 <= value[0] <= 135  # scaled, not clipped to 255
    Image.new("P", (4, 4)).save(tmp_path / "c.gif")
    assert load_image(tmp_path / "c.gif").mode == "RGB"
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "d.jpg")
    assert load_image(tmp_path / "d.jpg").mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (4, 8)


def test_animated_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = load_image(tmp_path / "anim.gif").getpixel((0, 0))
    assert r > 200 and b < 50


def test_unreadable_and_bomb_images_are_refused(tmp_path, monkeypatch):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr("llava_kit.data.images.MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_pad_to_square_centres_on_background():
    img = pad_to_square(Image.new("RGB", (10, 4), (255, 0, 0)), (1, 2, 3))
    assert img.size == (10, 10) and img.getpixel((0, 0)) == (1, 2, 3) and img.getpixel((5, 5)) == (255, 0, 0)
