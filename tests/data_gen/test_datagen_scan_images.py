"""Scanning folders and preparing images for upload."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from data_gen.images import encode_image, image_tokens, load_image, upload_size
from data_gen.scan import scan_folder


def _decode(url: str) -> Image.Image:
    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_scan_is_recursive_case_insensitive_and_reports_problems(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (10, 10), "red").save(tmp_path / "one.JPG", format="JPEG")
    Image.new("RGB", (11, 10), "blue").save(tmp_path / "a" / "two.Png", format="PNG")
    Image.new("RGB", (12, 10), "green").save(tmp_path / "a" / "b" / "three.webp", format="WEBP")
    Image.new("RGB", (13, 10), "white").save(tmp_path / "a" / "four.gif", format="GIF")
    Image.new("RGB", (14, 10), "black").save(tmp_path / "five.bmp", format="BMP")
    (tmp_path / "a" / "b" / "copy.png").write_bytes((tmp_path / "a" / "two.Png").read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes((tmp_path / "five.bmp").read_bytes())

    result = scan_folder(tmp_path)

    assert [img.rel for img in result.images] == ["a/b/copy.png", "a/b/three.webp", "a/four.gif", "five.bmp",
                                                  "one.JPG"]
    assert result.files_seen == 7  # .txt and the hidden file are not candidates
    assert [(p.rel, p.reason) for p in result.unreadable] == [("broken.jpg", "unreadable")]
    # of identical files the first by path is kept: a/b/copy.png sorts before a/two.Png
    assert [(p.rel, p.reason) for p in result.duplicates] == [("a/two.Png", "duplicate")]
    assert "a/b/copy.png" in result.duplicates[0].detail
    sizes = {img.rel: (img.width, img.height) for img in result.images}
    assert sizes["five.bmp"] == (14, 10)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif)

    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)
    assert _decode(encode_image(tmp_path / "rotated.jpg", "high")).size == (20, 40)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((4, 4)) == (255, 255, 255)


def test_images_are_downscaled_per_detail(tmp_path: Path) -> None:
    Image.new("RGB", (3000, 1000), "blue").save(tmp_path / "wide.png")
    Image.new("RGB", (1600, 1200), "blue").save(tmp_path / "photo.png")
    assert _decode(encode_image(tmp_path / "wide.png", "high")).size == (2048, 683)
    assert _decode(encode_image(tmp_path / "wide.png", "low")).size == (512, 171)
    assert _decode(encode_image(tmp_path / "photo.png", "auto")).size == (1024, 768)  # short side to 768
    assert upload_size(100, 50, "high") == (100, 50)  # never upscaled


def test_image_token_counts_match_openai_examples() -> None:
    assert image_tokens(1024, 1024, "high") == 765
    assert image_tokens(2048, 4096, "high") == 1105
    assert image_tokens(4000, 3000, "low") == 85
