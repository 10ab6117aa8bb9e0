"""The projector registry: shapes, parameter counts, LLaVA-compatible state dicts, errors.

    .venv/bin/python -m pytest tests/unit/test_projectors.py -q
"""

import math

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
    assert projector_names() == ["linear", "mlp{N}x_gelu"]
    assert resolve_projector("mlp2x_gelu") == (projectors.MlpGeluProjector, {"depth": 2})
    assert resolve_projector("linear") == (projectors.LinearProjector, {})
    assert build_projector("mlp12x_gelu", C, D, GRID).depth == 12


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def test_errors_are_value_errors():
    assert issubclass(ProjectorError, ValueError)


@pytest.mark.parametrize("name, suggestion", [
    ("mlp2x-gelu", "mlp2x_gelu"), ("Linear", "linear"), ("mlp2x_relu", "mlp2x_gelu"), ("resampler", None)])
def test_unknown_name_lists_valid_names_and_the_closest(name, suggestion):
    with pytest.raises(ProjectorError) as error:
        build_projector(name, C, D, GRID)
    message = str(error.value)
    assert f"unknown projector {name!r}" in message and "linear, mlp{N}x_gelu" in message
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
