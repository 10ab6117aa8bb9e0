"""Batches of one modality and similar lengths: less padding, no image-free rows in image batches.

LLaVA's `group_by_modality_length`, written for the HF Trainer's sampler hook: shuffle within each
modality, cut into mega-batches, sort each mega-batch by length, cut into batches, shuffle the batches.
Randomness stays (which samples meet, batch order) while a batch's rows have similar lengths.

Batches are formed at the size of one *global* optimizer batch (micro batch x accumulation x
processes), so 1 process x 8 and 2 processes x 4 see the same samples in each step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive `batch_size` chunks share a modality and have similar lengths."""

    def __init__(self, lengths: list[int], has_images: list[bool], batch_size: int, seed: int = 0,
                 megabatch_factor: int = 50):
        if len(lengths) != len(has_images):
            raise ValueError("lengths and has_images must describe the same samples")
        self.lengths, self.has_images = lengths, has_images
        self.batch_size, self.seed, self.megabatch = batch_size, seed, batch_size * megabatch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch: a new order per epoch, the same after a resume."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        full, partial = [], []
        for modality in (True, False):
            indices = [i for i, has in enumerate(self.has_images) if has == modality]
            shuffled = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(shuffled), self.megabatch):
                group = sorted(shuffled[start:start + self.megabatch], key=lambda i: -self.lengths[i])
                for b in range(0, len(group), self.batch_size):
                    batch = group[b:b + self.batch_size]
                    (full if len(batch) == self.batch_size else partial).append(batch)
        order = torch.randperm(len(full), generator=generator).tolist()
        # Partial batches go last: in the middle they would shift every later batch across modalities.
        for batch in [full[i] for i in order] + partial:
            yield from batch
