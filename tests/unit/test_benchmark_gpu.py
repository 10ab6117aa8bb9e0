"""benchmarks/gpu.py's code path on the CPU (`--tiny`: tiny shapes, fp32): models with the same weights, llava-kit's
and the reference's training steps, packing on and off, the ratio lines."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def gpu_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    return gpu


def test_tiny_run_prints_every_way_and_ratio(gpu_benchmark, capsys):
    assert gpu_benchmark.main(["--tiny", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("stage 1 llava-kit", "stage 1 reference", "stage 2 llava-kit, packing off",
                 "stage 2 llava-kit, packing on", "stage 2 reference"):
        assert f"{name}: " in out and "samples/s" in out, out
    ratios = [line for line in out.splitlines() if line.startswith("gpu_stage")]
    assert len(ratios) == 3, out


def test_without_cuda_it_says_so(gpu_benchmark, capsys):
    if gpu_benchmark.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_benchmark.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_synthetic_samples_have_the_image_and_labels_on_the_answer(gpu_benchmark):
    shapes = gpu_benchmark.TINY
    for ids, labels in gpu_benchmark.samples(shapes, 2, 4):
        assert ids.count(gpu_benchmark.IMAGE_TOKEN_ID) == shapes.image_tokens
        answer = [label for label in labels if label != -100]
        assert shapes.answer_tokens[0] <= len(answer) <= shapes.answer_tokens[1]
        assert ids[-len(answer):] == answer

