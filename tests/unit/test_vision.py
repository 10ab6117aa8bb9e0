"""Vision towers on tiny random models saved to disk, loaded through the same code as real checkpoints.

    .venv/bin/python -m pytest tests/unit/test_vision.py -q
"""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
)

from llava_kit.model.vision import VisionTower, VisionTowerError, build_vision_tower

SIZE, PATCH, WIDTH, LAYERS = 32, 8, 32, 2
GRID = (SIZE // PATCH, SIZE // PATCH)
VISION_KWARGS = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                     image_size=SIZE, patch_size=PATCH)
OPEN_CLIP_NAME = "llava-kit-test-tiny-vit"  # registered with open_clip by the fixture below
OPEN_CLIP_LAYERS = 3


def _images() -> list[Image.Image]:
    """A square and a wide RGB image, and a grayscale one."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8))]


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def _hidden_states(model, pixel_values) -> tuple[torch.Tensor, ...]:
    """transformers' reference: num_layers + 1 tensors [batch, n_prefix + rows*cols, width]."""
    with torch.no_grad():
        return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def _encode(tower: VisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tower.encode(pixel_values)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPVisionModel + CLIP image processor (shortest-edge resize and centre crop, as published)."""
    path = tmp_path_factory.mktemp("clip_vision")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION_KWARGS, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip_vision")
    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(**VISION_KWARGS)).save_pretrained(path)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_tower(clip_dir):
    return build_vision_tower(str(clip_dir))


@pytest.fixture(scope="module")
def open_clip_name(tmp_path_factory):
    """A tiny open_clip ViT registered as OPEN_CLIP_NAME (open_clip takes the JSON file name as the model name)."""
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": SIZE, "layers": OPEN_CLIP_LAYERS, "width": WIDTH, "head_width": 16,
                             "patch_size": PATCH},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return OPEN_CLIP_NAME


# ---------------------------------------------------------------------------------------------------------------
# transformers: CLIP and SigLIP
# ---------------------------------------------------------------------------------------------------------------

def test_clip_geometry_and_features(clip_dir, clip_tower):
    full = build_vision_tower(str(clip_dir), select_strategy="full")
    assert isinstance(clip_tower, VisionTower) and clip_tower.backend == "transformers"
    assert (clip_tower.width, clip_tower.image_size, clip_tower.grid, clip_tower.has_cls) == (WIDTH, SIZE, GRID, True)
    assert (clip_tower.num_tokens, full.num_tokens) == (16, 17)
    assert clip_tower.image_mean == pytest.approx(CLIPImageProcessor().image_mean)

    pixel_values = clip_tower.preprocess(_images())
    assert pixel_values.shape == (3, 3, SIZE, SIZE) and pixel_values.dtype == torch.float32
    hidden = _hidden_states(CLIPVisionModel.from_pretrained(clip_dir), pixel_values)
    assert torch.equal(_encode(clip_tower, pixel_values), hidden[-2][:, 1:])  # "patch": CLS dropped
    assert torch.equal(_encode(full, pixel_values), hidden[-2])  # "full": CLS first
    assert clip_tower.describe() == {
        "backend": "transformers", "name_or_path": str(clip_dir), "pretrained": None, "feature_layer": -2,
        "select_strategy": "patch", "image_size": SIZE, "grid": list(GRID), "width": WIDTH, "has_cls": True,
        "num_layers": LAYERS, "num_tokens": 16}
    json.dumps(clip_tower.describe())


def test_siglip_has_no_cls_and_keeps_every_token(siglip_dir):
    pixel_values = _pixels()
    hidden = _hidden_states(SiglipVisionModel.from_pretrained(siglip_dir), pixel_values)
    for strategy in ("patch", "full"):
        tower = build_vision_tower(str(siglip_dir), select_strategy=strategy)
        assert (tower.has_cls, tower.grid, tower.num_tokens) == (False, GRID, 16)
        assert tower.image_mean == (0.5, 0.5, 0.5)
        assert torch.equal(_encode(tower, pixel_values), hidden[-2])  # nothing sliced off


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_layers_are_raw_block_outputs(family, clip_dir, siglip_dir):
    """-1 = last block output before the final norm, 0 = embedding output: transformers' hidden_states index."""
    if family == "clip":
        path, model_class, n_prefix = clip_dir, CLIPVisionModel, 1
    else:
        path, model_class, n_prefix = siglip_dir, SiglipVisionModel, 0
    model = model_class.from_pretrained(path)
    pixel_values = _pixels()
    hidden = _hidden_states(model, pixel_values)
    for layer in (-1, 0, 1, -(LAYERS + 1)):
        tower = build_vision_tower(str(path), feature_layer=layer)
        assert torch.equal(_encode(tower, pixel_values), hidden[layer][:, n_prefix:])
    if family == "siglip":  # SigLIP's last_hidden_state has post_layernorm applied; layer -1 must not
        with torch.no_grad():
            normed = model(pixel_values=pixel_values).last_hidden_state
        assert not torch.allclose(hidden[-1], normed)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_blocks_after_the_deepest_chosen_layer_are_not_run(family, clip_dir, siglip_dir):
    """Layer -2 never runs the last block (its compute is saved), yet gives exactly hidden_states[-2]; the block
    stays in the module (saving and export keep every weight)."""
    path, model_class = (clip_dir, CLIPVisionModel) if family == "clip" else (siglip_dir, SiglipVisionModel)
    pixel_values = _pixels()
    hidden = _hidden_states(model_class.from_pretrained(path), pixel_values)
    tower = build_vision_tower(str(path), feature_layer=-2, select_strategy="full")
    calls = []
    blocks = tower.vision_model.encoder.layers
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    assert torch.equal(_encode(tower, pixel_values), hidden[-2])
    assert calls == list(range(LAYERS - 1))
    assert len(tower.vision_model.encoder.layers) == LAYERS  # restored after the call
    calls.clear()
    tower_last = build_vision_tower(str(path), feature_layer=[-1, -3])
    for index, block in enumerate(tower_last.vision_model.encoder.layers):
        block.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    _encode(tower_last, pixel_values)
    assert calls == list(range(LAYERS))  # the last layer chosen: every block runs


def test_preprocess_resizes_the_whole_image_without_cropping(clip_tower, clip_dir):
    # Three vertical bands, red | green | blue: a centre crop of the wide image would keep only green.
    bands = np.zeros((SIZE, 3 * SIZE, 3), dtype=np.uint8)
    bands[:, :SIZE, 0] = bands[:, SIZE:2 * SIZE, 1] = bands[:, 2 * SIZE:, 2] = 255
    pixel_values = clip_tower.preprocess([Image.fromarray(bands)])  # [1, 3, SIZE, SIZE]
    left, right = pixel_values[0, :, SIZE // 2, 1], pixel_values[0, :, SIZE // 2, -2]
    assert left.argmax() == 0 and right.argmax() == 2
    # On a square image it is exactly what the published processor (shortest-edge resize + centre crop) gives.
    square = _images()[0]
    published = AutoImageProcessor.from_pretrained(clip_dir)
    ours = clip_tower.preprocess([square])
    # Exactly what the published processor's PIL twin gives (the tower prefers it: ~15x faster on CPU) ...
    pil_twin = type(clip_tower.image_processor).from_dict(published.to_dict())
    torch.testing.assert_close(ours, pil_twin(images=[square], return_tensors="pt")["pixel_values"])
    # ... and what the torchvision one gives, up to resampling details.
    torch.testing.assert_close(ours, published(images=[square], return_tensors="pt")["pixel_values"],
                               atol=0.05, rtol=0)


def test_save_and_reload_gives_identical_features(clip_tower, siglip_dir, tmp_path):
    siglip = build_vision_tower(str(siglip_dir), feature_layer=-1)
    for name, tower in [("clip", clip_tower), ("siglip", siglip)]:
        tower.save_pretrained(tmp_path / name)
        reloaded = build_vision_tower(str(tmp_path / name), feature_layer=tower.feature_layer)
        images = _images()
        assert torch.equal(reloaded.preprocess(images), tower.preprocess(images))
        assert torch.equal(_encode(reloaded, tower.preprocess(images)), _encode(tower, tower.preprocess(images)))
        assert reloaded.describe() == {**tower.describe(), "name_or_path": str(tmp_path / name)}


def test_full_clip_checkpoint_loads_its_vision_part(tmp_path):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(2)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION_KWARGS, projection_dim=16))
    full.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(tmp_path)
    tower = build_vision_tower(str(tmp_path))
    assert (tower.grid, tower.has_cls, tower.num_layers) == (GRID, True, LAYERS)
    pixel_values = _pixels()
    with torch.no_grad():
        hidden = full.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert torch.equal(_encode(tower, pixel_values), hidden[-2][:, 1:])


def test_encode_casts_to_the_tower_dtype_and_keeps_the_graph(siglip_dir):
    tower = build_vision_tower(str(siglip_dir)).to(torch.float64)
    features = tower.encode(_pixels())  # float32 input
    assert features.dtype == torch.float64
    features.sum().backward()  # no no_grad inside: a trainable tower gets gradients
    assert tower.vision_model.embeddings.patch_embedding.weight.grad is not None


def test_missing_processor_falls_back_to_the_family_default(clip_dir, tmp_path):
    CLIPVisionModel.from_pretrained(clip_dir).save_pretrained(tmp_path)  # no preprocessor_config.json
    tower = build_vision_tower(str(tmp_path))
    assert tower.preprocess(_images()).shape == (3, 3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------------------------

def _open_clip_block_outputs(visual, pixel_values) -> list[torch.Tensor]:
    """A manual pass: [embedding output after ln_pre, block 1 output, ...], each [batch, 1 + rows*cols, width]."""
    with torch.no_grad():
        states = [visual._embeds(pixel_values)]
        for block in visual.transformer.resblocks:
            states.append(block(states[-1]))
    return states


def test_open_clip_layers_mean_the_same_as_transformers(open_clip_name):
    patch = build_vision_tower(open_clip_name)  # backend "auto" recognises a registered open_clip name
    assert patch.backend == "open_clip" and patch.image_processor is None
    assert (patch.width, patch.image_size, patch.grid, patch.has_cls, patch.num_layers) == (
        WIDTH, SIZE, GRID, True, OPEN_CLIP_LAYERS)
    pixel_values = patch.preprocess(_images())
    assert pixel_values.shape == (3, 3, SIZE, SIZE) and pixel_values.dtype == torch.float32
    assert patch.visual.transformer.batch_first  # the manual pass below feeds [batch, tokens, width]
    states = _open_clip_block_outputs(patch.visual, pixel_values)
    assert torch.equal(_encode(patch, pixel_values), states[-2][:, 1:])

    full = build_vision_tower(open_clip_name, backend="open_clip", select_strategy="full", feature_layer=-1)
    full.visual.load_state_dict(patch.visual.state_dict())
    assert full.num_tokens == 17
    last = _encode(full, pixel_values)
    assert torch.equal(last, states[-1])  # CLS first, then the patches, before ln_post
    with torch.no_grad():
        assert not torch.allclose(last, full.visual.ln_post(states[-1]))
    embeddings = build_vision_tower(open_clip_name, feature_layer=0)
    embeddings.visual.load_state_dict(patch.visual.state_dict())
    assert torch.equal(_encode(embeddings, pixel_values), states[0][:, 1:])


def test_open_clip_checkpoint_file_save_and_reload(open_clip_name, tmp_path):
    torch.manual_seed(3)
    model = open_clip.create_model(open_clip_name).eval()  # eval: the same attention kernels as the tower
    checkpoint = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), checkpoint)
    tower = build_vision_tower(open_clip_name, backend="open_clip", pretrained=str(checkpoint), select_strategy="full")
    assert tower.describe()["pretrained"] == str(checkpoint)
    pixel_values = tower.preprocess(_images())
    assert torch.equal(_encode(tower, pixel_values), _open_clip_block_outputs(model.visual, pixel_values)[-2])

    tower.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "open_clip_config.json").read_text())
    assert str(tmp_path) not in json.dumps(saved_config)  # nothing points back at the original files
    reloaded = build_vision_tower(str(tmp_path / "saved"), select_strategy="full")  # "auto": the marker file
    assert reloaded.backend == "open_clip"
    assert torch.equal(reloaded.preprocess(_images()), pixel_values)
    assert torch.equal(_encode(reloaded, pixel_values), _encode(tower, pixel_values))

    # open_clip's own hub layout (open_clip_config.json + full CLIP weights) loads as a directory too.
    hub_dir = tmp_path / "hub_layout"
    hub_dir.mkdir()
    (hub_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(open_clip_name),
                                                               "preprocess_cfg": {}}))
    save_file(model.state_dict(), hub_dir / "open_clip_model.safetensors")
    from_hub_layout = build_vision_tower(str(hub_dir), select_strategy="full")
    assert torch.equal(_encode(from_hub_layout, pixel_values), _encode(tower, pixel_values))


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def test_errors_are_value_errors():
    assert issubclass(VisionTowerError, ValueError)


def test_unknown_model_type(tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path)
    with pytest.raises(VisionTowerError, match=r"'vit' model; supported .*clip.*siglip"):
        build_vision_tower(str(tmp_path))


def test_path_not_found(tmp_path):
    with pytest.raises(VisionTowerError, match="path not found"):
        build_vision_tower(str(tmp_path / "missing"))
    with pytest.raises(VisionTowerError, match="is not a directory"):
        build_vision_tower(str(tmp_path / "missing"), backend="open_clip")


def test_feature_layer_out_of_range(clip_dir, open_clip_name):
    with pytest.raises(VisionTowerError, match=r"feature_layer=3 is out of range for a 2-block encoder: use -3\.\.2"):
        build_vision_tower(str(clip_dir), feature_layer=3)
    with pytest.raises(VisionTowerError, match="out of range"):
        build_vision_tower(str(clip_dir), feature_layer=-4)
    with pytest.raises(VisionTowerError, match="out of range for a 3-block"):
        build_vision_tower(open_clip_name, feature_layer=-5)
    with pytest.raises(VisionTowerError, match="must be an integer"):
        build_vision_tower(str(clip_dir), feature_layer="-2")


def test_unknown_select_strategy(clip_dir):
    with pytest.raises(VisionTowerError, match="did you mean 'patch'"):
        build_vision_tower(str(clip_dir), select_strategy="patches")
    with pytest.raises(VisionTowerError, match="transformers' LlavaConfig name for 'patch'"):
        build_vision_tower(str(clip_dir), select_strategy="default")


def test_unknown_backend_and_misplaced_pretrained(clip_dir):
    with pytest.raises(VisionTowerError, match="unknown vision backend 'timm'"):
        build_vision_tower(str(clip_dir), backend="timm")
    with pytest.raises(VisionTowerError, match="pretrained='openai' only applies to open_clip"):
        build_vision_tower(str(clip_dir), backend="transformers", pretrained="openai")


def test_unknown_open_clip_name_lists_close_names():
    with pytest.raises(VisionTowerError, match=r"unknown open_clip model 'ViT-B-322'; close names: .*ViT-B-32"):
        build_vision_tower("ViT-B-322", backend="open_clip")


def test_unknown_open_clip_tag(open_clip_name):
    with pytest.raises(VisionTowerError, match="neither a known tag .* nor an existing checkpoint file"):
        build_vision_tower(open_clip_name, backend="open_clip", pretrained="no-such-tag")


def test_open_clip_dir_loaded_as_transformers_says_so(open_clip_name, tmp_path):
    build_vision_tower(open_clip_name).save_pretrained(tmp_path)
    with pytest.raises(VisionTowerError, match="backend='open_clip'"):
        build_vision_tower(str(tmp_path), backend="transformers")


def test_checkpoint_missing_vision_weights(clip_dir, tmp_path):
    CLIPVisionModel.from_pretrained(clip_dir).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[next(k for k in weights if "layers.0.mlp.fc1.weight" in k)]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VisionTowerError, match="lacks vision weights"):
        build_vision_tower(str(tmp_path))


def test_encode_rejects_wrong_pixel_shape(clip_tower):
    with pytest.raises(VisionTowerError, match=r"expects pixel values of shape \[batch, 3, 32, 32\]"):
        clip_tower.encode(torch.zeros(1, 3, 64, 64))


def test_open_clip_timm_trunk(tmp_path):
    """open_clip models whose image tower is a timm ViT (SigLIP, EVA, ... in open_clip) go through the same path."""
    config = {"embed_dim": 16,
              "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                             "timm_pool": "", "timm_proj": "linear", "image_size": 224},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "llava-kit-test-timm-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "llava-kit-test-timm-vit.json")
    tower = build_vision_tower("llava-kit-test-timm-vit", select_strategy="full")
    assert (tower.width, tower.image_size, tower.grid, tower.has_cls, tower.num_layers, tower.num_tokens) == (
        192, 224, (14, 14), True, 12, 197)
    pixel_values = tower.preprocess(_images()[:1])
    trunk = tower.visual.trunk
    with torch.no_grad():  # manual pass: timm's embedding steps, then blocks 1..11
        states = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixel_values))))
        for block in trunk.blocks[:-1]:
            states = block(states)
    features = _encode(tower, pixel_values)
    assert torch.equal(features, states)

    tower.save_pretrained(tmp_path / "saved")
    reloaded = build_vision_tower(str(tmp_path / "saved"), select_strategy="full")
    assert torch.equal(_encode(reloaded, pixel_values), features)


# ---------------------------------------------------------------------------------------------------------------
# Multi-layer features: several layers side by side
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_multi_layer_features_concatenate_layers_in_list_order(family, clip_dir, siglip_dir):
    path, model_class, n_prefix = (clip_dir, CLIPVisionModel, 1) if family == "clip" else (
        siglip_dir, SiglipVisionModel, 0)
    hidden = _hidden_states(model_class.from_pretrained(path), _pixels())
    layers = [-1, 0, -2]
    tower = build_vision_tower(str(path), feature_layer=layers, select_strategy="full")
    assert (tower.width, tower.layer_width, tower.num_tokens) == (3 * WIDTH, WIDTH, GRID[0] * GRID[1] + n_prefix)
    expected = torch.cat([hidden[layer] for layer in layers], dim=-1)  # [batch, tokens, 3 * width]
    assert torch.equal(_encode(tower, _pixels()), expected)
    assert tower.describe()["feature_layer"] == layers and tower.describe()["width"] == 3 * WIDTH


def test_multi_layer_features_open_clip(open_clip_name):
    patch = build_vision_tower(open_clip_name, feature_layer=-2)
    multi = build_vision_tower(open_clip_name, feature_layer=[-1, 0, 1])
    multi.visual.load_state_dict(patch.visual.state_dict())
    pixel_values = patch.preprocess(_images())
    states = _open_clip_block_outputs(patch.visual, pixel_values)
    expected = torch.cat([states[-1][:, 1:], states[0][:, 1:], states[1][:, 1:]], dim=-1)
    assert multi.width == 3 * WIDTH and torch.equal(_encode(multi, pixel_values), expected)


def test_multi_layer_errors(clip_dir):
    with pytest.raises(VisionTowerError, match="feature_layer is an empty list"):
        build_vision_tower(str(clip_dir), feature_layer=[])
    with pytest.raises(VisionTowerError, match=r"feature_layer=7 is out of range for a 2-block encoder"):
        build_vision_tower(str(clip_dir), feature_layer=[-2, 7])
    with pytest.raises(VisionTowerError, match="must be an integer .* or a list of them, got '-2'"):
        build_vision_tower(str(clip_dir), feature_layer=[-2, "-2"])


def test_multi_layer_feature_layer_in_a_config():
    from llava_kit.config import ConfigError, config_from_dict

    base = {"output_dir": "unused", "model": {"vision": {"name_or_path": "tiny:vision"},
                                              "llm": {"name_or_path": "tiny:llm"}},
            "data": {"path": "x.json", "image_root": "images"}}
    base["model"]["vision"]["feature_layer"] = [-2, -3]
    assert config_from_dict(base, check_paths=False).model.vision.feature_layer == [-2, -3]
    for bad, message in (([], "is an empty list"), ([-2, "x"], "feature_layer` must be")):
        base["model"]["vision"]["feature_layer"] = bad
        with pytest.raises(ConfigError, match=message):
            config_from_dict(base, check_paths=False)
