"""Safe image loading: any file PIL reads -> an RGB image ready for the vision tower.

- The path must stay inside the image root (no `../` escapes, no absolute paths elsewhere).
- Decompression bombs are refused by pixel count before decoding.
- EXIF orientation is applied; animated images use their first frame.
- Every mode becomes RGB: alpha is composited on white, 16-bit and float images are scaled to
  8 bits (not clipped), palettes and CMYK are converted.
- `pad` makes the image square with a background colour (the tower's mean, as LLaVA-1.5);
  `resize` leaves the aspect to the tower's preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from llava_kit.errors import DataError

MAX_IMAGE_PIXELS = 16384 * 16384  # ~268 MP: far beyond any training image, far below a bomb


class ImageLoadError(DataError):
    """An image that cannot be used; the message is the reason reported for it."""


def resolve_image_path(image: str, image_root: str | Path) -> Path:
    """Return the absolute path of `image` under `image_root`, refusing paths that leave it."""
    root = Path(image_root).resolve()
    path = (root / image).resolve()
    if not path.is_relative_to(root):
        raise ImageLoadError(f"image path {image!r} points outside the image root {str(root)!r}")
    if not path.is_file():
        raise ImageLoadError(f"image {image!r} not found under {str(root)!r}")
    return path


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: scale the actual range into 0..255 instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file safely and return it as RGB (see the module docstring)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageLoadError(f"image is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                                     "(possible decompression bomb)")
            if getattr(img, "is_animated", False):
                img.seek(0)
            img = ImageOps.exif_transpose(img) or img
            img.load()
            return _to_rgb(img)
    except ImageLoadError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image: {err}") from None


def pad_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre `img` on a square canvas of its longer side filled with `background`."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """The padding colour of a tower whose normalisation mean is `mean` (0..1 per channel).

    `int()`, not `round()`: LLaVA's `expand2square(img, tuple(int(x * 255) for x in image_mean))` and transformers'
    LlavaImageProcessor both truncate, so CLIP's mean gives (122, 116, 104). Rounding would give (123, 117, 104), and
    the exported processor would then see other pixels than training did.
    """
    return tuple(int(c * 255) for c in mean)


def prepare_image(img: Image.Image, image_aspect: str, mean: tuple[float, float, float]) -> Image.Image:
    """Apply the aspect policy: `pad` to a square of the tower's mean colour, or leave for `resize`."""
    if image_aspect == "pad":
        return pad_to_square(img, pad_colour(mean))
    return img
