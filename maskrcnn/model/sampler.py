"""Balanced positive/negative sampler for the RPN and RoI-head losses."""
from __future__ import annotations

import torch
from torch import Tensor


class BalancedSampler:
    def __init__(self, *, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """labels [N]: >= 1 positive, 0 negative, -1 ignored. Returns (pos_idx, neg_idx) 1-D index tensors.

        At most `positive_fraction * batch_size_per_image` positives; negatives fill the rest.
        """
        positive = torch.nonzero(labels >= 1).squeeze(1)
        negative = torch.nonzero(labels == 0).squeeze(1)
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        perm_pos = torch.randperm(positive.numel(), device=labels.device)[:num_pos]
        perm_neg = torch.randperm(negative.numel(), device=labels.device)[:num_neg]
        return positive[perm_pos], negative[perm_neg]
