"""The projector base class, its error type and the helpers the projector modules share.

`llava_kit.model.projectors` is the registry (names -> classes); the designs live in `projector_*.py` modules
beside it and build on what is here: `Projector` (the contract: input layout, output token count, refusal),
`patch_grid` / `grid_tokens` (tokens <-> a [batch, C, rows, cols] map, CLS refused), `LayerNorm2d`,
`sincos_2d` (fixed 2D positions) and `trunc_normal_` initialisation of learned queries.
"""

import math
from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import nn

from llava_kit.errors import LlavaKitError


class ProjectorError(LlavaKitError):
    """A projector cannot be built as asked; the message says what to change."""


class Projector(nn.Module):
    """Base of every projector: [batch, num_input_tokens, vision_width] -> [batch, num_output_tokens, llm_width].

    The input is the vision tower's selected tokens: a leading CLS token when `has_cls`, then the patch tokens of a
    `grid` = (rows, cols) in row-major order. `num_output_tokens` is known once the projector is built, so the data
    pipeline can expand each `<image>` to that many placeholders before any image is encoded.

    AnyRes (llava_kit/model/anyres.py) sends each view of an image (the base view, then each tile) through the
    projector alone. `tiles` declares what happens to the views' outputs, once per class: `"grid"` (the outputs lie on
    `token_grid`, so the tiles' outputs form one map of the image: unpadded, pooled under a cap, a newline per row),
    `"concat"` (no spatial output: the views' tokens are concatenated), or any other text, which refuses AnyRes and
    is the reason. `token_grid` is the (rows, cols) of one view's output tokens, or None where there is no grid.
    """

    tiles: str = "grid"

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False):
        super().__init__()
        for label, value in (("vision_width", vision_width), ("llm_width", llm_width)):
            if not is_positive_int(value):
                raise ProjectorError(f"{label} must be a positive integer, got {value!r}")
        if not (isinstance(grid, Sequence) and len(grid) == 2 and all(is_positive_int(g) for g in grid)):
            raise ProjectorError(f"grid must be (rows, cols) of positive integers, got {grid!r}")
        if not isinstance(has_cls, bool):
            raise ProjectorError(f"has_cls must be True or False, got {has_cls!r}")
        self.vision_width = vision_width
        self.llm_width = llm_width
        self.grid = (int(grid[0]), int(grid[1]))
        self.has_cls = has_cls
        self.num_input_tokens = self.grid[0] * self.grid[1] + int(has_cls)
        self.num_output_tokens = self.num_input_tokens  # token-wise projectors; spatial ones overwrite it
        self.token_grid: tuple[int, int] | None = None if has_cls else self.grid  # likewise: (rows, cols) of the output

    def refuse(self, reason: str) -> NoReturn:
        """Raise ProjectorError saying this projector cannot take its input layout, and why (for subclasses)."""
        rows, cols = self.grid
        layout = f"a CLS token + {rows}x{cols} patch grid" if self.has_cls else f"a {rows}x{cols} patch grid"
        raise ProjectorError(f"cannot take {layout}: {reason}")

    def tiles_refusal(self) -> str | None:
        """Why this projector, as built, cannot take AnyRes tiles (None: it can)."""
        if self.tiles not in ("grid", "concat"):
            return self.tiles
        if self.tiles == "grid" and self.token_grid is None:
            return ("it lays the tiles' tokens out on the image's grid, and a CLS token per tile has no place on it; "
                    "drop it with model.vision.select_strategy: patch")
        return None

    def check_features(self, features: torch.Tensor) -> None:
        """Raise ProjectorError unless `features` is [batch, num_input_tokens, vision_width]."""
        if features.dim() != 3 or tuple(features.shape[1:]) != (self.num_input_tokens, self.vision_width):
            raise ProjectorError(
                f"{type(self).__name__} expects features [batch, {self.num_input_tokens}, {self.vision_width}] "
                f"(grid {self.grid[0]}x{self.grid[1]}, has_cls={self.has_cls}), got {list(features.shape)}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, num_input_tokens, vision_width] -> [batch, num_output_tokens, llm_width]."""
        raise NotImplementedError

    def refuse_cls(self) -> None:
        """Refuse a leading CLS token (for projectors that treat the input as a 2D map of patches)."""
        if self.has_cls:
            self.refuse("it reads the tokens as a 2D patch map and a CLS token has no place on it; drop it with "
                        "model.vision.select_strategy: patch")

    def patch_grid(self, features: torch.Tensor) -> torch.Tensor:
        """Checked features [batch, rows*cols, C] (no CLS) -> a map [batch, C, rows, cols] (row-major patches)."""
        self.check_features(features)
        rows, cols = self.grid
        return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], rows, cols)


def grid_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """A map [batch, C, rows, cols] -> tokens [batch, rows*cols, C] in row-major order."""
    return feature_map.flatten(2).transpose(1, 2)


def is_positive_int(value) -> bool:
    """True for an int > 0 (bools are not ints here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(label: str, value) -> None:
    """Raise ProjectorError unless `value` is a positive integer; `label` names the option."""
    if not is_positive_int(value):
        raise ProjectorError(f"{label} must be a positive integer, got {value!r}")


def default_heads(width: int, head_width: int = 128) -> int:
    """Attention heads for `width` channels: width // 128 (Qwen-VL's rule), at least 1."""
    return max(1, width // head_width)


def check_heads(label: str, width: int, num_heads) -> None:
    """Raise ProjectorError unless `num_heads` is a positive integer dividing `width`."""
    check_positive_int("num_heads", num_heads)
    if width % num_heads:
        raise ProjectorError(f"num_heads={num_heads} does not divide {label}={width}; choose a divisor of {width}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a map [batch, C, rows, cols] (as timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def init_queries(queries: nn.Parameter) -> None:
    """Learned queries / latents: truncated normal, std 0.02 (Qwen-VL, BLIP-2)."""
    nn.init.trunc_normal_(queries, std=0.02)


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sine-cosine embedding [n, width] of (possibly fractional) positions [n]; width must be even."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))  # [width/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [n, width/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [n, width]


def sincos_2d(width: int, rows: int, cols: int, frame: tuple[int, int] | None = None) -> torch.Tensor:
    """2D sine-cosine positions [rows*cols, width] (row-major): half the channels code the row, half the column.

    `frame` = (rows', cols') places the grid's cell centres in another grid's coordinates, so a 24x24 map of keys
    and a 16x16 grid of queries share one coordinate frame (Qwen-VL interpolates its table for the same effect).
    width must be divisible by 4.
    """
    frame_rows, frame_cols = frame or (rows, cols)
    row_positions = (torch.arange(rows, dtype=torch.float64) + 0.5) * frame_rows / rows - 0.5  # [rows]
    col_positions = (torch.arange(cols, dtype=torch.float64) + 0.5) * frame_cols / cols - 0.5  # [cols]
    row_code = sincos_1d(width // 2, row_positions)  # [rows, width/2]
    col_code = sincos_1d(width // 2, col_positions)  # [cols, width/2]
    return torch.cat([row_code[:, None, :].expand(rows, cols, -1), col_code[None, :, :].expand(rows, cols, -1)],
                     dim=2).reshape(rows * cols, width)


def square_side(count: int) -> int | None:
    """The side of a square grid of `count` cells, or None when `count` is not a perfect square."""
    side = math.isqrt(count)
    return side if side * side == count else None
