"""Engine features that come from the Trainer must really work through llava-kit's model and data."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from llava_kit.train.engine import train


def test_gradient_accumulation_equals_the_larger_batch(make_config):
    """micro 4 x accumulation 2 == micro 8: the loss is token-weighted over the accumulated batch."""
    common = {"train.max_steps": 3, "train.projector_learning_rate": 2e-3}
    big = train(make_config("big", stage="sft", **common, **{"train.micro_batch_size": 8}))
    acc = train(make_config("acc", stage="sft", **common, **{"train.micro_batch_size": 4,
                                                             "train.gradient_accumulation_steps": 2}))
    a, b = load_file(str(big / "projector.safetensors")), load_file(str(acc / "projector.safetensors"))
    a.update(load_file(str(big / "adapter/adapter_model.safetensors")))
    b.update(load_file(str(acc / "adapter/adapter_model.safetensors")))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_tensorboard_logs_are_written(make_config):
    run_dir = train(make_config("tb", **{"train.report_to": "tensorboard", "train.max_steps": 2}))
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard event file in the run directory"
