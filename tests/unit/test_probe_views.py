"""The probes of scripts/probe_views.py: the attention probe finds a label carried by one token among many, and cannot
find one the tokens do not carry."""

from __future__ import annotations

import torch

from scripts.probe_views import attention_probe_accuracy, probe_accuracy


def needle_tokens(n: int, seed: int, informative: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 40, 8] noise tokens, one of which (at a random place) carries its sample's label in channels 4-7; the rest
    of each row is zero padding from a random length on, as canvases of different sizes leave it."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    tokens = torch.randn(n, 40, 8, generator=generator) * 0.3
    for row, label in enumerate(labels.tolist()):
        length = int(torch.randint(20, 41, (1,), generator=generator))
        place = int(torch.randint(0, length, (1,), generator=generator))
        tokens[row, place, 0] = 3.0  # what marks the needle: the attention has to find it
        if informative:
            tokens[row, place, 4 + label] = 3.0
        tokens[row, length:] = 0.0
    return tokens, labels


def test_the_attention_probe_finds_the_one_token_that_says_the_label():
    train, train_labels = needle_tokens(600, seed=0)
    test, test_labels = needle_tokens(200, seed=1)
    assert attention_probe_accuracy(train, train_labels, test, test_labels, steps=400) > 0.9
    # the mean over 20-40 tokens buries the needle: a linear probe of it does far worse
    mean_accuracy = probe_accuracy(train.mean(1), train_labels, test.mean(1), test_labels)
    assert mean_accuracy < 0.8


def test_the_attention_probe_stays_at_chance_when_no_token_carries_the_label():
    train, train_labels = needle_tokens(600, seed=0, informative=False)
    test, test_labels = needle_tokens(200, seed=1, informative=False)
    assert attention_probe_accuracy(train, train_labels, test, test_labels, steps=400) < 0.4
