"""What one training step keeps in memory, counted rather than sampled from the process (compare-projectors' memory
column, benchmarks/anyres.py)."""

from __future__ import annotations

import torch


def saved_for_backward_bytes(model, batch: dict) -> int:
    """Run one forward and backward of `model` on `batch` and return the bytes autograd kept for the backward pass,
    each storage counted once (views of one tensor share it). The gradients stay on the parameters."""
    saved: dict[int, int] = {}

    def remember(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
        loss = model(**batch)["loss"]
    loss.backward()
    return sum(saved.values())


def trained_bytes(model) -> int:
    """Bytes of the parameters that train: each also has a gradient and, under AdamW, two optimizer states."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
