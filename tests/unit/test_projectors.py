"""The projector registry: shapes, parameter counts, LLaVA-compatible state dicts, errors.

    .venv/bin/python -m pytest tests/unit/test_projectors.py -q
"""

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava_kit.model import projectors
from llava_kit.model.projectors import (
    PROJECTORS,
    Projector,
    ProjectorError,
    build_projector,
    count_parameters,
    projector_names,
    resolve_projector,
)

C, D, GRID = 12, 20, (3, 4)  # vision width, LLM width, patch grid (rows, cols)
NAMES = ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"]
ZOO = ["identity", "pooler", "avgpool", "pixel_shuffle", "patch_merger", "ldp", "ldpv2", "c_abstractor", "resampler",
       "perceiver", "tokenpacker", "qformer"]


def _features(tokens: int, width: int = C, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(tokens))


def _expected_parameters(name: str) -> int:
    if name == "linear":
        return C * D + D
    depth = int(name[len("mlp"):-len("x_gelu")])
    return C * D + (depth - 1) * (D * D + D) + D


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("has_cls", [False, True])
def test_shapes_and_token_counts(name, has_cls):
    projector = build_projector(name, C, D, GRID, has_cls=has_cls)
    tokens = GRID[0] * GRID[1] + int(has_cls)
    assert isinstance(projector, Projector) and projector.name == name
    assert projector.num_input_tokens == projector.num_output_tokens == tokens
    assert projector(_features(tokens)).shape == (2, tokens, D)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_follow_the_formulas(name):
    projector = build_projector(name, C, D, GRID)
    assert count_parameters(projector) == _expected_parameters(name)
    projector.requires_grad_(False)
    assert count_parameters(projector, trainable_only=True) == 0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    projector = build_projector(name, C, D, GRID)
    projector(_features(12)).square().mean().backward()
    for parameter_name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


def test_state_dict_keys_match_llava_mm_projector():
    assert set(build_projector("linear", C, D, GRID).state_dict()) == {"weight", "bias"}
    assert list(build_projector("mlp1x_gelu", C, D, GRID).state_dict()) == ["0.weight", "0.bias"]
    assert list(build_projector("mlp3x_gelu", C, D, GRID).state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def test_loads_an_original_llava_projector_unchanged():
    """LLaVA's builder makes `nn.Sequential(Linear, GELU, Linear)` for mlp2x_gelu and `nn.Linear` for linear."""
    features = _features(12)
    for name, original in [("mlp2x_gelu", nn.Sequential(nn.Linear(C, D), nn.GELU(), nn.Linear(D, D))),
                           ("linear", nn.Linear(C, D))]:
        projector = build_projector(name, C, D, GRID)
        projector.load_state_dict(original.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(projector(features), original(features))


def test_default_linear_init_like_llava():
    """PyTorch's default nn.Linear init: weights within +-1/sqrt(fan_in), not a fixed std."""
    projector = build_projector("mlp2x_gelu", C, D, GRID)
    assert projector[0].weight.abs().max() <= 1 / math.sqrt(C)
    assert projector[2].weight.abs().max() <= 1 / math.sqrt(D)


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_safetensors_round_trip(name, tmp_path):
    projector = build_projector(name, C, D, GRID)
    save_file(projector.state_dict(), tmp_path / "projector.safetensors")
    torch.manual_seed(123)
    reloaded = build_projector(name, C, D, GRID)
    reloaded.load_state_dict(load_file(tmp_path / "projector.safetensors"), strict=True)
    features = _features(12)
    with torch.no_grad():
        assert torch.equal(reloaded(features), projector(features))


def test_names_and_resolution():
    assert projector_names() == sorted(ZOO + ["linear"]) + ["mlp{N}x_gelu"]
    assert resolve_projector("mlp2x_gelu") == (projectors.MlpGeluProjector, {"depth": 2})
    assert resolve_projector("linear") == (projectors.LinearProjector, {})
    assert build_projector("mlp12x_gelu", C, D, GRID).depth == 12


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def test_errors_are_value_errors():
    assert issubclass(ProjectorError, ValueError)


@pytest.mark.parametrize("name, suggestion", [
    ("mlp2x-gelu", "mlp2x_gelu"), ("Linear", "linear"), ("mlp2x_relu", "mlp2x_gelu"), ("q_former", "qformer"),
    ("hyperattention", None)])
def test_unknown_name_lists_valid_names_and_the_closest(name, suggestion):
    with pytest.raises(ProjectorError) as error:
        build_projector(name, C, D, GRID)
    message = str(error.value)
    assert f"unknown projector {name!r}" in message and "linear, patch_merger" in message
    assert message.count(", ") >= len(ZOO) and "mlp{N}x_gelu" in message
    assert (f"Did you mean {suggestion!r}?" in message) if suggestion else ("Did you mean" not in message)


@pytest.mark.parametrize("name", [
    "mlp2x_gelu_v2", "my_mlp2x_gelu", "linear2", "mlp2x_gelu\n", "mlpx_gelu", "mlp\u0662x_gelu"])  # U+0662: Arabic 2
def test_no_substring_or_loose_matching(name):
    with pytest.raises(ProjectorError, match="unknown projector"):
        build_projector(name, C, D, GRID)


def test_mlp_depth_must_be_positive():
    with pytest.raises(ProjectorError, match="must be at least 1"):
        build_projector("mlp0x_gelu", C, D, GRID)


def test_unknown_and_name_set_options():
    with pytest.raises(ProjectorError, match="projector 'mlp2x_gelu' has no option 'dropout'; it accepts: no options"):
        build_projector("mlp2x_gelu", C, D, GRID, dropout=0.1)
    with pytest.raises(ProjectorError, match="option 'depth' is set by the name itself"):
        build_projector("mlp2x_gelu", C, D, GRID, depth=3)


@pytest.mark.parametrize("arguments, message", [
    ((0, D, GRID), "vision_width must be a positive integer"),
    ((C, 2.5, GRID), "llm_width must be a positive integer"),
    ((C, D, (4,)), r"grid must be \(rows, cols\)"),
    ((C, D, (4, 0)), r"grid must be \(rows, cols\)"),
])
def test_bad_dimensions(arguments, message):
    with pytest.raises(ProjectorError, match=message):
        build_projector("linear", *arguments)


def test_wrong_feature_shape_is_a_clear_error():
    projector = build_projector("mlp2x_gelu", C, D, GRID, has_cls=True)
    expected = r"expects features \[batch, 13, 12\] \(grid 3x4, has_cls=True\), got \[2, 12, 12\]"
    with pytest.raises(ProjectorError, match=expected):
        projector(_features(12))


# ---------------------------------------------------------------------------------------------------------------
# The contract a spatial projector (the zoo) builds on
# ---------------------------------------------------------------------------------------------------------------

class _Pool2x(Projector):
    """A stand-in spatial projector: 2x2 average pooling then Linear; needs an even grid and no CLS token."""

    def __init__(self, vision_width, llm_width, grid, has_cls=False, stride: int = 2):
        super().__init__(vision_width, llm_width, grid, has_cls)
        if has_cls:
            self.refuse("it pools patches spatially; drop the CLS token (select_strategy='patch')")
        if grid[0] % stride or grid[1] % stride:
            self.refuse(f"both sides must be divisible by stride {stride}")
        self.stride = stride
        self.num_output_tokens = (grid[0] // stride) * (grid[1] // stride)
        self.linear = nn.Linear(vision_width, llm_width)

    def forward(self, features):
        self.check_features(features)
        rows, cols = self.grid
        spatial = features.transpose(1, 2).reshape(len(features), self.vision_width, rows, cols)  # [b, C, rows, cols]
        pooled = nn.functional.avg_pool2d(spatial, self.stride).flatten(2).transpose(1, 2)  # [b, tokens_out, C]
        return self.linear(pooled)


def test_spatial_projector_contract(monkeypatch):
    monkeypatch.setitem(PROJECTORS, "pool2x", _Pool2x)
    projector = build_projector("pool2x", C, D, (4, 6))
    assert (projector.num_input_tokens, projector.num_output_tokens) == (24, 6)
    assert projector(_features(24)).shape == (2, 6, D)
    assert build_projector("pool2x", C, D, (6, 6), stride=3).num_output_tokens == 4
    with pytest.raises(ProjectorError, match=r"projector 'pool2x': cannot take a CLS token \+ 4x6 patch grid: .*drop"):
        build_projector("pool2x", C, D, (4, 6), has_cls=True)
    with pytest.raises(ProjectorError, match=r"projector 'pool2x': cannot take a 27x27 patch grid: .*divisible"):
        build_projector("pool2x", C, D, (27, 27))
    with pytest.raises(ProjectorError, match="has no option 'kernel'; it accepts: stride"):
        build_projector("pool2x", C, D, (4, 6), kernel=2)
    assert "pool2x" in projector_names()


# ---------------------------------------------------------------------------------------------------------------
# The zoo: every projector on 24x24, 27x27 (also with CLS kept) and 16x16 grids
# ---------------------------------------------------------------------------------------------------------------

ZC, ZD = 16, 32  # vision width, LLM width for the zoo (ZD / 4 = 8: MobileNet's squeeze width rounds to itself)
ZOO_OPTIONS = {"qformer": {"hidden_width": 64}}  # BLIP-2's 768 makes a 16M-parameter test model
LAYOUTS = {"24": ((24, 24), False), "27": ((27, 27), False), "27+cls": ((27, 27), True), "16": ((16, 16), False)}
CLS_REFUSED = "a CLS token has no place on it"
ODD_REFUSED = "divisible by 2"
SPATIAL_4 = {"24": 144, "27": ODD_REFUSED, "27+cls": CLS_REFUSED, "16": 64}  # 2x2 merges that refuse odd grids
EXPECTED_TOKENS = {
    "linear": {"24": 576, "27": 729, "27+cls": 730, "16": 256},
    "mlp2x_gelu": {"24": 576, "27": 729, "27+cls": 730, "16": 256},
    "identity": {"24": 576, "27": 729, "27+cls": 730, "16": 256},
    "pooler": SPATIAL_4,
    "avgpool": {"24": 144, "27": 196, "27+cls": CLS_REFUSED, "16": 64},  # ceil(27 / 2) = 14
    "pixel_shuffle": SPATIAL_4,
    "patch_merger": SPATIAL_4,
    "ldp": {"24": 144, "27": 196, "27+cls": CLS_REFUSED, "16": 64},  # padded stride-2 conv: ceil(27 / 2) = 14
    "ldpv2": {"24": 144, "27": 144, "27+cls": CLS_REFUSED, "16": 144},
    "c_abstractor": {"24": 144, "27": 144, "27+cls": CLS_REFUSED, "16": 144},
    "resampler": {"24": 256, "27": 256, "27+cls": 256, "16": 256},
    "perceiver": {"24": 64, "27": 64, "27+cls": 64, "16": 64},
    "tokenpacker": SPATIAL_4,
    "qformer": {"24": 32, "27": 32, "27+cls": 32, "16": 32},
}
ALL_NAMES = list(EXPECTED_TOKENS)


def _zoo(name: str, grid=(16, 16), has_cls: bool = False, **options) -> Projector:
    llm_width = ZC if name == "identity" else ZD  # identity keeps the width
    return build_projector(name, ZC, llm_width, grid, has_cls=has_cls, **{**ZOO_OPTIONS.get(name, {}), **options})


def _zoo_parameters(name: str, grid=(16, 16)) -> int:
    """Each design's parameter formula (as in its docstring), for C = 16, d = 32."""
    c, d = ZC, ZD
    n = grid[0] * grid[1]
    if name == "identity":
        return 0
    if name == "linear":
        return c * d + d
    if name == "mlp2x_gelu":
        return c * d + d + d * d + d
    if name == "pooler":
        return 4 * c * d + d + d * d + d
    if name == "avgpool":
        return c * d + d + d * d + d
    if name == "pixel_shuffle":
        return 2 * 4 * c + 4 * c * d + d + d * d + d
    if name == "patch_merger":
        return 2 * c + (4 * c) ** 2 + 4 * c + 4 * c * d + d
    if name == "ldp":
        squeeze = 8  # make_divisible(32 / 4)
        return c * d + d + d * d + d + 2 * (d * d + 14 * d + 2 * d * squeeze + squeeze)
    if name == "ldpv2":
        return c * d + d + d * d + d + 9 * d + d
    if name == "c_abstractor":
        block = 2 * c * c + 15 * c  # hidden width = C: 1x1, LN, depthwise 3x3, LN, 1x1, LN, identity shortcut
        return n * c + 6 * block + c * d + d + d * d + d
    if name == "resampler":
        return c * d + 256 * d + 4 * d * d + 4 * d + 3 * 2 * d + d * d
    if name == "perceiver":
        return c * d + d + 64 * d + 3 * (12 * d * d + 6 * d) + 2 * d
    if name == "tokenpacker":
        e = c
        return c * e + 2 * (c * e + e + e * e + e) + 4 * e * e + 4 * e + 3 * 2 * e + e * d + d + d * d + d
    if name == "qformer":
        h = 64
        return 32 * h + 2 * c + 2 * (14 * h * h + 2 * c * h + 19 * h) + 2 * h + h * d + d
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zoo_shapes_token_counts_and_refusals(name, layout):
    grid, has_cls = LAYOUTS[layout]
    expected = EXPECTED_TOKENS[name][layout]
    if isinstance(expected, str):
        with pytest.raises(ProjectorError, match=rf"projector '{name}': cannot take .*{grid[0]}x{grid[1]} patch grid"
                                                 rf": .*{expected}"):
            _zoo(name, grid, has_cls)
        return
    projector = _zoo(name, grid, has_cls)
    assert projector.num_output_tokens == expected
    with torch.no_grad():
        out = projector(_features(grid[0] * grid[1] + int(has_cls), ZC, batch=2))
    assert out.shape == (2, expected, projector.llm_width) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zoo_parameter_counts_follow_the_formulas(name):
    assert count_parameters(_zoo(name)) == _zoo_parameters(name)
    if name == "c_abstractor":  # its learned positions cover the grid
        assert count_parameters(_zoo(name, (24, 24))) == _zoo_parameters(name, (24, 24))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zoo_gradients_reach_every_parameter(name):
    projector = _zoo(name)
    features = _features(256, ZC).requires_grad_(True)
    projector(features).square().mean().backward()
    assert features.grad.abs().sum() > 0  # the projector passes gradients on (a trainable tower would learn)
    for parameter_name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zoo_safetensors_round_trip(name, tmp_path):
    projector = _zoo(name)
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, tmp_path / "projector.safetensors")
    torch.manual_seed(123)
    reloaded = _zoo(name)
    reloaded.load_state_dict(load_file(tmp_path / "projector.safetensors"), strict=True)
    features = _features(256, ZC)
    with torch.no_grad():
        assert torch.equal(reloaded(features), projector(features))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zoo_chosen_by_name_from_a_config(name):
    from llava_kit.config import config_from_dict

    cfg = config_from_dict({"output_dir": "unused", "model": {
        "vision": {"name_or_path": "tiny:vision"}, "llm": {"name_or_path": "tiny:llm"},
        "projector": {"name": name, "options": ZOO_OPTIONS.get(name, {})}},
        "data": {"path": "x.json", "image_root": "images"}}, check_paths=False)
    llm_width = ZC if name == "identity" else ZD
    projector = build_projector(cfg.model.projector.name, ZC, llm_width, (16, 16), **cfg.model.projector.options)
    assert projector.name == name and projector.num_output_tokens == EXPECTED_TOKENS[name]["16"]


def test_pixel_shuffle_is_internvl_v2_order():
    """Output token (i, j) = its 2x2 block's patches (top-left, top-right, bottom-left, bottom-right) concatenated."""
    from llava_kit.model.projector_pooling import space_to_channels

    rows, cols = 4, 6
    feature_map = torch.randn(2, 3, rows, cols)  # [batch, C, rows, cols]
    merged = space_to_channels(feature_map, 2)  # [batch, 2 * 3, 12]
    for i in range(rows // 2):
        for j in range(cols // 2):
            block = [feature_map[:, :, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
            assert torch.equal(merged[:, i * (cols // 2) + j], torch.cat(block, dim=1))


def test_avgpool_max_mode_keeps_a_feature_one_patch_holds():
    """OneVision's mm_spatial_pool_mode max: a 2x2 block's token is its patches' maximum, so one patch's feature
    reaches the MLP at full strength where average pooling quarters it."""
    features = torch.zeros(1, 16, ZC)  # a 4x4 patch map, row-major
    features[0, 5, 3] = 8.0  # row 1, column 1: inside the top-left 2x2 block
    average, maximum = _zoo("avgpool", grid=(4, 4)), _zoo("avgpool", grid=(4, 4), mode="max")
    maximum.load_state_dict(average.state_dict())  # the same MLP: only the pooling differs
    first_layer = {}
    for name, projector in (("average", average), ("max", maximum)):
        projector.mlp[0].register_forward_hook(lambda module, inputs, output, name=name: first_layer.update(
            {name: inputs[0]}))
        assert projector(features).shape == (1, 4, ZD)
    assert first_layer["max"][0, 0, 3] == 8.0 and first_layer["average"][0, 0, 3] == 2.0
    assert first_layer["max"][0, 1:].abs().sum() == 0 and first_layer["average"][0, 1:].abs().sum() == 0


def test_zoo_options():
    assert _zoo("avgpool", output_grid=4).num_output_tokens == 16
    assert _zoo("avgpool", stride=3).num_output_tokens == 36  # ceil(16 / 3) = 6
    assert _zoo("ldpv2", output_grid=4).num_output_tokens == 16
    assert _zoo("c_abstractor", output_grid=8, depth=1, hidden_width=8).num_output_tokens == 64
    assert _zoo("resampler", num_queries=64, num_heads=4).num_output_tokens == 64
    assert _zoo("perceiver", num_latents=16, depth=1).num_output_tokens == 16
    assert _zoo("qformer", num_queries=8).num_output_tokens == 8
    assert _zoo("tokenpacker", (27, 27), scale=3).num_output_tokens == 81
    assert _zoo("pixel_shuffle", (24, 24), scale=3).num_output_tokens == 64
    assert _zoo("patch_merger", (24, 24), merge_size=4).num_output_tokens == 36
    packer = build_projector("tokenpacker", 4 * ZC, ZD, (16, 16), num_feature_layers=4)  # four layers of width 16
    assert packer.layer_width == ZC and packer(_features(256, 4 * ZC)).shape == (2, 64, ZD)


@pytest.mark.parametrize("name, options, message", [
    ("identity", {}, "identity needs vision_width == llm_width, got 16 and 32"),
    ("resampler", {"num_queries": 50}, "num_queries=50 must be a square number"),
    ("resampler", {"num_heads": 5}, "num_heads=5 does not divide llm_width=32"),
    ("perceiver", {"depth": 0}, "depth must be a positive integer, got 0"),
    ("ldpv2", {"output_grid": 17}, "output_grid=17 is larger than the input grid"),
    ("tokenpacker", {"num_feature_layers": 3}, "vision_width=16 is not num_feature_layers=3 layers"),
    ("avgpool", {"stride": 1.5}, "stride must be a positive integer, got 1.5"),
    ("avgpool", {"mode": "median"}, "mode must be one of average, max, got 'median'"),
])
def test_zoo_bad_options_are_clear_errors(name, options, message):
    with pytest.raises(ProjectorError, match=re.escape(message)):
        build_projector(name, ZC, ZD, (16, 16), **options)


def test_multi_layer_features_reach_tokenpacker_in_the_composite_model(tiny_dirs):
    """feature_layer as a list widens the tower's features; tokenpacker reads its first layer for the queries."""
    from llava_kit.config import ModelConfig, ProjectorConfig, VisionConfig
    from llava_kit.model.build import build_llava

    model_cfg = ModelConfig(vision=VisionConfig(name_or_path=str(tiny_dirs["vision"]), feature_layer=[-2, -1, 0]),
                            projector=ProjectorConfig(name="tokenpacker", options={"num_feature_layers": 3}))
    model_cfg.llm.name_or_path = str(tiny_dirs["llm"])
    model, _ = build_llava(model_cfg)
    tower = model.vision_tower
    assert tower.width == 3 * tower.layer_width and model.multi_modal_projector.layer_width == tower.layer_width
    pixel_values = torch.randn(2, 3, tower.image_size, tower.image_size)
    with torch.no_grad():
        features = model.get_image_features(pixel_values)
    assert features.shape == (2, model.tokens_per_image, model.language_model.config.hidden_size)
    assert model.tokens_per_image == (tower.grid[0] // 2) * (tower.grid[1] // 2)
