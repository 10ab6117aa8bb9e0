"""Safe image loading: any file PIL reads -> an RGB image ready for the vision tower.

- The path must stay inside the image root (no `../` escapes, no absolute paths elsewhere). Containment is checked
  on the path as written, so folders symlinked into the root (LLaVA's `coco/` linked into place) are fine.
- `data:` URLs (base64) are decoded once into `$LLAVA_KIT_HOME/cache/images/<sha256>.<ext>`.
- `check_image` decodes the whole file: a truncated JPEG passes `verify()` but not this.
- Decompression bombs are refused by pixel count before decoding.
- EXIF orientation is applied; animated images use their first frame.
- Every mode becomes RGB: alpha is composited on white, 16-bit and float images are scaled to
  8 bits (not clipped), palettes and CMYK are converted.
- `pad` makes the image square with a background colour (the tower's mean, as LLaVA-1.5);
  `resize` leaves the aspect to the tower's preprocessing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from llava_kit.errors import DataError

MAX_IMAGE_PIXELS = 16384 * 16384  # ~268 MP: far beyond any training image, far below a bomb


class ImageLoadError(DataError):
    """An image that cannot be used; the message is the reason reported for it."""


DATA_URL = re.compile(r"^data:image/([\w.+-]+);base64,(.*)$", re.DOTALL)


def resolve_image_path(image: str, image_root: str | Path) -> Path:
    """Return the absolute path of `image` under `image_root`, refusing paths that leave it.

    Containment is decided on the path as written (`..` collapsed, symlinks not followed), so a folder linked into
    the root is inside it while `../x.jpg` is not. A `data:` URL becomes a file in the image cache.
    """
    if image.startswith("data:"):
        return data_url_file(image)
    root = Path(os.path.abspath(image_root))
    path = Path(os.path.normpath(root / image))
    if path != root and root not in path.parents:
        raise ImageLoadError(f"image path {image!r} points outside the image root {str(root)!r}",
                             kind="image outside the image root")
    if not path.is_file():
        raise ImageLoadError(f"image {image!r} not found under {str(root)!r}", kind="image not found")
    return path


def image_cache_dir() -> Path:
    """`$LLAVA_KIT_HOME/cache/images` (default `~/.cache/llava-kit/cache/images`): decoded data: URLs."""
    home = os.environ.get("LLAVA_KIT_HOME", Path.home() / ".cache" / "llava-kit")
    return Path(home) / "cache" / "images"


def data_url_file(url: str) -> Path:
    """The file holding a base64 `data:image/...` URL's bytes (written once, named by their sha256)."""
    match = DATA_URL.match(url)
    if match is None:
        raise ImageLoadError(f"a data: URL that is not a base64 image ({url[:40]}...)", kind="bad data: URL")
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError(f"a data: URL whose base64 does not decode ({url[:40]}...)", kind="bad data: URL") from None
    suffix = match.group(1).split("+")[0].replace("jpeg", "jpg")
    path = image_cache_dir() / f"{hashlib.sha256(data).hexdigest()}.{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return path


def check_image(image: str, image_root: str | Path) -> str:
    """Resolve an image and decode it whole (as training will); returns its path or raises ImageLoadError."""
    return checked_image(image, image_root)[0]


def checked_image(image: str, image_root: str | Path) -> tuple[str, tuple[int, int]]:
    """`check_image`, also returning the decoded image's (height, width) (after its EXIF orientation): what an
    AnyRes model counts the image's tokens from."""
    path = resolve_image_path(image, image_root)
    try:
        decoded = load_image(path)
    except ImageLoadError as err:
        detail = str(err).removeprefix("cannot read image: ")
        raise ImageLoadError(f"cannot read image {image!r}: {detail}", kind=err.kind) from None
    return str(path), (decoded.height, decoded.width)


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
                                     "(possible decompression bomb)", kind="image over the pixel limit")
            if getattr(img, "is_animated", False):
                img.seek(0)
            img = ImageOps.exif_transpose(img) or img
            img.load()
            return _to_rgb(img)
    except ImageLoadError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image: {err}", kind="unreadable image") from None


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
