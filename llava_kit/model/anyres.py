"""AnyRes: an image read as a base view plus tiles on a grid (LLaVA-NeXT), its token count known from its size.

    anyres = AnyRes.build(tile_size=336, grid_pinpoints=None, view_tokens=576, token_grid=(24, 24))
    anyres.tokens((700, 1000))               # 2,928 tokens for a 700x1000 image, before any pixel is read
    views = anyres.views(image)              # [base, tile(0,0), tile(0,1), ...]: PIL images, 1 + rows*cols
    packed = anyres.pack(view_features, anyres.layout((700, 1000)), newline)   # [5, 576, d] -> [2928, d]

How an image of height x width becomes tokens (transformers' llava-next arithmetic, tested against its own functions
on many sizes in tests/unit/test_anyres_arithmetic.py):

1. Best fit: of the pinpoint resolutions (H, W), the one that keeps most of the image's pixels when the image is
   scaled to fit it, and of those the one that wastes least (`select_best_resolution`).
2. Views: the whole image resized to the tower's input (the base view), then the image resized to fit (H, W) with
   its aspect kept, padded black (centred) to (H, W) and cut into rows x cols tiles of the tower's input size, row
   by row (`views`).
3. Each view goes through the tower and the projector alone.
4. A projector with a token grid (gh, gw) per view (`Projector.tiles == "grid"`): the tiles' tokens become one map of
   rows*gh x cols*gw; the rows or columns that show only padding are cut off (`unpadding`); when the image would
   take more than its cap, the map is pooled bilinearly to a smaller one (LLaVA-OneVision); a learned
   `image_newline` ends each row. Tokens: base + h * (w + 1).
   A projector without one (`tiles == "concat"`: resampler, perceiver, qformer): the views' tokens one after the
   other, base first (Idefics2's image splitting). Tokens: (1 + rows*cols) x view tokens.

Everything here is a function of the image's size (and the cap of its sample): the data check, the tokenizer step,
packing, length grouping, the feature cache and the forward pass all ask this module, so image tokens are never
truncated and the counts never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from llava_kit.config import tile_grids
from llava_kit.errors import ConfigError

Size = tuple[int, int]
"""(height, width), in pixels or in tokens."""

DEFAULT_TILE_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
"""LLaVA-NeXT's grids in tiles (rows, cols), in transformers' order ([[336, 672], [672, 336], [672, 672], [1008, 336],
[336, 1008]] for a 336 px tower)."""

GRID, CONCAT = "grid", "concat"
"""How a projector takes tiles (`Projector.tiles`): laid out on the image's token grid, or concatenated."""


class AnyResError(ConfigError):
    """AnyRes settings that cannot work with this tower or projector; the message says what to change."""

    def __init__(self, message: str):
        super().__init__([message], "model.vision")


# ------------------------------------------------------------------------------------------------ the arithmetic


def select_best_resolution(size: Size, resolutions) -> Size:
    """The resolution (height, width) of `resolutions` an image of `size` fits best: the most effective pixels (the
    image scaled to fit, never above its own count), then the fewest wasted ones; the first wins a tie."""
    height, width = size
    best, most_effective, least_wasted = None, 0, float("inf")
    for res_height, res_width in resolutions:
        scale = min(res_width / width, res_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = res_width * res_height - effective
        if effective > most_effective or (effective == most_effective and wasted < least_wasted):
            best, most_effective, least_wasted = (res_height, res_width), effective, wasted
    return best


def fitted_size(size: Size, resolution: Size) -> Size:
    """The size an image of `size` is resized to inside `resolution`, its aspect kept (one side fills it)."""
    height, width = size
    target_height, target_width = resolution
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def unpadding(size: Size, map_size: Size) -> tuple[int, int, int, int]:
    """(row_start, row_stop, col_start, col_stop) of the part of a token map of `map_size` that shows the image
    of `size`: the rows (or columns) that show only the black padding of step 2 are cut, the same number on each
    side (transformers' `unpad_image`)."""
    height, width = size
    map_height, map_width = map_size
    if width / height > map_width / map_height:  # padded above and below
        shown = int(round(height * (map_width / width), 7))
        padding = (map_height - shown) // 2
        return padding, map_height - padding, 0, map_width
    shown = int(round(width * (map_height / height), 7))
    padding = (map_width - shown) // 2
    return 0, map_height, padding, map_width - padding


def pooled_size(map_size: Size, budget: int) -> Size:
    """The largest map (h, w) within `map_size`, of about its aspect, whose tokens with a newline per row fit
    `budget`: h * (w + 1) <= budget. `budget` must be at least 2 (one token and its newline)."""
    height, width = map_size
    if height * (width + 1) <= budget:
        return height, width
    scale = math.sqrt(budget / (height * (width + 1)))
    rows, cols = max(1, min(height, int(height * scale))), max(1, min(width, int(width * scale)))
    while rows * (cols + 1) > budget:  # shrink the side that is relatively larger
        if rows > 1 and (rows / height >= cols / width or cols == 1):
            rows -= 1
        else:
            cols -= 1
    return rows, cols


def resolve_pinpoints(grid_pinpoints, tile_size: int) -> tuple[Size, ...]:
    """`model.vision.grid_pinpoints` as (height, width) pixel resolutions for a tower of `tile_size` pixels.

    None: LLaVA-NeXT's five grids; a string: the grids it names (config.tile_grids); a list: [height, width] pairs,
    each a multiple of tile_size (AnyResError otherwise).
    """
    if grid_pinpoints is None:
        return tuple((rows * tile_size, cols * tile_size) for rows, cols in DEFAULT_TILE_GRIDS)
    if isinstance(grid_pinpoints, str):
        try:
            grids = tile_grids(grid_pinpoints)
        except ValueError as err:
            raise AnyResError(f"grid_pinpoints: {err}") from None
        return tuple((rows * tile_size, cols * tile_size) for rows, cols in grids)
    resolutions = []
    for pair in grid_pinpoints:
        height, width = (int(v) for v in pair)
        if height < tile_size or width < tile_size or height % tile_size or width % tile_size:
            raise AnyResError(f"grid_pinpoints: [{height}, {width}] is not a grid of {tile_size} px tiles (the tower's "
                              f"input size); use multiples of {tile_size}, e.g. [{tile_size}, {2 * tile_size}], or "
                              "a range of tile grids like (1x1),...,(2x2)")
        resolutions.append((height, width))
    if not resolutions:
        raise AnyResError("grid_pinpoints is an empty list; give at least one [height, width]")
    return tuple(resolutions)


# ------------------------------------------------------------------------------------------------ one image


@dataclass(frozen=True)
class ImageLayout:
    """How one image becomes tokens: its tile grid, its token map after unpadding and pooling, its token count."""

    size: Size
    """The image's (height, width) in pixels."""
    resolution: Size
    """The pinpoint (height, width) its tiles cover."""
    grid: Size
    """Tiles (rows, cols); the image has 1 + rows * cols views (the base first)."""
    token_map: Size | None
    """Grid projectors: the tiles' token map (h, w) after unpadding and pooling (one newline per row); None for
    concatenating projectors."""
    pooled: bool
    """True when the map was pooled to fit the image's cap."""
    tokens: int
    """Image tokens in the sequence: base view + tiles (+ newlines)."""

    @property
    def views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class AnyRes:
    """The AnyRes settings of one model: its tower's input size, the pinpoints, what the projector makes of a view."""

    tile_size: int
    """The tower's input side in pixels (a tile and the base view are tile_size x tile_size)."""
    pinpoints: tuple[Size, ...]
    """The (height, width) resolutions tiles may cover, multiples of tile_size."""
    view_tokens: int
    """Projector output tokens per view."""
    token_grid: Size | None
    """The projector's output grid (rows, cols) per view, or None when it has none (tiles concatenated)."""
    max_tokens_per_image: int | None = None
    max_image_tokens_per_sample: int | None = None

    @classmethod
    def build(cls, tile_size: int, grid_pinpoints, view_tokens: int, token_grid: Size | None,
              max_tokens_per_image: int | None = None, max_image_tokens_per_sample: int | None = None) -> AnyRes:
        """Settings from `model.vision`'s keys, checked against the tower and projector (AnyResError)."""
        anyres = cls(int(tile_size), resolve_pinpoints(grid_pinpoints, int(tile_size)), int(view_tokens),
                     tuple(token_grid) if token_grid is not None else None, max_tokens_per_image,
                     max_image_tokens_per_sample)
        anyres.check()
        return anyres

    def check(self) -> None:
        """Refuse caps that cannot be met: below the smallest image, or (concatenating projectors) any cap that
        would need pooling, which they cannot do."""
        if self.token_grid is not None and self.view_tokens != self.token_grid[0] * self.token_grid[1]:
            raise AnyResError(f"the projector's token grid {self.token_grid} does not hold its {self.view_tokens} "
                              "tokens per view")
        cap, budget = self.max_tokens_per_image, self.max_image_tokens_per_sample
        if self.token_grid is not None:
            least = self.view_tokens + 2  # the base view and a 1x1 map with its newline
            for key, value in (("max_tokens_per_image", cap), ("max_image_tokens_per_sample", budget)):
                if value is not None and value < least:
                    raise AnyResError(f"{key}={value} is below the smallest image: {self.view_tokens} tokens of "
                                      f"the base view + 2 (a 1x1 tile map and its newline); set at least {least}")
            return
        most = max((1 + (h // self.tile_size) * (w // self.tile_size)) * self.view_tokens for h, w in self.pinpoints)
        if cap is not None and cap < most:
            raise AnyResError(f"max_tokens_per_image={cap} is below the {most} tokens the largest pinpoint takes, and "
                              "this projector has no token grid to pool (its tiles are concatenated); raise it, drop "
                              "it, or give grid_pinpoints with fewer tiles")
        if budget is not None:
            raise AnyResError("max_image_tokens_per_sample needs pooling, and this projector has no token grid to "
                              "pool (its tiles are concatenated); drop it, or use a projector with a token grid")

    # ---------------------------------------------------------------------------------------- counts

    def image_cap(self, n_images: int = 1) -> int | None:
        """The token cap of each image of a sample with `n_images` images (None: no cap)."""
        caps = [self.max_tokens_per_image]
        if self.max_image_tokens_per_sample is not None and self.token_grid is not None:
            caps.append(max(self.view_tokens + 2, self.max_image_tokens_per_sample // max(n_images, 1)))
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def layout(self, size: Size, cap: int | None = None) -> ImageLayout:
        """How an image of `size` (height, width) becomes tokens under `cap` (None or 0: `max_tokens_per_image`)."""
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise ValueError(f"an image of {width}x{height} pixels has nothing to tile")
        cap = cap or self.max_tokens_per_image  # 0 and None: the model's own cap
        resolution = select_best_resolution((height, width), self.pinpoints)
        grid = (resolution[0] // self.tile_size, resolution[1] // self.tile_size)
        if self.token_grid is None:
            return ImageLayout((height, width), resolution, grid, None, False,
                               (1 + grid[0] * grid[1]) * self.view_tokens)
        map_size = (grid[0] * self.token_grid[0], grid[1] * self.token_grid[1])
        row_start, row_stop, col_start, col_stop = unpadding((height, width), map_size)
        shown = (row_stop - row_start, col_stop - col_start)
        token_map = shown if cap is None else pooled_size(shown, cap - self.view_tokens)
        tokens = self.view_tokens + token_map[0] * (token_map[1] + 1)
        return ImageLayout((height, width), resolution, grid, token_map, token_map != shown, tokens)

    def tokens(self, size: Size, cap: int | None = None) -> int:
        """The token count of an image of `size` (height, width)."""
        return self.layout(size, cap).tokens

    def sample_tokens(self, sizes: list[Size]) -> list[int]:
        """The token counts of one sample's images (their sizes in order), under the sample's caps."""
        cap = self.image_cap(len(sizes))
        return [self.tokens(size, cap) for size in sizes]

    def sample_caps(self, n_images: int) -> list[int]:
        """Each image's cap in a sample of `n_images` (0: none), as the forward pass takes them."""
        return [self.image_cap(n_images) or 0] * n_images

    # ---------------------------------------------------------------------------------------- pixels

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The views of an RGB image: itself (the tower's preprocessing resizes it whole, the base view), then its
        tiles row by row, each tile_size x tile_size, from the image fitted into its best resolution and padded
        black around it (centred)."""
        layout = self.layout((image.height, image.width))
        fitted_height, fitted_width = fitted_size(layout.size, layout.resolution)
        canvas = Image.new("RGB", (layout.resolution[1], layout.resolution[0]), (0, 0, 0))
        resized = image.resize((fitted_width, fitted_height), Image.Resampling.BICUBIC)
        canvas.paste(resized, ((layout.resolution[1] - fitted_width) // 2, (layout.resolution[0] - fitted_height) // 2))
        side = self.tile_size
        tiles = [canvas.crop((col * side, row * side, (col + 1) * side, (row + 1) * side))
                 for row in range(layout.grid[0]) for col in range(layout.grid[1])]
        return [image, *tiles]

    # ---------------------------------------------------------------------------------------- features

    def pack(self, view_features: torch.Tensor, layout: ImageLayout, newline: torch.Tensor | None) -> torch.Tensor:
        """One image's projected views [1 + rows*cols, view_tokens, d] (base first) -> its tokens [layout.tokens, d].

        Grid projectors: base tokens, then the tiles' map row by row, unpadded, pooled if the layout says so, each
        row ended by `newline` [d]. Concatenating projectors: every view's tokens in order.
        """
        if view_features.shape[0] != layout.views:
            raise ValueError(f"an image of {layout.size[1]}x{layout.size[0]} has {layout.views} views, got "
                             f"{view_features.shape[0]}")
        width = view_features.shape[-1]
        if self.token_grid is None:
            return view_features.reshape(-1, width)
        rows, cols = layout.grid
        grid_rows, grid_cols = self.token_grid
        # [tiles, gh*gw, d] -> [d, rows*gh, cols*gw]: tile (r, c)'s token (i, j) at (r*gh + i, c*gw + j)
        token_map = view_features[1:].reshape(rows, cols, grid_rows, grid_cols, width).permute(4, 0, 2, 1, 3)
        token_map = token_map.reshape(width, rows * grid_rows, cols * grid_cols)
        row_start, row_stop, col_start, col_stop = unpadding(layout.size, token_map.shape[1:])
        token_map = token_map[:, row_start:row_stop, col_start:col_stop]
        if layout.pooled:  # LLaVA-OneVision: bilinear, after the projector, before the newlines
            token_map = F.interpolate(token_map[None], size=layout.token_map, mode="bilinear")[0]
        height, map_width = token_map.shape[1:]
        ends = newline.to(token_map)[:, None, None].expand(width, height, 1)
        token_map = torch.cat([token_map, ends], dim=2)  # [d, h, w + 1]
        return torch.cat([view_features[0], token_map.flatten(1).transpose(0, 1)])  # [base + h * (w + 1), d]

    # ---------------------------------------------------------------------------------------- saving

    def to_dict(self) -> dict:
        """JSON-ready; `from_dict` rebuilds it (the composite's config.json holds it as `image_strategy`)."""
        return {"name": "anyres", "tile_size": self.tile_size, "grid_pinpoints": [list(p) for p in self.pinpoints],
                "view_tokens": self.view_tokens, "token_grid": list(self.token_grid) if self.token_grid else None,
                "max_tokens_per_image": self.max_tokens_per_image,
                "max_image_tokens_per_sample": self.max_image_tokens_per_sample}

    @classmethod
    def from_dict(cls, data: dict) -> AnyRes:
        return cls.build(data["tile_size"], data["grid_pinpoints"], data["view_tokens"], data["token_grid"],
                         data.get("max_tokens_per_image"), data.get("max_image_tokens_per_sample"))
