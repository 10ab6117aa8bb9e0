"""Training on the peers' formats end to end, and what a run reports when records are refused or nothing is usable."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import SHAPES


def mllm_demo_records(n=8):
    """assets/shapes_small's sft records written as LLaMA-Factory's mllm_demo (messages, `<image>` tags, images)."""
    records = []
    for record in json.loads((SHAPES / "sft.json").read_text())[:n]:
        roles = {"human": "user", "gpt": "assistant"}
        records.append({"messages": [{"role": roles[t["from"]], "content": t["value"].replace("<image>\n", "<image>")}
                                     for t in record["conversations"]], "images": [record["image"]]})
    return records


def test_sft_trains_on_llama_factory_and_openai_records(make_config, tmp_path, caplog):
    from llava_kit.train.engine import train

    mllm = tmp_path / "mllm.json"
    mllm.write_text(json.dumps(mllm_demo_records()))
    parts = tmp_path / "parts.jsonl"  # the same, as OpenAI content parts
    parts.write_text("".join(json.dumps({"messages": [
        {"role": m["role"], "content": [{"type": "image_url", "image_url": {"url": r["images"][0]}},
                                        {"type": "text", "text": m["content"].removeprefix("<image>")}]}
        if "<image>" in m["content"] else m for m in r["messages"]]}) + "\n" for r in mllm_demo_records()))
    cfg = make_config("lf", stage="sft", **{"data.path": [str(mllm), str(parts)], "train.max_steps": 1})
    with caplog.at_level("INFO"):
        run_dir = train(cfg)
    report = json.loads((run_dir / "data_report.json").read_text())
    assert (report["total"], report["kept"], report["skipped"]) == (16, 16, 0)
    assert report["formats"] == {"mllm.json": {"openai": 8}, "parts.jsonl": {"openai": 8}}
    assert f"data {mllm}: 8 records read as openai 8 (format detected)" in caplog.text
    assert report["token_lengths"]["max"] <= cfg.data.max_seq_len


def test_refused_records_and_a_truncated_jpeg_are_named_in_the_report(make_config, tmp_path):
    from llava_kit.train.engine import train

    root = tmp_path / "images"
    shutil.copytree(SHAPES / "images", root)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "train" / "half.jpg", quality=95)
    data = (root / "train" / "half.jpg").read_bytes()
    (root / "train" / "half.jpg").write_bytes(data[: len(data) // 2])
    records = mllm_demo_records(8)
    records[3]["images"] = ["train/half.jpg"]
    records[5]["videos"] = ["clip.mp4"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    run_dir = train(make_config("bad", stage="sft", **{"data.path": str(path), "data.image_root": str(root),
                                                       "train.max_steps": 1, "data.feature_cache": "off"}))
    report = json.loads((run_dir / "data_report.json").read_text())
    assert (report["total"], report["kept"]) == (8, 6)
    assert report["skipped_by_reason"] == {"unreadable image": 1, "video not supported": 1}
    half = next(r for r in report["skipped_records"] if r["kind"] == "unreadable image")
    assert half["source"] == "d.json[3]" and "cannot read image 'train/half.jpg': image file is truncated" in half["reason"]


def test_nothing_usable_still_writes_the_report_and_logs_the_reasons(make_config, tmp_path, caplog):
    from llava_kit.data.dataset import BadRecordError
    from llava_kit.train.engine import train

    records = mllm_demo_records(4)
    for record in records:
        record["videos"] = ["clip.mp4"]
    path = tmp_path / "videos.json"
    path.write_text(json.dumps(records))
    cfg = make_config("none", stage="sft", **{"data.path": str(path), "train.max_steps": 1})
    with caplog.at_level("INFO"), pytest.raises(BadRecordError, match=r"no usable records: all 4 were skipped "
                                                                      r"\(video not supported: 4\)"):
        train(cfg)
    report = json.loads((tmp_path / "none" / "data_report.json").read_text())
    assert report["skipped_by_reason"] == {"video not supported": 4} and len(report["skipped_records"]) == 4
    assert "skipped 4 record(s): video not supported (e.g. videos.json[0]: the record has video" in caplog.text


def test_the_over_long_stop_comes_before_step_1_with_its_report(make_config, tmp_path):
    from llava_kit.data.dataset import OverlongError
    from llava_kit.train.engine import train

    cfg = make_config("long", stage="sft", **{"data.max_seq_len": 80, "train.max_steps": 1})
    with pytest.raises(OverlongError, match=r"fit data.max_seq_len 80.*max_seq_len (\d+) keeps 100.0%"):
        train(cfg)
    report = json.loads((tmp_path / "long" / "data_report.json").read_text())
    assert report["skipped_by_reason"] == {"over-long": 48} and not (tmp_path / "long" / "metrics.jsonl").exists()
