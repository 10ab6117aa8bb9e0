"""Convolutional projectors: token-wise MLP plus depthwise/regnet convolutions over the patch map.

    ldp            MobileVLM `LDPNetProjector`: mlp2x_gelu, then two MobileNetV3 inverted-residual blocks
                   (depthwise 3x3, LayerNorm, hardswish, squeeze-excite), the second with stride 2    tokens ~N/4
    ldpv2          MobileVLM V2 `LDPNetV2Projector`: mlp2x_gelu -> AdaptiveAvgPool to 12x12 -> PEG
                   (depthwise 3x3 conv + residual)                                                     tokens 144
    c_abstractor   Honeybee `CAbstractor`: learned positions -> RegNet stage -> AdaptiveAvgPool to m x m ->
                   RegNet stage -> readout MLP (SiLU)                                                  tokens m*m

All three read the tokens as a 2D map, so a CLS token is refused; any grid size is handled (ldp's padded
stride-2 convolution gives ceil(side / 2); the adaptive pools cover every patch).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llava_kit.model.projector_base import LayerNorm2d, Projector, check_positive_int, grid_tokens


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of `divisor`, at least `divisor`, never 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> scale (MobileNetV3)."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)  # [batch, channels, 1, 1]
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion, as MobileVLM configures it (expanded = in = out channels):
    depthwise 3x3 (stride 1 or 2, no bias) -> LayerNorm -> hardswish -> squeeze-excite -> 1x1 conv (no bias) ->
    LayerNorm, plus the input when the stride is 1.

    Parameters: 9c + 2c + (c*s + s + s*c + c) + c*c + 2c, with s = make_divisible(c / 4).
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        self.norm1 = LayerNorm2d(channels)
        self.squeeze_excite = SqueezeExcite(channels, make_divisible(channels // 4))
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm2 = LayerNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.hardswish(self.norm1(self.depthwise(x)))  # [batch, c, ceil(rows/stride), ceil(cols/stride)]
        out = self.norm2(self.pointwise(self.squeeze_excite(out)))
        return out + x if self.stride == 1 else out


def mlp2x_gelu(in_width: int, out_width: int) -> nn.Sequential:
    """Linear -> GELU -> Linear, LLaVA-1.5's token-wise MLP."""
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


class LdpProjector(Projector):
    """MobileVLM's lightweight downsample projector (LDP): mlp2x_gelu on each token, then two inverted-residual
    blocks on the d-channel map, the second with stride 2: ceil(rows/2) x ceil(cols/2) tokens.

    Parameters: C*d + d + d*d + d + 2 * (d*d + 14d + 2d*s + s), s = make_divisible(d / 4).
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        rows, cols = self.grid
        self.token_grid = (math.ceil(rows / 2), math.ceil(cols / 2))
        self.num_output_tokens = self.token_grid[0] * self.token_grid[1]
        self.mlp = mlp2x_gelu(vision_width, llm_width)
        self.blocks = nn.Sequential(InvertedResidual(llm_width, stride=1), InvertedResidual(llm_width, stride=2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        rows, cols = self.grid
        tokens = self.mlp(features)  # [batch, rows*cols, d]
        feature_map = tokens.transpose(1, 2).reshape(len(tokens), self.llm_width, rows, cols)  # [batch, d, rows, cols]
        return grid_tokens(self.blocks(feature_map))  # [batch, ceil(rows/2) * ceil(cols/2), d]


class LdpV2Projector(Projector):
    """MobileVLM V2's LDPv2: mlp2x_gelu -> AdaptiveAvgPool2d to output_grid x output_grid -> PEG (a depthwise
    3x3 conv with bias, added to its input): a fixed output_grid^2 tokens (144 by default).

    Parameters: C*d + d + d*d + d + 9d + d.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 output_grid: int = 12):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        check_positive_int("output_grid", output_grid)
        if output_grid > min(self.grid):
            self.refuse(f"output_grid={output_grid} is larger than the input grid; pooling would repeat patches "
                        f"(set output_grid <= {min(self.grid)})")
        self.output_grid = output_grid
        self.token_grid = (output_grid, output_grid)
        self.num_output_tokens = output_grid * output_grid
        self.mlp = mlp2x_gelu(vision_width, llm_width)
        self.peg = nn.Conv2d(llm_width, llm_width, 3, padding=1, groups=llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        rows, cols = self.grid
        tokens = self.mlp(features)  # [batch, rows*cols, d]
        feature_map = tokens.transpose(1, 2).reshape(len(tokens), self.llm_width, rows, cols)
        pooled = F.adaptive_avg_pool2d(feature_map, self.output_grid)  # [batch, d, m, m]
        return grid_tokens(self.peg(pooled) + pooled)  # [batch, m*m, d]


class RegBottleneck(nn.Module):
    """A RegNet bottleneck as Honeybee uses it (timm RegStage, bottle ratio 1, group size 1, SiLU, LayerNorm2d):
    1x1 conv -> LN -> SiLU -> depthwise 3x3 -> LN -> SiLU -> 1x1 conv -> LN, plus a shortcut (1x1 conv + LN when
    the width changes), then SiLU. Convolutions have no bias.

    Parameters: i*o + 2o + 9o + 2o + o*o + 2o (+ i*o + 2o when i != o).
    """

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, out_width, 1, bias=False)
        self.norm1 = LayerNorm2d(out_width)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, padding=1, groups=out_width, bias=False)
        self.norm2 = LayerNorm2d(out_width)
        self.conv3 = nn.Conv2d(out_width, out_width, 1, bias=False)
        self.norm3 = LayerNorm2d(out_width)
        self.shortcut = (nn.Identity() if in_width == out_width else
                         nn.Sequential(nn.Conv2d(in_width, out_width, 1, bias=False), LayerNorm2d(out_width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.norm1(self.conv1(x)))
        out = F.silu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.silu(out + self.shortcut(x))


def reg_stage(depth: int, in_width: int, out_width: int) -> nn.Sequential:
    """`depth` RegBottleneck blocks; the first changes the width."""
    return nn.Sequential(*[RegBottleneck(in_width if i == 0 else out_width, out_width) for i in range(depth)])


class CAbstractorProjector(Projector):
    """Honeybee's C-Abstractor: + learned positions (trunc-normal 0.02) -> RegNet stage (depth blocks, C -> h) ->
    AdaptiveAvgPool2d to output_grid x output_grid -> RegNet stage (depth, h -> h) -> readout Linear(h, d) ->
    SiLU -> Linear(d, d). Locality-preserving: each output token summarises its region of the map.

    Parameters: rows*cols*C + stage(C -> h) + stage(h -> h) + h*d + d + d*d + d, with h = hidden_width (default C).
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 output_grid: int = 12, depth: int = 3, hidden_width: int | None = None):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        for label, value in (("output_grid", output_grid), ("depth", depth)):
            check_positive_int(label, value)
        hidden_width = vision_width if hidden_width is None else hidden_width
        check_positive_int("hidden_width", hidden_width)
        if output_grid > min(self.grid):
            self.refuse(f"output_grid={output_grid} is larger than the input grid; pooling would repeat patches "
                        f"(set output_grid <= {min(self.grid)})")
        self.output_grid = output_grid
        self.token_grid = (output_grid, output_grid)
        self.num_output_tokens = output_grid * output_grid
        rows, cols = self.grid
        self.pos_emb = nn.Parameter(torch.zeros(1, rows * cols, vision_width))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.stage1 = reg_stage(depth, vision_width, hidden_width)
        self.stage2 = reg_stage(depth, hidden_width, hidden_width)
        self.readout = nn.Sequential(nn.Linear(hidden_width, llm_width), nn.SiLU(), nn.Linear(llm_width, llm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        feature_map = self.patch_grid(features + self.pos_emb)  # [batch, C, rows, cols]
        feature_map = self.stage1(feature_map)  # [batch, h, rows, cols]
        feature_map = F.adaptive_avg_pool2d(feature_map, self.output_grid)  # [batch, h, m, m]
        return self.readout(grid_tokens(self.stage2(feature_map)))  # [batch, m*m, d]
