"""Modality- and length-grouped sampling: every sample once, one modality per batch, less padding."""

from __future__ import annotations

import random

from llava_kit.data.sampling import ModalityLengthGroupedSampler


def make(n=203, batch=8, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(10, 500) for _ in range(n)]
    has_images = [rng.random() < 0.7 for _ in range(n)]
    return lengths, has_images, ModalityLengthGroupedSampler(lengths, has_images, batch, seed=1, megabatch_factor=4)


def batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def padding(lengths, groups):
    return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)


def test_every_sample_once_and_batches_share_a_modality():
    lengths, has_images, sampler = make()
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    mixed = [b for b in batches(order, 8) if len({has_images[i] for i in b}) > 1]
    assert len(mixed) <= 1, "only the final leftovers of the two modalities may share a batch"


def test_less_padding_than_a_plain_shuffle():
    lengths, _, sampler = make()
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    assert padding(lengths, batches(list(sampler), 8)) < 0.5 * padding(lengths, batches(shuffled, 8))


def test_order_is_seeded_per_epoch():
    _, _, sampler = make()
    first = list(sampler)
    assert list(sampler) == first  # same epoch: same order (a resumed run replays it)
    sampler.set_epoch(1)
    assert list(sampler) != first
