"""AnyRes through the product: counts from sizes agree with the forward pass, the feature cache, packing, multi-image
budgets, whole-image truncation, and a run that trains, merges and chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_kit.data.dataset import Collator
from llava_kit.data.encode import EncodeSettings, encode_sample
from llava_kit.data.multimodal import attach_feature_cache, build_dataset
from llava_kit.data.packing import PackedCollator, PackedLlavaDataset
from llava_kit.model.build import build_llava

ANYRES = {"model.vision.image_strategy": "anyres", "model.vision.grid_pinpoints": "anyres_max_4",
          "data.max_seq_len": 1024, "data.feature_cache": "off"}


def image_tokens(example, image_token_id) -> int:
    return example.input_ids.count(image_token_id)


@pytest.fixture
def anyres_sft(make_config):
    cfg = make_config("anyres", stage="sft", **ANYRES)
    torch.manual_seed(0)
    model, tokenizer = build_llava(cfg.model)
    return cfg, model.eval(), tokenizer


def test_every_images_tokens_come_from_its_size_and_the_forward_agrees(anyres_sft):
    cfg, model, tokenizer = anyres_sft
    dataset = build_dataset(cfg, model, tokenizer)
    assert len(dataset) == 48
    counts = set()
    for example in dataset.examples:
        expected = model.image_token_counts(example.image_sizes)
        assert image_tokens(example, model.image_token_id) == sum(expected)
        counts.update(expected)
    assert len(counts) > 5, "sizes and aspects differ, so the counts do"
    assert len(set(dataset.lengths)) > 5, "length grouping sees each sample's own length"
    collate = Collator(tokenizer.pad_token_id)
    with torch.no_grad():
        for start in range(0, len(dataset), 12):
            batch = collate([dataset[i] for i in range(start, start + 12)])
            n_views = sum(model.anyres.layout(size).views for size in batch["image_sizes"].tolist())
            assert batch["pixel_values"].shape[0] == n_views
            assert model(**batch)["loss"].isfinite()  # a count mismatch would raise in get_placeholder_mask


def test_cached_tile_features_give_the_same_loss_as_the_tower(anyres_sft, tmp_path):
    cfg, model, tokenizer = anyres_sft
    dataset = build_dataset(cfg, model, tokenizer)
    dataset.examples = dataset.examples[:6]
    model.vision_tower.requires_grad_(False)  # the cache serves frozen towers
    collate = Collator(tokenizer.pad_token_id)
    with torch.no_grad():
        from_pixels = model(**collate([dataset[i] for i in range(6)]))["loss"]
        cached_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"feature_cache": "auto", "feature_cache_dir": str(tmp_path / "cache")})})
        attach_feature_cache(cached_cfg, model, dataset, torch.device("cpu"))
        batch = collate([dataset[i] for i in range(6)])
        assert "pixel_values" not in batch and batch["vision_features"].shape[0] == sum(
            model.anyres.layout(s).views for s in batch["image_sizes"].tolist())
        from_cache = model(**batch)["loss"]
    torch.testing.assert_close(from_cache, from_pixels, rtol=2e-3, atol=1e-4)  # fp16 storage of the features
    listing = json.loads(next((tmp_path / "cache").glob("*/shard-*.json")).read_text())
    assert len(listing["images"]) == 6 and len(listing["views"]) == 6 and min(listing["views"]) >= 2


def test_packed_anyres_samples_give_the_losses_of_padded_ones(anyres_sft):
    cfg, model, tokenizer = anyres_sft
    dataset = build_dataset(cfg, model, tokenizer)
    dataset.examples = dataset.examples[:3]
    packed_dataset = PackedLlavaDataset(dataset, block_size=10**6)
    packed = PackedCollator(tokenizer.pad_token_id)([packed_dataset[0]])
    assert packed["image_sizes"].shape == (3, 2)
    with torch.no_grad():
        packed_loss = model(**packed)["loss"]
        order = packed_dataset.blocks[0]
        padded = Collator(tokenizer.pad_token_id)([dataset[i] for i in order])
        assert int((padded["labels"][:, 1:] != -100).sum()) == int((packed["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(packed_loss, model(**padded)["loss"], rtol=1e-4, atol=1e-5)


def _settings(model, tokenizer, max_seq_len, overlong="truncate"):
    return EncodeSettings(tokenizer, "chatml", max_seq_len, overlong, None, model.image_token_id,
                          model.tokens_per_image, model.anyres)


def test_an_image_whose_tokens_do_not_fit_is_dropped_whole(anyres_sft):
    _, model, tokenizer = anyres_sft
    sizes = [(64, 64), (64, 256)]  # one tile, then four: 64 + 8 * 9 = 136 and 64 + 8 * 33 = 328 tokens
    counts = model.image_token_counts(sizes)
    assert counts == [136, 328]
    messages = [{"role": "user", "content": "<image>\nWhat shape is this?"}, {"role": "assistant", "content": "A star."},
                {"role": "user", "content": "<image>\nAnd this?"}, {"role": "assistant", "content": "A circle."}]
    whole = encode_sample(messages, 2, None, _settings(model, tokenizer, 4096), sizes)
    second = len(whole.input_ids) - whole.input_ids[::-1].index(model.image_token_id) - 328  # its first token
    for limit in (second + 10, second + 300):  # the second image would be cut
        enc = encode_sample(messages, 2, None, _settings(model, tokenizer, limit), sizes)
        assert enc.truncated and enc.n_images == 1 and len(enc.input_ids) <= limit
        assert enc.input_ids.count(model.image_token_id) == 136
    with pytest.raises(ValueError, match="no supervised tokens left"):  # the first answer needs the first image
        encode_sample(messages, 2, None, _settings(model, tokenizer, whole.input_ids.index(model.image_token_id) + 50),
                      sizes)


def test_a_multi_image_sample_shares_its_token_budget(make_config, tmp_path):
    shapes = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"
    records = [{"id": "two", "image": ["train/000000.png", "train/000001.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat shapes are these?"},
        {"from": "gpt", "value": "A square and a star."}]},
        {"id": "one", "image": "train/000000.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": "A square."}]}]
    (tmp_path / "multi.json").write_text(json.dumps(records))
    cfg = make_config("multi", stage="sft", **ANYRES, **{"data.path": str(tmp_path / "multi.json"),
                                                        "data.image_root": str(shapes / "images"),
                                                        "model.vision.max_image_tokens_per_sample": 200})
    model, tokenizer = build_llava(cfg.model)
    dataset = build_dataset(cfg, model, tokenizer)
    two, one = dataset.examples
    assert two.image_caps == [100, 100] and one.image_caps == [200]
    assert image_tokens(two, model.image_token_id) <= 200 and image_tokens(one, model.image_token_id) <= 200
    assert image_tokens(two, model.image_token_id) > image_tokens(one, model.image_token_id) / 2
    with torch.no_grad():
        batch = Collator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
        assert batch["image_token_caps"].tolist() == [100, 100, 200]
        assert model(**batch)["loss"].isfinite()


def _wide_image(width=240, height=80):
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste((220, 30, 30), (100, 20, 140, 60))
    return image


def served_answer(service, image_path: Path, question: str) -> str:
    """The answer of `llava-kit serve` (an OpenAI request over 127.0.0.1, the image as a data URL)."""
    import base64
    import http.client

    from llava_kit.serve.server import ServerSettings, start_server

    server = start_server(service, ServerSettings(model_name="anyres", max_new_tokens=6), port=0)
    try:
        url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
        body = {"model": "anyres", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}
        connection = http.client.HTTPConnection(*server.server_address, timeout=300)
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
        assert response.status == 200, data
        return data["choices"][0]["message"]["content"]
    finally:
        server.shutdown()


def test_an_anyres_run_trains_merges_and_chats(make_config, tmp_path):
    from llava_kit.export.merge import merge_run
    from llava_kit.inference import ChatSession, GenerationService, SamplingParams
    from llava_kit.loader import open_model_dir
    from llava_kit.train.engine import train

    common = {**ANYRES, "data.feature_cache": "auto", "data.feature_cache_dir": str(tmp_path / "cache"),
              "train.max_steps": 2, "model.projector.name": "avgpool", "model.vision.max_tokens_per_image": 120}
    pretrain = train(make_config("pt", **common))
    weights = load_file(str(pretrain / "projector.safetensors"))
    assert weights["image_newline"].shape == (256,)
    sft = train(make_config("sft", stage="sft", **common, **{"model.init_from": str(pretrain)}))
    merged = merge_run(sft, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["image_strategy"]["max_tokens_per_image"] == 120

    image = _wide_image()
    question = [{"role": "user", "content": "<image>\nWhat shape is in the image?"}]
    answers = []
    for directory in (sft, merged):
        loaded = open_model_dir(directory)
        assert loaded.model.anyres is not None and loaded.model.image_newline is not None
        service = GenerationService.from_loaded(loaded)
        prompt = service.prepare(question, [image])
        assert prompt.input_ids.count(loaded.model.image_token_id) == loaded.model.image_token_counts([(80, 240)])[0]
        assert prompt.pixel_values.shape[0] == loaded.model.anyres.layout((80, 240)).views
        answers.append(service.answer(question, [image], SamplingParams(max_new_tokens=6)).text)
    assert answers[0] == answers[1]
    image.save(tmp_path / "wide.png")
    assert served_answer(GenerationService.from_loaded(open_model_dir(merged)), tmp_path / "wide.png",
                         "What shape is in the image?") == answers[1]
    session = ChatSession.from_loaded(open_model_dir(merged), SamplingParams(max_new_tokens=6))
    session.set_image(str(tmp_path / "wide.png"))
    assert session.ask("What shape is in the image?") == answers[1]
    session.set_image(str(tmp_path / "wide.png"))  # a second image: the conversation's images share the budget
    assert isinstance(session.ask("And this one?"), str)


def test_a_fixed_pretrain_projector_starts_an_anyres_sft(make_config, tmp_path, caplog):
    from llava_kit.train.engine import train

    pretrain = train(make_config("pt-fixed", **{"train.max_steps": 1}))
    with caplog.at_level("INFO"):
        sft = train(make_config("sft-anyres", stage="sft", **ANYRES, **{"model.init_from": str(pretrain),
                                                                       "train.max_steps": 1}))
    assert "image_newline starts fresh" in caplog.text
    assert "image_newline" in load_file(str(sft / "projector.safetensors"))


def test_projectors_without_a_token_grid_concatenate_tiles_and_refuse_a_cap(make_config):
    from llava_kit.model.anyres import AnyResError

    options = {"model.projector.name": "resampler", "model.projector.options": {"num_queries": 16}}
    cfg = make_config("resampler", stage="sft", **ANYRES, **options)
    model, tokenizer = build_llava(cfg.model)
    assert model.image_newline is None
    assert model.image_token_counts([(64, 192)]) == [16 * (1 + 3)]  # base + 1x3 tiles, 16 queries each
    with pytest.raises(AnyResError, match="no token grid to pool"):
        build_llava(make_config("capped", stage="sft", **ANYRES, **options,
                                **{"model.vision.max_tokens_per_image": 40}).model)
