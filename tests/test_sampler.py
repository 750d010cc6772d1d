"""Tests for maskrcnn.model.sampler: balanced positive/negative sampling."""
from __future__ import annotations

import pytest
import torch

from maskrcnn.model.sampler import BalancedSampler


def make_labels(num_pos: int, num_neg: int, num_ignore: int, seed: int = 0, pos_value: int = 1) -> torch.Tensor:
    labels = torch.cat((torch.full((num_pos,), pos_value), torch.zeros(num_neg, dtype=torch.int64),
                        torch.full((num_ignore,), -1)))
    g = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(labels.numel(), generator=g)]


def check_sample(labels: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
    assert pos.dim() == 1 and neg.dim() == 1
    assert (labels[pos] >= 1).all()
    assert (labels[neg] == 0).all()
    # no duplicates, and no index is both positive and negative
    all_idx = torch.cat((pos, neg))
    assert all_idx.unique().numel() == all_idx.numel()


def test_plenty_of_both_fills_fraction():
    labels = make_labels(300, 1000, 200)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    check_sample(labels, pos, neg)
    assert pos.numel() == 128
    assert neg.numel() == 128


def test_positive_fraction_quarter():
    labels = make_labels(500, 2000, 0)
    pos, neg = BalancedSampler(batch_size_per_image=512, positive_fraction=0.25)(labels)
    check_sample(labels, pos, neg)
    assert pos.numel() == 128
    assert neg.numel() == 384


def test_fewer_positives_more_negatives():
    labels = make_labels(10, 1000, 50)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    check_sample(labels, pos, neg)
    assert pos.numel() == 10
    assert neg.numel() == 246  # negatives fill the rest of the batch


def test_few_of_both_takes_all():
    labels = make_labels(5, 20, 30)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    check_sample(labels, pos, neg)
    assert pos.numel() == 5 and neg.numel() == 20
    assert set(pos.tolist()) == set(torch.nonzero(labels >= 1).squeeze(1).tolist())
    assert set(neg.tolist()) == set(torch.nonzero(labels == 0).squeeze(1).tolist())


def test_ignored_never_sampled():
    labels = make_labels(3, 4, 5000)
    for _ in range(5):
        pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
        check_sample(labels, pos, neg)
        assert (labels[torch.cat((pos, neg))] != -1).all()


def test_labels_above_one_are_positive():
    labels = make_labels(40, 100, 10, pos_value=7)
    labels[:5] = torch.tensor([2, 3, 0, -1, 80])
    pos, neg = BalancedSampler(batch_size_per_image=64, positive_fraction=0.5)(labels)
    check_sample(labels, pos, neg)
    num_pos_available = int((labels >= 1).sum())
    assert pos.numel() == min(32, num_pos_available)
    assert neg.numel() == 64 - pos.numel()


def test_all_labels_multiclass_positive_set_matches():
    labels = torch.tensor([0, 3, 0, 1, -1, 2, 0])
    pos, neg = BalancedSampler(batch_size_per_image=100, positive_fraction=0.5)(labels)
    assert sorted(pos.tolist()) == [1, 3, 5]
    assert sorted(neg.tolist()) == [0, 2, 6]


def test_no_positives():
    labels = make_labels(0, 500, 10)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    assert pos.numel() == 0
    assert neg.numel() == 256
    check_sample(labels, pos, neg)


def test_empty_labels():
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(torch.zeros(0, dtype=torch.int64))
    assert pos.numel() == 0 and neg.numel() == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_counts_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 3, (400,), generator=g)
    batch, frac = 128, 0.25
    pos, neg = BalancedSampler(batch_size_per_image=batch, positive_fraction=frac)(labels)
    check_sample(labels, pos, neg)
    n_pos, n_neg = int((labels >= 1).sum()), int((labels == 0).sum())
    assert pos.numel() == min(n_pos, int(batch * frac))
    assert neg.numel() == min(n_neg, batch - pos.numel())
    assert pos.numel() + neg.numel() <= batch


def test_sampling_is_random_subset():
    labels = make_labels(1000, 1000, 0)
    torch.manual_seed(0)
    a, _ = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    b, _ = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    assert set(a.tolist()) != set(b.tolist())  # a random subset, not the first 128
