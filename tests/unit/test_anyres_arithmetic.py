"""AnyRes arithmetic against transformers' own llava-next functions, on many image sizes and pinpoint lists."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next import modeling_llava_next as hf
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from llava_kit.config import ConfigError, config_from_dict, tile_grids
from llava_kit.model import anyres
from llava_kit.model.anyres import AnyRes, AnyResError, resolve_pinpoints
from llava_kit.model.projectors import build_projector


def _sizes(n=400, seed=0):
    """(height, width) of every kind: tiny, huge, square, 1:1 to 20:1 either way, and near the pinpoints."""
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 1000), (1000, 1), (2, 3), (336, 336), (336, 672), (672, 336), (1008, 336), (337, 673),
             (480, 640), (640, 480), (1080, 1920), (4000, 3000), (64, 192), (192, 64), (96, 256), (256, 96)]
    while len(sizes) < n:
        side = rng.randint(8, 3000)
        ratio = rng.choice([1.0, 1.33, 1.5, 2.0, 2.5, 3.0, 4.0, 7.0, 20.0]) * rng.uniform(0.9, 1.1)
        long_side = min(8000, max(1, int(side * ratio)))
        sizes.append((side, long_side) if rng.random() < 0.5 else (long_side, side))
    return sizes


PINPOINTS = {  # name: (tile size, grid_pinpoints as a user writes them)
    "llava-next-336": (336, None),
    "onevision-384": (384, "(1x1),...,(6x6)"),
    "anyres_max_4-32": (32, "anyres_max_4"),
    "list-32": (32, [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96], [32, 128]]),
    "range-14": (14, "(1x1),...,(2x3)"),
}


@pytest.mark.parametrize("case", sorted(PINPOINTS))
def test_best_resolution_grid_and_view_count_equal_transformers(case):
    tile, spec = PINPOINTS[case]
    resolutions = [list(p) for p in resolve_pinpoints(spec, tile)]
    settings = AnyRes.build(tile, spec, view_tokens=4, token_grid=(2, 2))
    for size in _sizes():
        assert anyres.select_best_resolution(size, resolutions) == select_best_resolution(size, resolutions)
        layout = settings.layout(size)
        assert layout.grid == hf.get_anyres_image_grid_shape(list(size), resolutions, tile)
        assert layout.views == hf.image_size_to_num_patches(list(size), resolutions, tile)
        shaped = np.empty((3, *size), dtype=np.uint8)  # only its shape is read
        fitted = get_patch_output_size(shaped, layout.resolution, ChannelDimension.FIRST)
        assert anyres.fitted_size(size, layout.resolution) == tuple(fitted)


def _hf_token_count(size, resolutions, tile, patch):
    """LlavaNextProcessor's own count (its methods on a stand-in holding what they read)."""
    processor = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=resolutions),
                                      patch_size=patch, num_additional_image_tokens=0)
    processor._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, processor)
    return LlavaNextProcessor._get_number_of_features(processor, size[0], size[1], tile, tile)


@pytest.mark.parametrize("case", sorted(PINPOINTS))
def test_token_counts_equal_the_llava_next_processor(case):
    tile, spec = PINPOINTS[case]
    patch = {336: 14, 384: 16, 32: 4, 14: 7}[tile]
    side = tile // patch
    resolutions = [list(p) for p in resolve_pinpoints(spec, tile)]
    settings = AnyRes.build(tile, spec, view_tokens=side * side, token_grid=(side, side))
    for size in _sizes():
        assert settings.tokens(size) == _hf_token_count(size, resolutions, tile, patch), size


def _hf_pack(features, size, resolutions, tile, patch, newline):
    model = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=tile, patch_size=patch), image_grid_pinpoints=resolutions))
    packed, lengths = hf.LlavaNextModel.pack_image_features(model, [features], torch.tensor([size]), "full", newline)
    return packed[0]


@pytest.mark.parametrize("case", ["llava-next-336", "list-32", "range-14"])
def test_unpadded_features_with_newlines_equal_transformers_pack_image_features(case):
    tile, spec = PINPOINTS[case]
    patch = {336: 14, 32: 4, 14: 7}[tile]
    side = tile // patch
    resolutions = [list(p) for p in resolve_pinpoints(spec, tile)]
    settings = AnyRes.build(tile, spec, view_tokens=side * side, token_grid=(side, side))
    generator = torch.Generator().manual_seed(0)
    newline = torch.randn(8, generator=generator)
    for size in _sizes(60, seed=1):
        layout = settings.layout(size)
        features = torch.randn(layout.views, side * side, 8, generator=generator)
        ours = settings.pack(features, layout, newline)
        assert ours.shape == (layout.tokens, 8)
        assert torch.equal(ours, _hf_pack(features, size, resolutions, tile, patch, newline)), size


def test_a_pooled_token_grid_lays_tiles_out_like_transformers_on_the_grid():
    """A 2x2-pooling projector's 4x4 grid per 32 px tile: the same layout as a token-wise projector on a 4x4 patch
    grid (8 px patches), so transformers' arithmetic with patch 8 is the reference."""
    settings = AnyRes.build(32, "anyres_max_4", view_tokens=16, token_grid=(4, 4))
    resolutions = [list(p) for p in resolve_pinpoints("anyres_max_4", 32)]
    newline = torch.randn(8)
    for size in _sizes(60, seed=2):
        layout = settings.layout(size)
        assert layout.tokens == _hf_token_count(size, resolutions, 32, 8)
        features = torch.randn(layout.views, 16, 8)
        assert torch.equal(settings.pack(features, layout, newline),
                           _hf_pack(features, size, resolutions, 32, 8, newline))


def test_a_cap_pools_the_map_and_every_count_is_what_pack_returns():
    cap = 576 + 1000
    settings = AnyRes.build(336, "(1x1),...,(4x4)", view_tokens=576, token_grid=(24, 24), max_tokens_per_image=cap)
    uncapped = AnyRes.build(336, "(1x1),...,(4x4)", view_tokens=576, token_grid=(24, 24))
    pooled = 0
    for size in _sizes(150, seed=3):
        layout = settings.layout(size)
        assert layout.tokens <= cap
        assert layout.tokens == min(uncapped.tokens(size), layout.tokens)
        if layout.pooled:
            pooled += 1
            height, width = layout.token_map
            assert height * (width + 1) <= cap - 576 < (height + 1) * (width + 2)  # close to the cap, not far below
        features = torch.randn(layout.views, 576, 4)
        assert settings.pack(features, layout, torch.zeros(4)).shape == (layout.tokens, 4)
    assert pooled > 50


def test_pooling_is_bilinear_like_llava_onevision():
    settings = AnyRes.build(32, [[32, 64]], view_tokens=16, token_grid=(4, 4), max_tokens_per_image=16 + 2 * 5)
    layout = settings.layout((32, 64))  # a 4x8 map, capped to 10 tokens with newlines: 2x4
    assert layout.token_map == (2, 4) and layout.pooled and layout.tokens == 26
    features = torch.randn(3, 16, 5)
    newline = torch.randn(5)
    packed = settings.pack(features, layout, newline)
    token_map = features[1:].reshape(1, 2, 4, 4, 5).permute(4, 0, 2, 1, 3).reshape(5, 4, 8)
    expected = torch.nn.functional.interpolate(token_map[None], size=(2, 4), mode="bilinear")[0]
    expected = torch.cat([expected, newline[:, None, None].expand(5, 2, 1)], dim=2).flatten(1).T
    assert torch.equal(packed, torch.cat([features[0], expected]))


def test_a_sample_budget_is_shared_by_its_images():
    settings = AnyRes.build(32, "(1x1),...,(3x3)", view_tokens=16, token_grid=(4, 4), max_tokens_per_image=200,
                            max_image_tokens_per_sample=240)
    size = (96, 96)  # 3x3 tiles: 16 + 12 * 13 = 172 tokens uncapped
    assert settings.sample_tokens([size]) == [172]
    two = settings.sample_tokens([size, size])
    assert two == [settings.tokens(size, 120)] * 2 and sum(two) <= 240
    assert settings.sample_caps(2) == [120, 120]
    assert settings.sample_tokens([size] * 40) == [18] * 40  # each at least the base view + a 1x1 map and newline


def test_concatenating_projectors_take_views_in_order_and_refuse_caps_they_cannot_meet():
    settings = AnyRes.build(32, "anyres_max_2", view_tokens=9, token_grid=None)
    layout = settings.layout((32, 70))
    assert layout.grid == (1, 2) and layout.tokens == 27 and layout.token_map is None
    features = torch.randn(3, 9, 4)
    assert torch.equal(settings.pack(features, layout, None), features.reshape(27, 4))
    with pytest.raises(AnyResError, match="no token grid to pool"):
        AnyRes.build(32, "anyres_max_2", view_tokens=9, token_grid=None, max_tokens_per_image=20)
    with pytest.raises(AnyResError, match="no token grid to pool"):
        AnyRes.build(32, "anyres_max_2", view_tokens=9, token_grid=None, max_image_tokens_per_sample=100)
    with pytest.raises(AnyResError, match="below the smallest image"):
        AnyRes.build(32, None, view_tokens=16, token_grid=(4, 4), max_tokens_per_image=17)


def test_views_are_the_whole_image_then_its_tiles_row_by_row():
    from PIL import Image

    settings = AnyRes.build(32, [[32, 96]], view_tokens=16, token_grid=(4, 4))
    image = Image.new("RGB", (90, 30), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 30, 30))
    image.paste((0, 0, 255), (60, 0, 90, 30))
    views = settings.views(image)
    assert [v.size for v in views] == [(90, 30), (32, 32), (32, 32), (32, 32)]
    assert views[0] is image
    # fitted to 96x32, no padding: red left, white middle, blue right
    assert views[1].getpixel((16, 16)) == (255, 0, 0) and views[3].getpixel((16, 16)) == (0, 0, 255)
    assert views[2].getpixel((16, 16)) == (255, 255, 255)
    tall = settings.views(Image.new("RGB", (30, 30), (255, 255, 255)))
    assert tall[1].getpixel((0, 16)) == (0, 0, 0) and tall[2].getpixel((16, 16)) == (255, 255, 255)  # padded black


def test_pinpoint_forms_and_their_checks():
    assert tile_grids("(1x1),...,(2x3)") == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert tile_grids("anyres_max_3") == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]
    assert resolve_pinpoints(None, 336) == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert resolve_pinpoints("anyres_max_2", 10) == ((10, 10), (10, 20), (20, 10))
    with pytest.raises(AnyResError, match=r"\[300, 672\] is not a grid of 336 px tiles"):
        resolve_pinpoints([[300, 672]], 336)
    for bad in ("(2x2),...,(1x1)", "anyres_max_0", "max_4"):
        with pytest.raises(ValueError):
            tile_grids(bad)


def _run_config(**vision):
    return {"stage": "pretrain", "output_dir": "runs/x", "model": {"vision": {"name_or_path": "tiny:vision", **vision},
            "llm": {"name_or_path": "tiny:llm"}}, "data": {"path": "d.json", "image_root": "."}}


def test_config_checks_the_anyres_keys_up_front():
    cfg = config_from_dict(_run_config(image_strategy="anyres", grid_pinpoints="anyres_max_4",
                                       max_tokens_per_image=1000), check_paths=False)
    assert cfg.model.vision.image_strategy == "anyres"
    with pytest.raises(ConfigError) as err:
        config_from_dict(_run_config(grid_pinpoints="anyres_max_4", max_tokens_per_image=10), check_paths=False)
    assert "only applies with `model.vision.image_strategy: anyres`" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict(_run_config(image_strategy="anyres", grid_pinpoints="(3x3),...,(1x1)",
                                     max_tokens_per_image=0), check_paths=False)
    assert "2 problem(s)" in str(err.value) and "empty range" in str(err.value)
    with pytest.raises(ConfigError, match="image_strategy"):
        config_from_dict(_run_config(image_strategy="tiles"), check_paths=False)
    with pytest.raises(ConfigError, match=r"\[height, width\]"):
        config_from_dict(_run_config(image_strategy="anyres", grid_pinpoints=[[336]]), check_paths=False)


def test_every_projector_declares_how_it_takes_tiles():
    from llava_kit.compare.runner import LISTED_PROJECTORS

    options = {"ldpv2": {"output_grid": 4}, "c_abstractor": {"output_grid": 4, "depth": 1},
               "resampler": {"num_queries": 16}, "perceiver": {"num_latents": 16}, "qformer": {"hidden_width": 32}}
    for name in LISTED_PROJECTORS:
        projector = build_projector(name, 32, 32, (8, 8), **options.get(name, {}))
        assert projector.tiles in ("grid", "concat") and projector.tiles_refusal() is None
        if projector.tiles == "grid":  # the output lies on its token grid, row by row
            rows, cols = projector.token_grid
            assert rows * cols == projector.num_output_tokens
        else:
            assert projector.token_grid is None
    cls_tokens = build_projector("mlp2x_gelu", 32, 32, (8, 8), has_cls=True)
    assert "CLS token per tile" in cls_tokens.tiles_refusal()
    assert build_projector("resampler", 32, 32, (8, 8), has_cls=True, num_queries=4).tiles_refusal() is None
