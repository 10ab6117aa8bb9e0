"""Caches: frozen tower features (same training as running the tower, encoded once, keyed by what the
features depend on) and tokenised multimodal data."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from llava_kit.data.feature_cache import FeatureCache
from llava_kit.model.vision import build_vision_tower
from llava_kit.train.engine import train

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small"


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def shards(root) -> list:
    return sorted(root.glob("*/shard-*.json"))


def test_training_from_cache_matches_running_the_tower(make_config, tmp_path):
    cache = tmp_path / "cache"
    common = {"train.max_steps": 6, "data.feature_cache_dir": str(cache)}
    tower_run = train(make_config("tower", **common, **{"data.feature_cache": "off"}))
    assert not cache.exists()
    cached_run = train(make_config("cached", **common))
    assert len(shards(cache)) == 1
    reference, cached = losses(tower_run), losses(cached_run)
    assert len(reference) == 6
    # fp16 storage of the features is the only difference
    assert cached == pytest.approx(reference, rel=2e-3)
    assert reference[-1] < reference[0]


def test_rerun_encodes_nothing_and_feature_layer_change_rebuilds(make_config, tmp_path):
    cache = tmp_path / "cache"
    common = {"train.max_steps": 1, "data.feature_cache_dir": str(cache)}
    train(make_config("a", **common))
    train(make_config("b", **common))
    assert len(shards(cache)) == 1, "a rerun over the same images must not encode them again"
    train(make_config("c", **common, **{"model.vision.feature_layer": -1}))
    assert len(shards(cache)) == 2
    assert len({s.parent for s in shards(cache)}) == 2, "another feature layer must use another cache"


@pytest.fixture
def tower(tiny_dirs):
    return build_vision_tower(str(tiny_dirs["vision"]), feature_layer=-2, select_strategy="patch").eval()


def test_cached_features_equal_the_towers_output(tower, tmp_path):
    from llava_kit.data.images import load_image, prepare_image

    images = sorted((SHAPES / "images").rglob("*.png"))[:3]
    paths = [str(p) for p in images]
    reader = FeatureCache(tmp_path, tower, "pad").ensure(paths, tower, batch_size=2)
    with torch.no_grad():
        pixels = tower.preprocess([prepare_image(load_image(p), "pad", tower.image_mean) for p in paths])
        expected = tower.encode(pixels)  # [3, num_tokens, width]
    got = torch.stack([reader(p) for p in paths]).float()
    assert got.shape == expected.shape == (3, tower.num_tokens, tower.width)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    # Readers travel to DataLoader workers: they must pickle without their open memory maps.
    clone = pickle.loads(pickle.dumps(reader))
    torch.testing.assert_close(clone(paths[1]), reader(paths[1]))


def test_keyed_by_content_and_preprocessing(tower, tmp_path):
    image = sorted((SHAPES / "images").rglob("*.png"))[0]
    copy = tmp_path / "renamed.png"
    shutil.copy(image, copy)
    root = tmp_path / "cache"
    FeatureCache(root, tower, "pad").ensure([str(image)], tower)
    reader = FeatureCache(root, tower, "pad").ensure([str(copy)], tower)
    assert len(shards(root)) == 1, "a copy of a cached image (same bytes) must hit the cache"
    torch.testing.assert_close(reader(str(copy)), FeatureCache(root, tower, "pad").ensure([str(image)], tower)(
        str(image)))
    FeatureCache(root, tower, "resize").ensure([str(image)], tower)
    assert len({s.parent for s in shards(root)}) == 2, "another aspect policy must use another cache"


def test_incomplete_shard_is_ignored_and_concurrent_callers_encode_once(tower, tmp_path):
    paths = [str(p) for p in sorted((SHAPES / "images").rglob("*.png"))[:4]]
    root = tmp_path / "cache"
    cache = FeatureCache(root, tower, "pad")
    cache.dir.mkdir(parents=True)
    (cache.dir / "shard-crashed.npy").write_bytes(b"half a file")  # a crash before the image list was written
    readers = []
    workers = [threading.Thread(target=lambda: readers.append(FeatureCache(root, tower, "pad").ensure(paths, tower)))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(readers) == 3 and len(shards(root)) == 1
    for reader in readers:
        assert reader(paths[0]).shape == (tower.num_tokens, tower.width)


def test_tokenised_multimodal_data_is_cached_and_keyed_by_content(make_config, tmp_path, caplog):
    """Tokenisation done once: a rerun reads the examples and the report back; an edited file misses."""
    import logging

    from llava_kit.data.multimodal import build_dataset
    from llava_kit.model.build import build_llava

    data = tmp_path / "sft.json"
    records = json.loads((SHAPES / "sft.json").read_text())
    records[0]["image"] = "no/such/image.png"  # one bad record, so the report has something to carry
    data.write_text(json.dumps(records))
    cfg = make_config("tok", stage="sft", **{"data.path": str(data)})
    model, tokenizer = build_llava(cfg.model)
    first = build_dataset(cfg, model, tokenizer)
    with caplog.at_level(logging.INFO, logger="llava_kit.data.multimodal"):
        second = build_dataset(cfg, model, tokenizer)
    assert "token cache" in caplog.text
    assert [e.input_ids for e in second.examples] == [e.input_ids for e in first.examples]
    assert [e.labels for e in second.examples] == [e.labels for e in first.examples]
    assert [e.image_paths for e in second.examples] == [e.image_paths for e in first.examples]
    assert second.report.to_dict() == first.report.to_dict() and len(second.report.skipped) == 1
    torch.testing.assert_close(second[0]["pixel_values"], first[0]["pixel_values"])

    data.write_text(json.dumps(records[:-1]))  # edited data: a miss, re-encoded
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llava_kit.data.multimodal"):
        third = build_dataset(cfg, model, tokenizer)
    assert "token cache" not in caplog.text and len(third) == len(first) - 1


def test_the_fingerprint_waits_for_an_encode_in_another_thread(tower):
    """An encode runs only the blocks it needs by swapping the tower's block list for its duration; a fingerprint
    taken meanwhile in another thread (three callers of the cache at once) must still hash every block."""
    from llava_kit.data.feature_cache import tower_fingerprint

    baseline = tower_fingerprint(tower, "pad")
    inside, release = threading.Event(), threading.Event()

    def encode_and_hold():
        with tower._blocks_up_to(1):  # what encode() does around the forward
            inside.set()
            release.wait()

    encoder = threading.Thread(target=encode_and_hold)
    encoder.start()
    inside.wait()
    seen = []
    reader = threading.Thread(target=lambda: seen.append(tower_fingerprint(tower, "pad")))
    reader.start()
    reader.join(timeout=1.0)  # give an unguarded reader time to hash the truncated tower (it must wait instead)
    release.set()
    encoder.join()
    reader.join()
    assert seen == [baseline]
