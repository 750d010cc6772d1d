"""Loss helpers shared by the RPN and the RoI heads."""
from __future__ import annotations

import torch
from torch import Tensor


def smooth_l1_sum(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Sum of smooth-L1 (beta > 0) or L1 (beta == 0) over all elements; 0 for empty inputs."""
    diff = (input.float() - target.float()).abs()
    if beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum()
