"""Tiny model builders: deterministic, and free of side effects on the caller's random state."""

import torch

from llava_kit.model.sources import resolve_model_path


def test_building_tiny_models_keeps_the_callers_random_state(tmp_path, monkeypatch):
    """A run must initialise its projector the same whether `tiny:` models were cached or built just now."""
    monkeypatch.setenv("LLAVA_KIT_HOME", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    path = resolve_model_path("tiny:vision")  # builds it (seeded) on first use
    assert torch.equal(torch.rand(4), expected)
    assert resolve_model_path("tiny:vision") == path  # second use: the cached copy
