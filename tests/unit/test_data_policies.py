"""Over-long records, images and reports: the over-long stop and its message, truncated and symlinked images, an
image failing during training, and reports written with whole reasons also when nothing is usable."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_kit.config import DataConfig
from llava_kit.data.dataset import (
    DataReport,
    Example,
    LlavaDataset,
    OverlongError,
    check_images,
    suggest_max_seq_len,
)
from llava_kit.data.images import ImageLoadError, check_image, resolve_image_path
from llava_kit.data.readers import BadRecord, Sample
from llava_kit.data.text import build_text_dataset


def alpaca(tmp_path, lengths):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Task {i}", "output": "word " * n} for i, n in enumerate(lengths)]))
    return str(path)


def text_data(path, **kw):
    return DataConfig(**{"path": path, "template": "chatml", "cache": False, "overlong": "skip", **kw})


def test_too_many_over_long_records_stop_the_run_naming_the_max_seq_len_that_keeps_99(tiny_tokenizer, tmp_path):
    path = alpaca(tmp_path, [5] * 3 + [60 + 3 * i for i in range(17)])
    with pytest.raises(OverlongError) as err:
        build_text_dataset(text_data(path, max_seq_len=64), "text-sft", tiny_tokenizer)
    report = err.value.report
    suggestion, keeps = suggest_max_seq_len(report.lengths)
    assert str(err.value) == (
        f"data {path}: only 3 of 20 usable records (15.0%) fit data.max_seq_len 64; 17 over-long ones would be skipped "
        f"(data.overlong: skip), below data.min_kept_fraction 0.9. max_seq_len {suggestion} keeps {keeps:.1%} (the "
        f"longest record has {max(report.lengths)} tokens): raise data.max_seq_len, set data.overlong: truncate, or "
        "lower data.min_kept_fraction")
    assert suggestion % 128 == 0 and keeps >= 0.99 and report.reasons() == {"over-long": 17}
    assert len(build_text_dataset(text_data(path, max_seq_len=suggestion), "text-sft", tiny_tokenizer)) == 20
    assert len(build_text_dataset(text_data(path, max_seq_len=64, min_kept_fraction=0.1), "text-sft",
                                  tiny_tokenizer)) == 3  # the user lowered the threshold: 3 kept, 17 reported
    cut = build_text_dataset(text_data(path, max_seq_len=64, overlong="truncate"), "text-sft", tiny_tokenizer)
    assert len(cut) == 20 and cut.report.truncated == 17 and all(len(i["input_ids"]) <= 64 for i in cut.items)
    with pytest.raises(OverlongError, match=r"17 of 20 usable records are longer than data.max_seq_len 64 "
                                            r"\(data.overlong: error\)"):
        build_text_dataset(text_data(path, max_seq_len=64, overlong="error"), "text-sft", tiny_tokenizer)


def test_data_check_prints_percentiles_and_whether_training_would_stop(tiny_tokenizer, tmp_path, capsys,
                                                                        monkeypatch):
    from llava_kit.cli import main
    from tests.integration.conftest import REPO

    monkeypatch.chdir(REPO)
    path = alpaca(tmp_path, [5] * 3 + [60 + 3 * i for i in range(17)])
    config = "configs/tiny/text_sft_identity.yaml"
    assert main(["data", "check", path, "--config", config, "--format", "alpaca", "data.max_seq_len=64"]) == 1
    out = capsys.readouterr().out
    assert "tokens per record: p50 " in out and "15.0% fit data.max_seq_len 64 (data.overlong: skip)" in out
    assert "training would stop: data: only 3 of 20 usable records" in out and "keeps 100.0%" in out and out.endswith("valid: 3 invalid: 17\n")
    assert main(["data", "check", path, "--config", config, "data.max_seq_len=1024", "data.format=auto"]) == 0
    assert capsys.readouterr().out.endswith("valid: 20 invalid: 0\n")


# ------------------------------------------------------------------------------------------------------ images


def truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # a photo-like file, not a few bytes
    Image.fromarray(noise).save(path, "JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is whole: PIL's verify() passes
    with Image.open(path) as img:
        img.verify()


def test_a_truncated_jpeg_is_found_by_decoding_it_whole(tmp_path):
    truncated_jpeg(tmp_path / "half.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(ImageLoadError, match="cannot read image 'half.jpg': image file is truncated"):
        check_image("half.jpg", tmp_path)
    checked = check_images([Sample("a", ["ok.png", "half.jpg"], [])], str(tmp_path))
    assert checked["ok.png"] == str(tmp_path / "ok.png") and checked["half.jpg"].kind == "unreadable image"


def test_symlinked_folders_inside_the_root_are_accepted_and_escapes_refused(tmp_path):
    coco = tmp_path / "elsewhere" / "coco"
    coco.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(coco / "x.jpg")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(coco, root / "coco")  # LLaVA's layout: coco/ linked into place
    assert resolve_image_path("coco/x.jpg", root) == root / "coco" / "x.jpg"
    assert check_image("coco/x.jpg", root) == str(root / "coco" / "x.jpg")
    for escape in ("../elsewhere/coco/x.jpg", "coco/../../elsewhere/coco/x.jpg", str(coco / "x.jpg")):
        with pytest.raises(ImageLoadError, match="outside the image root"):
            resolve_image_path(escape, root)


def test_data_urls_are_decoded_once_into_the_image_cache(tmp_path):
    from tests.unit.test_readers import png_data_url

    url = png_data_url((1, 2, 3))
    first, second = resolve_image_path(url, tmp_path), resolve_image_path(url, "/anywhere")
    assert first == second and first.suffix == ".png" and Image.open(first).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageLoadError, match="base64 does not decode"):
        resolve_image_path("data:image/png;base64,@@@", tmp_path)


def test_an_image_failing_during_training_is_skipped_and_added_to_the_report(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / name)
    report = DataReport(total=2, kept=2)
    report.write(tmp_path / "data_report.json")
    examples = [Example([1, 2], [1, 2], [str(tmp_path / "a.png")], "d.json[0]", "a"),
                Example([3, 4], [3, 4], [str(tmp_path / "b.png")], "d.json[1]", "b")]
    dataset = LlavaDataset(examples, report, image_preprocess=lambda images: images, image_mean=(0.5, 0.5, 0.5))
    dataset.report_path = tmp_path / "data_report.json"
    truncated_jpeg(tmp_path / "a.png")  # damaged after the pre-flight check
    item = dataset[0]
    assert item["input_ids"].tolist() == [3, 4]  # the next good example stands in: the batch keeps its size
    assert dataset[0]["input_ids"].tolist() == [3, 4] and dataset.failed == {0}
    written = json.loads((tmp_path / "data_report.json").read_text())
    assert (written["kept"], written["skipped"], written["skipped_by_reason"]) == (1, 1, {"unreadable image": 1})
    (record,) = written["skipped_records"]
    assert record["source"] == "d.json[0]" and record["id"] == "a" and "a.png" in record["reason"]
    assert "found during training" in record["reason"]
    dataset.bad_records, dataset.failed = "error", set()
    with pytest.raises(ValueError, match=r"bad record d.json\[0\] \(id a\): cannot read image .*a.png"):
        dataset[0]


def test_report_keys_are_whole_reasons_and_records_are_named():
    report = DataReport(total=3, skipped=[
        BadRecord("d.json[0]", "x", "turn 3: `<image>` appears in a assistant message; ...", "`<image>` outside a user turn"),
        BadRecord("d.json[1]", None, "turn 5: `<image>` appears in a assistant message; ...",
                  "`<image>` outside a user turn"),
        BadRecord("d.json[2]", None, "cannot read image 'a.jpg': image file is truncated", "unreadable image")])
    assert report.reasons() == {"`<image>` outside a user turn": 2, "unreadable image": 1}
    listed = report.to_dict()["skipped_records"]
    assert [(r["source"], r["id"]) for r in listed] == [("d.json[0]", "x"), ("d.json[1]", None), ("d.json[2]", None)]
