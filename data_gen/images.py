"""Prepare images for upload: decode upright, downscale per `detail`, re-encode as JPEG; count image tokens.

The server downscales anyway (fit 2048², short side 768 for `high`; 512² for `low`), so sending more
pixels only costs bandwidth, upload time and, for `--batch`, room in the 200 MB request files.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from PIL import Image, ImageOps

DETAILS = ("low", "high", "auto")
JPEG_QUALITY = 90


def load_image(path: Path) -> Image.Image:
    """Decode an image fully, upright (EXIF orientation applied), as RGB; alpha is composited on white."""
    with Image.open(path) as opened:
        opened.seek(0)  # first frame of an animated GIF/WebP: the API takes still images only
        img = ImageOps.exif_transpose(opened)  # a new image, so it outlives the `with`
        img.load()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def upload_size(width: int, height: int, detail: str) -> tuple[int, int]:
    """The size the API would scale an image to for this `detail` (never upscaled)."""
    if detail == "low":
        scale = min(1.0, 512 / max(width, height))
    else:
        scale = min(1.0, 2048 / max(width, height))
        short_side = min(width, height) * scale
        if short_side > 768:
            scale *= 768 / short_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_tokens(width: int, height: int, detail: str) -> int:
    """Input tokens of one image for GPT-4o-class models: 85 for low, 85 + 170 per 512-px tile otherwise.

    `auto` is counted as `high`, an upper bound: the estimate should not undersell the cost.
    """
    if detail == "low":
        return 85
    w, h = upload_size(width, height, "high")
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def encode_image(path: Path, detail: str) -> str:
    """The image at `path` as a `data:image/jpeg;base64,...` URL, downscaled for `detail`."""
    img = load_image(path)
    size = upload_size(img.width, img.height, detail)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
