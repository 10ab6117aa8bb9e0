"""Projectors that keep or shrink the patch grid by a fixed rule, then map each token with a small MLP.

    identity        no parameters; vision_width must equal llm_width (a test and ablation baseline)
    pooler          LLaVA-NeXT `pooler_projector.py`: Conv2d k2 s2 -> GELU -> Linear          tokens N/4
    avgpool         LLaVA-OneVision `get_2dPool`: average (or max) pooling (2x2, or to a target grid) + mlp2x_gelu
    pixel_shuffle   InternVL 1.5/2 `pixel_shuffle` (ps_version v2) + `mlp1` (LN -> Linear -> GELU -> Linear)
    patch_merger    Qwen2-VL `PatchMerger`: LN -> concat each 2x2 block -> Linear -> GELU -> Linear

All but identity read the tokens as a 2D map and refuse a CLS token. Grids a rule cannot split evenly (27x27 for a
2x2 merge) are refused with the alternatives, never cut silently; avgpool pools any grid (ceil(side / stride)).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llava_kit.model.projector_base import Projector, ProjectorError, check_positive_int, grid_tokens


class IdentityProjector(Projector):
    """No projection: the vision features are the LLM's input embeddings (needs vision_width == llm_width)."""

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False):
        super().__init__(vision_width, llm_width, grid, has_cls)
        if vision_width != llm_width:
            raise ProjectorError(f"identity needs vision_width == llm_width, got {vision_width} and {llm_width}; "
                                 "use linear or mlp2x_gelu to change the width")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        return features  # [batch, tokens, llm_width]


def _check_divisible(projector: Projector, factor: int, what: str, alternatives: str) -> None:
    rows, cols = projector.grid
    if rows % factor or cols % factor:
        projector.refuse(f"{what} needs both sides divisible by {factor}; {alternatives}")


class PoolerProjector(Projector):
    """LLaVA-NeXT's pooler: Conv2d(C, d, kernel 2, stride 2) -> GELU -> Linear(d, d); N/4 tokens.

    Parameters: 4C*d + d (conv) + d*d + d.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        _check_divisible(self, 2, "a 2x2 stride-2 convolution",
                         "an odd side would lose its last row or column; use avgpool or ldp (any grid)")
        self.token_grid = (self.grid[0] // 2, self.grid[1] // 2)
        self.num_output_tokens = self.token_grid[0] * self.token_grid[1]
        self.conv = nn.Conv2d(vision_width, llm_width, kernel_size=2, stride=2)
        self.linear = nn.Linear(llm_width, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        feature_map = self.patch_grid(features)  # [batch, C, rows, cols]
        pooled = grid_tokens(self.conv(feature_map))  # [batch, rows/2 * cols/2, d]
        return self.linear(F.gelu(pooled))  # [batch, tokens_out, d]


class AvgPoolProjector(Projector):
    """Average pooling of the patch map, then mlp2x_gelu (Linear C->d, GELU, Linear d->d) on each pooled token.

    The pooled grid is `output_grid` x `output_grid` when set, else ceil(rows / stride) x ceil(cols / stride)
    (LLaVA-OneVision rounds up on odd grids too); adaptive pooling covers every patch, odd sides included.
    `mode` is OneVision's `mm_spatial_pool_mode`: "average" (the default) or "max", which keeps a feature that
    only a few patches hold (a small object's outline) at its full strength instead of averaging it with the
    background. Parameters: C*d + d + d*d + d.
    """

    POOL_MODES = {"average": F.adaptive_avg_pool2d, "max": F.adaptive_max_pool2d}

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 stride: int = 2, output_grid: int | None = None, mode: str = "average"):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        check_positive_int("stride", stride)
        if mode not in self.POOL_MODES:
            raise ProjectorError(f"mode must be one of {', '.join(self.POOL_MODES)}, got {mode!r}")
        self.pool = self.POOL_MODES[mode]
        rows, cols = self.grid
        if output_grid is None:
            self.output_grid = (math.ceil(rows / stride), math.ceil(cols / stride))
        else:
            check_positive_int("output_grid", output_grid)
            if output_grid > min(rows, cols):
                self.refuse(f"output_grid={output_grid} is larger than the input grid; pooling would repeat patches "
                            f"(use at most {min(rows, cols)})")
            self.output_grid = (output_grid, output_grid)
        self.token_grid = self.output_grid
        self.num_output_tokens = self.output_grid[0] * self.output_grid[1]
        self.mlp = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        feature_map = self.patch_grid(features)  # [batch, C, rows, cols]
        pooled = grid_tokens(self.pool(feature_map, self.output_grid))  # [batch, tokens_out, C]
        return self.mlp(pooled)  # [batch, tokens_out, d]


def space_to_channels(feature_map: torch.Tensor, factor: int) -> torch.Tensor:
    """[batch, C, rows, cols] -> tokens [batch, rows/f * cols/f, f*f*C]: each f x f block becomes one token.

    A block's channels are its patches in row-major order, each patch's C channels together: for f = 2,
    (top-left, top-right, bottom-left, bottom-right). This is InternVL's `pixel_shuffle` with ps_version v2 and
    Qwen2-VL's merge order.
    """
    batch, channels, rows, cols = feature_map.shape
    blocks = feature_map.reshape(batch, channels, rows // factor, factor, cols // factor, factor)
    # [batch, rows/f, cols/f, f (row in block), f (col in block), C]
    blocks = blocks.permute(0, 2, 4, 3, 5, 1)
    return blocks.reshape(batch, (rows // factor) * (cols // factor), factor * factor * channels)


class PixelShuffleProjector(Projector):
    """InternVL's pixel shuffle (v2 ordering; downsample ratio 1/scale) + mlp1: LN(s*s*C) -> Linear -> GELU -> Linear.

    Parameters, with s = scale: 2*s*s*C (LayerNorm) + s*s*C*d + d + d*d + d.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 scale: int = 2):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        check_positive_int("scale", scale)
        _check_divisible(self, scale, f"pixel shuffle by {scale}",
                         "use avgpool or c_abstractor (any grid), or another scale")
        self.scale = scale
        self.token_grid = (self.grid[0] // scale, self.grid[1] // scale)
        self.num_output_tokens = self.token_grid[0] * self.token_grid[1]
        merged = scale * scale * vision_width
        self.mlp = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, llm_width), nn.GELU(),
                                 nn.Linear(llm_width, llm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        merged = space_to_channels(self.patch_grid(features), self.scale)  # [batch, tokens_out, s*s*C]
        return self.mlp(merged)  # [batch, tokens_out, d]


class PatchMergerProjector(Projector):
    """Qwen2-VL's PatchMerger: LayerNorm(C) on each patch, concat each 2x2 block, Linear(4C, 4C) -> GELU ->
    Linear(4C, d). (InternVL normalises after the merge; Qwen2-VL before.)

    Parameters, with m = merge_size: 2C + (m*m*C)^2 + m*m*C + m*m*C*d + d.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 merge_size: int = 2):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        check_positive_int("merge_size", merge_size)
        _check_divisible(self, merge_size, f"merging {merge_size}x{merge_size} blocks",
                         "use avgpool or c_abstractor (any grid), or another merge_size")
        self.merge_size = merge_size
        self.token_grid = (self.grid[0] // merge_size, self.grid[1] // merge_size)
        self.num_output_tokens = self.token_grid[0] * self.token_grid[1]
        merged = merge_size * merge_size * vision_width
        self.ln_q = nn.LayerNorm(vision_width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, llm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        normed = self.ln_q(features)  # [batch, rows*cols, C]
        merged = space_to_channels(self.patch_grid(normed), self.merge_size)  # [batch, tokens_out, m*m*C]
        return self.mlp(merged)  # [batch, tokens_out, d]
