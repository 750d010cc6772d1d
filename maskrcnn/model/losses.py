"""Loss helpers shared by the RPN and the RoI heads, and the form of their training statistics."""
from __future__ import annotations

import torch
from torch import Tensor


def ratio(numerator: Tensor, denominator) -> Tensor:
    """A training statistic (sample counts per image, accuracies) as [2] float (numerator, denominator),
    detached: the step sums both over micro-batches and processes and divides once (train_step's `stats`)."""
    den = denominator if torch.is_tensor(denominator) else torch.tensor(denominator, device=numerator.device)
    return torch.stack((numerator.detach().float().reshape(()), den.detach().float().reshape(())))


def smooth_l1_sum(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Sum of smooth-L1 (beta > 0) or L1 (beta == 0) over all elements; 0 for empty inputs."""
    diff = (input.float() - target.float()).abs()
    if beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum()
